"""``tinytl``: TinyTL-L+B (Cai, Gan, Zhu, Han; NeurIPS 2020). Lite residual modules + the
biases of the frozen network + the head.

From the paper: the weights stay frozen, biases train; each block gets a *lite residual
module* that works on a downsampled copy of the block's input (so its activations are small),
made of a group convolution and a 1x1 convolution, whose output is upsampled and added to the
block's output. Our choices where we did not follow the paper's code: the input is average-
pooled by 2 (at least 1 pixel), the 3x3 group convolution has groups of 8 channels and keeps
the width, then ReLU, then a 1x1 convolution to the output width initialised at zero (so the
network starts as the pretrained one), nearest-neighbour upsampling, and the sum enters the
block before its activation. On the lean engine the frozen path keeps only ReLU masks; the lite
residual keeps its own (pooled) inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from da3.backbones.base import Block
from da3.lean import lean_avg_pool2d, share_clone
from da3.methods.base import (
    AdaptedModel,
    BackboneFeatures,
    FrozenBackbone,
    MethodConfig,
    new_head,
    register_method,
)
from da3.methods.bias import train_biases


@dataclass
class TinyTLConfig(MethodConfig):
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    head_lr: float = field(default=3e-3, metadata={"help": "learning rate of the new head"})
    downsample: int = field(default=2, metadata={"help": "pooling of the lite residual input"})
    group_width: int = field(default=8, metadata={"help": "channels per group of the 3x3 conv"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(downsample=self.downsample >= 1, group_width=self.group_width >= 1)


class LiteResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, group_width: int) -> None:
        super().__init__()
        groups = max(1, c_in // group_width)
        while c_in % groups:
            groups -= 1
        self.conv = nn.Conv2d(c_in, c_in, 3, padding=1, groups=groups)
        self.project = nn.Conv2d(c_in, c_out, 1)
        nn.init.zeros_(self.project.weight)
        nn.init.zeros_(self.project.bias)

    def forward(self, z: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
        a = self.project(F.relu(self.conv(z)))
        return a if a.shape[-2:] == out_hw else F.interpolate(a, size=out_hw, mode="nearest")


class LiteResidualBlock(nn.Module):
    """``act(F(x) + S(x) + LR(x))`` around a frozen (lean) block."""

    def __init__(self, block: Block, config: TinyTLConfig) -> None:
        super().__init__()
        self.block = block
        self.lite = LiteResidual(block.in_channels, block.out_channels, config.group_width)
        self.downsample = config.downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.block.stride
        out_hw = (-(-x.shape[-2] // s), -(-x.shape[-1] // s))
        r = max(1, min(self.downsample, x.shape[-2], x.shape[-1]))
        y = self.block.branch(x) + self.lite(lean_avg_pool2d(x, r), out_hw)
        shortcut = self.block.forward_shortcut(x)
        if shortcut is not None:
            y += shortcut
        return self.block.act(y)


@register_method("tinytl", TinyTLConfig, "lite residual + biases + head (TinyTL-L+B), lean")
def build(frozen: FrozenBackbone, num_classes: int, config: TinyTLConfig) -> AdaptedModel:
    backbone = train_biases(share_clone(frozen.lean))
    for i, block in backbone.iter_blocks():
        backbone.blocks[i] = LiteResidualBlock(block, config)
    return AdaptedModel(
        BackboneFeatures(backbone), new_head(frozen.feature_dim, num_classes), frozen, "tinytl"
    )
