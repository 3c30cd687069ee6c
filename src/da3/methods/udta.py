"""``udta``: Unidirectional Thin Adapter (arXiv 2203.10463).

From the paper (abstract): a thin side network reads features from several layers of the
backbone and sends nothing back into it, so no gradient is computed through the backbone;
it returns auxiliary features to the classifier; one backbone serves many tasks, each with
its own thin adapter. The layers are not published; everything below is our design
(docs/methods.md):

    taps t_1..t_K    outputs of the last block at each of the K deepest resolutions
    s_1 = P_1(t_1)                                   P_k: 1x1 conv to `width` + BN
    s_k = P_k(t_k) + avgpool(s_{k-1} to t_k's size)
    s_k = s_k + M_k(s_k)                             M_k: dw3x3-BN-ReLU-1x1-BN-ReLU
    features = pooled backbone features + W GAP(s_K)  W zero-initialised

The backbone (lean form) runs under ``torch.no_grad``: nothing of it is kept for backward,
only the side network's own activations. Because its taps depend on the input alone, they
can be cached across epochs (``TrainConfig.cache_features``). ``W = 0`` at the start, so the
model starts as the pretrained feature extractor (``linear``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from da3.backbones import Backbone
from da3.errors import Da3Error
from da3.methods.base import (
    AdaptedModel,
    CacheableFeatures,
    FrozenBackbone,
    MethodConfig,
    new_head,
    register_method,
)


@dataclass
class UDTAConfig(MethodConfig):
    lr: float = field(default=3e-3, metadata={"help": "learning rate of the side network"})
    head_lr: float = field(default=3e-3, metadata={"help": "learning rate of the new head"})
    stages: int = field(
        default=4, metadata={"help": "taps: the last block of each of this many deepest stages"}
    )
    width: int = field(default=64, metadata={"help": "channels of the side network"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(stages=self.stages >= 1, width=self.width >= 1)


def stage_ends(backbone: Backbone) -> list[int]:
    """Index of the last block at each resolution: blocks followed by a strided one, and the
    last block (from the block view's strides, so it holds for every backbone)."""
    blocks = list(backbone.blocks)
    return [i for i in range(len(blocks)) if i == len(blocks) - 1 or blocks[i + 1].stride > 1]


class ThinStage(nn.Module):
    """One stage of the side path: project a tap, merge the running side state, mix."""

    def __init__(self, tap_channels: int, width: int) -> None:
        super().__init__()
        self.project = nn.Sequential(
            nn.Conv2d(tap_channels, width, 1, bias=False), nn.BatchNorm2d(width)
        )
        self.mix = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )

    def forward(self, tap: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        s = self.project(tap)
        if state is not None:
            s = s + F.adaptive_avg_pool2d(state, s.shape[-2:])
        return s + self.mix(s)


class ThinSideNetwork(CacheableFeatures):
    """The frozen backbone's taps (no gradient) and the domain's thin side path."""

    def __init__(self, backbone: Backbone, feature_dim: int, config: UDTAConfig) -> None:
        super().__init__()
        self.backbone = backbone
        ends = stage_ends(backbone)
        if config.stages > len(ends):
            raise Da3Error(
                f"udta: stages={config.stages}, but {backbone.name} has {len(ends)} stages"
            )
        self.tap_blocks = ends[-config.stages :]
        self.side = nn.ModuleList(
            ThinStage(backbone.blocks[i].out_channels, config.width) for i in self.tap_blocks
        )
        self.side_out = nn.Linear(config.width, feature_dim)
        nn.init.zeros_(self.side_out.weight)  # starts as the pretrained features
        nn.init.zeros_(self.side_out.bias)

    @torch.no_grad()
    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The chosen blocks' outputs, then the backbone's pooled features."""
        bb, wanted, out = self.backbone, set(self.tap_blocks), []
        h = bb.stem(x)
        for i, block in bb.iter_blocks():
            h = block(h)
            if i in wanted:
                out.append(h)  # no block writes to its input (tested)
        pooled = torch.flatten(bb.pool(bb.neck(h)), 1)
        return [*out, pooled]

    def from_taps(self, taps: list[torch.Tensor]) -> torch.Tensor:
        *maps, pooled = taps
        state = None
        for stage, tap in zip(self.side, maps, strict=True):
            state = stage(tap, state)
        return pooled + self.side_out(state.mean((2, 3)))


@register_method("udta", UDTAConfig, "thin side network on several frozen stages (no backprop)")
def build(frozen: FrozenBackbone, num_classes: int, config: UDTAConfig) -> AdaptedModel:
    features = ThinSideNetwork(frozen.lean, frozen.feature_dim, config)
    return AdaptedModel(features, new_head(frozen.feature_dim, num_classes), frozen, "udta")
