"""The uniform view of a backbone that every method attaches through.

A :class:`Backbone` is ``stem -> blocks -> neck -> pool -> classifier``. Each :class:`Block`
computes ``act(branch(x) + shortcut(x))`` (``act`` is the identity for inverted residual
blocks, ``shortcut`` is ``None`` where the block has no skip connection). The modules inside
are the very modules of the architecture's native implementation (torchvision's, or ours for
EfficientNet-Lite0), so weights load the native way and the view computes the same function,
bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

ShortcutKind = Literal["identity", "projection", "none"]


@dataclass(frozen=True)
class Preprocess:
    """How raw RGB uint8 images become the network's input: ``(x / 255 - mean) / std``."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise a uint8 (or [0, 255] float) N x 3 x H x W batch."""
        x = images.float() / 255.0
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "input_size": self.input_size}


IMAGENET_PREPROCESS = Preprocess((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "same" padding (before, after) along one axis."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def same_conv_padding(
    size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """TensorFlow "same" padding as a convolution's own (symmetric) padding, without a
    padded copy of the input: ``(padding, shift)`` per axis. Where "same" pads one more
    after than before (``p, p + 1``), the convolution pads ``p + 1`` on both sides and its
    kernel gets one leading zero tap along that axis (``shift`` 1): the extra tap meets only
    the padding row before the input, and the outputs are the same sums. (Dilation 1 only.)
    """
    padding, shift = [], []
    for n, k, s in zip(size, kernel, stride, strict=True):
        before, after = same_padding(n, k, s)
        padding.append(after)
        shift.append(after - before)  # 0 or 1
    return (padding[0], padding[1]), (shift[0], shift[1])


def pad_same(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """Zero-pad ``x`` for TensorFlow "same" padding (no copy when nothing to pad)."""
    top, bottom = same_padding(x.shape[-2], kernel[0], stride[0])
    left, right = same_padding(x.shape[-1], kernel[1], stride[1])
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom))  # keeps nothing for backward
    return x


class Block(nn.Module):
    """One residual (or plain) block: ``act(branch(x) + shortcut(x))``.

    Attributes describe the block for adaptors: channel counts, stride, the kind of shortcut,
    and the family (``basic``, ``bottleneck``, ``inverted_residual``).
    """

    def __init__(
        self,
        branch: nn.Module,
        shortcut: nn.Module | None,
        act: nn.Module,
        *,
        in_channels: int,
        out_channels: int,
        stride: int,
        family: str,
    ) -> None:
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut
        self.act = act
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.family = family

    @property
    def shortcut_kind(self) -> ShortcutKind:
        if self.shortcut is None:
            return "none"
        return "identity" if isinstance(self.shortcut, nn.Identity) else "projection"

    def forward_shortcut(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.shortcut is None else self.shortcut(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branch(x)
        if self.shortcut is not None:
            # In place, as torchvision does: the branch ends in a convolution or batch norm,
            # whose output nothing else reads or keeps.
            y += self.shortcut(x)
        return self.act(y)

    def extra_repr(self) -> str:
        return (
            f"{self.family}, {self.in_channels}->{self.out_channels}, stride={self.stride}, "
            f"shortcut={self.shortcut_kind}"
        )


class Backbone(nn.Module):
    """A CNN as ``stem -> blocks -> neck -> pool -> classifier``, with its preprocessing.

    ``forward_features`` returns the pooled feature vector (N x ``feature_dim``); ``forward``
    applies the original classifier (ImageNet's, for pretrained weights).
    """

    def __init__(
        self,
        *,
        name: str,
        stem: nn.Module,
        blocks: list[Block],
        neck: nn.Module,
        pool: nn.Module,
        classifier: nn.Module,
        feature_dim: int,
        preprocess: Preprocess,
        weights: str,
    ) -> None:
        super().__init__()
        self.name = name
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.neck = neck
        self.pool = pool
        self.classifier = classifier
        self.feature_dim = feature_dim
        self.preprocess = preprocess
        self.weights = weights

    def iter_blocks(self) -> Iterator[tuple[int, Block]]:
        yield from enumerate(self.blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = self.neck(x)
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))
