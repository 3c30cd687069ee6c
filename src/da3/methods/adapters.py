"""Residual adapters (Rebuffi, Bilen, Vedaldi): ``series_adapter`` (NeurIPS 2017) and
``parallel_adapter`` (CVPR 2018), + a new head.

From the papers: the pretrained convolutions are shared and frozen; every domain has its own
batch norm after each convolution and its own 1x1 convolutions, in series after a
convolution (``y + conv1x1(y)``) or in parallel to it (``conv(x) + conv1x1(x)``, same
stride), the sum going through the domain's batch norm.

Our choices (docs/methods.md):

* The domain's batch norm is a per-channel affine ``gamma * z + beta`` after each frozen
  convolution (whose pretrained batch norm is folded in, as on the lean engine), initialised
  to the identity: a batch norm with fixed statistics whose scale and shift train.
* The series adapter's own batch norm (the paper normalises before its 1x1), with fixed
  statistics, is an affine map that folds into the 1x1 and the domain's shift; the frozen
  convolution's output is already batch-normalised, so it is left out.
* Every 1x1 starts at zero: the network starts as the pretrained one, exactly.
* Where they sit (one rule per block family, through the block view):

  ==================  ==========================  ===========================================
  block               series_adapter              parallel_adapter
  ==================  ==========================  ===========================================
  basic (ResNet-18)   after each 3x3              beside each 3x3
  bottleneck          after the 3x3               beside the 3x3
  inverted residual   after the 1x1 projection    beside the depthwise conv, depthwise 1x1
  ==================  ==========================  ===========================================

  A full 1x1 after the depthwise convolution of an inverted residual would work at the
  expanded width (7.5 M parameters on EfficientNet-Lite0, twice the backbone), and a
  depthwise 1x1 there is a per-channel scale, the same as the domain's batch norm; so the
  series adapter goes after the projection, where the block mixes channels at its narrow
  width. A parallel adapter has the frozen convolution's groups and stride and looks at the
  pixel under its kernel's centre (so that it could be merged into the kernel's centre tap
  after training): beside a depthwise convolution it is a per-channel scale of the input.
  The stem, shortcut projections and neck get the domain's batch norm only.

Memory: the domain's scale needs the tensor it scales (a convolution's output), a series
1x1 its input (the same size), a parallel 1x1 the frozen convolution's input. PyTorch keeps
those; the frozen convolutions are lean (nothing kept), ReLUs keep bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from da3.backbones.base import Block, same_padding
from da3.lean import LeanConv2d, share_clone
from da3.methods.base import (
    AdaptedModel,
    BackboneFeatures,
    FrozenBackbone,
    MethodConfig,
    new_head,
    register_method,
)


@dataclass
class AdapterConfig(MethodConfig):
    lr: float = field(
        default=1e-3, metadata={"help": "learning rate of adapters and domain batch norms"}
    )
    head_lr: float = field(default=3e-3, metadata={"help": "learning rate of the new head"})


class DomainAffine(nn.Module):
    """The domain's batch norm with fixed statistics: ``weight * z + bias`` per channel."""

    def __init__(self, channels: int, like: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels, dtype=like.dtype, device=like.device))
        self.bias = nn.Parameter(torch.zeros(channels, dtype=like.dtype, device=like.device))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # Keeps z (for the scale's gradient); exactly z while weight = 1 and bias = 0.
        return torch.addcmul(self.bias.view(1, -1, 1, 1), z, self.weight.view(1, -1, 1, 1))


class ChannelScale(nn.Module):
    """A depthwise 1x1 convolution with a stride (one weight per channel, the same weight
    shape), computed as a multiply: faster than a grouped convolution on the CPU."""

    def __init__(self, channels: int, stride: tuple[int, int], like: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.zeros(channels, 1, 1, 1, dtype=like.dtype, device=like.device)
        )
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sh, sw = self.stride
        return x[..., ::sh, ::sw] * self.weight.view(1, -1, 1, 1)


def _zero_conv1x1(
    c_in: int, c_out: int, stride: tuple[int, int], groups: int, like: torch.Tensor
) -> nn.Module:
    if groups > 1 and groups == c_in == c_out:
        return ChannelScale(c_out, stride, like)
    conv = nn.Conv2d(
        c_in, c_out, 1, stride, groups=groups, bias=False, dtype=like.dtype, device=like.device
    )
    nn.init.zeros_(conv.weight)
    return conv


class AdaptedConv(nn.Module):
    """A frozen lean convolution with the domain's batch norm and, optionally, an adapter:

    * ``series``:   ``dbn(z + adapter(z))`` with ``z = conv(x)``
    * ``parallel``: ``dbn(conv(x) + adapter(x at the kernel centres))``
    * ``None``:     ``dbn(conv(x))``
    """

    def __init__(self, conv: LeanConv2d, kind: str | None) -> None:
        super().__init__()
        self.conv = conv  # shared, frozen
        self.kind = kind
        self.dbn = DomainAffine(conv.out_channels, conv.bias)  # float, whatever the weight's bits
        self.adapter: nn.Module | None = None
        if kind == "series":
            c = conv.out_channels
            self.adapter = _zero_conv1x1(c, c, (1, 1), 1, conv.bias)
        elif kind == "parallel":
            self.adapter = _zero_conv1x1(
                conv.in_channels, conv.out_channels, conv.stride, conv.groups, conv.bias
            )
        elif kind is not None:
            raise ValueError(f"AdaptedConv: unknown kind {kind!r}")

    def _centres(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` shifted so that a 1x1 with the convolution's stride reads, at each output
        position, the input pixel under the kernel's centre."""
        conv = self.conv
        kh, kw = conv.weight.shape[-2:]
        if conv.same_pad:
            top = same_padding(x.shape[-2], kh, conv.stride[0])[0]
            left = same_padding(x.shape[-1], kw, conv.stride[1])[0]
        else:
            top, left = conv.padding
        dy = conv.dilation[0] * (kh // 2) - top
        dx = conv.dilation[1] * (kw // 2) - left
        if dy < 0 or dx < 0:  # more padding than half the kernel: zeros before the image
            x = F.pad(x, (max(0, -dx), 0, max(0, -dy), 0))
        return x[..., max(0, dy) :, max(0, dx) :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        if self.kind == "series":
            z = z + self.adapter(z)
        elif self.kind == "parallel":
            a = self.adapter(self._centres(x))
            z = z + a[..., : z.shape[-2], : z.shape[-1]]
        return self.dbn(z)


def _convs(module: nn.Module) -> list[tuple[nn.Module, str, LeanConv2d]]:
    """(parent, attribute name, conv) of every LeanConv2d under ``module``, in order."""
    out = []
    for name, child in module.named_children():
        if isinstance(child, LeanConv2d):
            out.append((module, name, child))
        else:
            out.extend(_convs(child))
    return out


def _spatial(conv: LeanConv2d) -> bool:
    return max(conv.weight.shape[-2:]) > 1


def adapter_sites(block: Block, kind: str) -> set[int]:
    """Positions (in :func:`_convs` order of the block's branch) of the adapted convs."""
    convs = [c for _, _, c in _convs(block.branch)]
    if kind == "parallel":
        return {i for i, c in enumerate(convs) if _spatial(c)}
    full = {i for i, c in enumerate(convs) if _spatial(c) and c.groups == 1}
    return full or {len(convs) - 1}  # inverted residual: after the projection


def attach_adapters(backbone: nn.Module, kind: str) -> None:
    """Wrap every convolution of a (share-cloned) lean backbone in an :class:`AdaptedConv`."""
    for part in (backbone.stem, backbone.neck):
        for parent, name, conv in _convs(part):
            setattr(parent, name, AdaptedConv(conv, None))
    for _, block in backbone.iter_blocks():
        sites = adapter_sites(block, kind)
        for i, (parent, name, conv) in enumerate(_convs(block.branch)):
            setattr(parent, name, AdaptedConv(conv, kind if i in sites else None))
        if block.shortcut is not None:
            for parent, name, conv in _convs(block.shortcut):
                setattr(parent, name, AdaptedConv(conv, None))


def _build(frozen: FrozenBackbone, num_classes: int, kind: str, method: str) -> AdaptedModel:
    backbone = share_clone(frozen.lean)
    attach_adapters(backbone, kind)
    return AdaptedModel(
        BackboneFeatures(backbone), new_head(frozen.feature_dim, num_classes), frozen, method
    )


@register_method(
    "series_adapter", AdapterConfig, "1x1 residual adapters after convs + domain BN (Rebuffi 2017)"
)
def build_series(frozen: FrozenBackbone, num_classes: int, config: AdapterConfig) -> AdaptedModel:
    return _build(frozen, num_classes, "series", "series_adapter")


@register_method(
    "parallel_adapter", AdapterConfig, "1x1 adapters beside convs + domain BN (Rebuffi 2018)"
)
def build_parallel(frozen: FrozenBackbone, num_classes: int, config: AdapterConfig) -> AdaptedModel:
    return _build(frozen, num_classes, "parallel", "parallel_adapter")
