"""Turn a frozen stock backbone into its memory-lean form, module by module."""

from __future__ import annotations

import copy

from torch import nn

from da3.backbones.base import Backbone, Block
from da3.backbones.lazy import materialize, set_tensor
from da3.lean.ops import (
    GlobalAvgPool,
    LeanAffine,
    LeanConv2d,
    LeanMaxPool2d,
    LeanReLU,
    LeanReLU6,
    LeanSequential,
    check_frozen_bits,
)

LEAN_TYPES = (LeanConv2d, LeanAffine, LeanReLU, LeanMaxPool2d, GlobalAvgPool)
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Flatten)


def _is_relu6(m: nn.Module) -> bool:
    return isinstance(m, nn.ReLU6) or (
        isinstance(m, nn.Hardtanh) and m.min_val == 0.0 and m.max_val == 6.0
    )


class _Converter:
    """Converts modules to their lean form. ``bits``: each lean convolution is stored so as
    soon as it is made. ``read``/``drop``: called with the stock modules one lean module is
    made of, before (their weights are read, for a lazy backbone) and after (they are
    released), so that only one layer's float32 weights exist at a time."""

    def __init__(self, bits: int = 32, read=None, drop=None) -> None:
        self.bits, self.read, self.drop = bits, read, drop

    def _made(self, lean: nn.Module, *stock: nn.Module) -> nn.Module:
        if self.bits != 32 and isinstance(lean, LeanConv2d):
            lean = lean.stored_in(self.bits)
        if self.drop is not None:
            self.drop(*stock)
        return lean

    def _before(self, *stock: nn.Module) -> None:
        if self.read is not None:
            self.read(*stock)

    def sequence(self, children: list[nn.Module]) -> list[nn.Module]:
        out: list[nn.Module] = []
        i = 0
        while i < len(children):
            m = children[i]
            nxt = children[i + 1] if i + 1 < len(children) else None
            if isinstance(m, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d):
                self._before(m, nxt)
                out.append(self._made(LeanConv2d.from_conv(m, nxt), m, nxt))
                i += 2
                continue
            lean = self.module(m)
            if isinstance(lean, LeanReLU) and out and isinstance(out[-1], LeanConv2d):
                lean.inplace = True  # a convolution's output is read by nothing else
            out.append(lean)
            i += 1
        return out

    def module(self, m: nn.Module) -> nn.Module:
        if isinstance(m, LEAN_TYPES + _PASS_THROUGH):
            return m
        if isinstance(m, Block):
            act = self.module(m.act)
            if isinstance(act, LeanReLU):
                act = type(act)(inplace=True)  # its input is the block's own sum
            return Block(
                self.module(m.branch),
                None if m.shortcut is None else self.module(m.shortcut),
                act,
                in_channels=m.in_channels,
                out_channels=m.out_channels,
                stride=m.stride,
                family=m.family,
            )
        if isinstance(m, nn.Sequential):
            return LeanSequential(*self.sequence(list(m)))
        if isinstance(m, nn.Conv2d):
            self._before(m)
            return self._made(LeanConv2d.from_conv(m), m)
        if isinstance(m, nn.BatchNorm2d):
            self._before(m)
            return self._made(LeanAffine(m), m)
        if _is_relu6(m):
            return LeanReLU6()
        if isinstance(m, nn.ReLU):
            return LeanReLU()
        if isinstance(m, nn.MaxPool2d):
            return LeanMaxPool2d.from_module(m)
        if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
            return GlobalAvgPool()
        raise TypeError(f"no lean equivalent for {type(m).__name__}; add one in da3.lean")


def convert_module(m: nn.Module) -> nn.Module:
    """The lean equivalent of one frozen module (recursing into containers)."""
    return _Converter().module(m)


def frozen_bits_of(module: nn.Module) -> int | None:
    """The bits the lean convolutions under ``module`` are stored in (None: there are none);
    ValueError if they differ."""
    found = {m.bits for m in module.modules() if isinstance(m, LeanConv2d)}
    if len(found) > 1:
        raise ValueError(f"lean convolutions stored in several precisions: {sorted(found)}")
    return found.pop() if found else None


def to_lean(backbone: Backbone, *, consume: bool = False, frozen_bits: int = 32) -> Backbone:
    """A lean copy of ``backbone``.

    Every convolution is fused with the batch norm that follows it; all tensors of the copy
    are frozen (``requires_grad=False``). The classifier is kept as it is, frozen.
    ``frozen_bits``: the convolution weights are stored in 32, 16 or 8 bits (see
    :func:`da3.lean.ops.quantize_weight`), each converted as it is made.

    ``consume=True`` converts part by part and takes each converted part out of
    ``backbone`` as it goes (and leaves out the ImageNet classifier, which no domain uses):
    the frozen weights then exist once, plus one block's new form at a time, instead of
    twice. ``backbone`` is left empty; use it no more. A lazy backbone
    (:mod:`da3.backbones.lazy`) then reads each part's weights just before converting it:
    its float32 weights never exist all at once.
    """

    frozen_bits = check_frozen_bits(frozen_bits)
    if not consume:
        materialize(backbone)  # the stock form stays: read it whole
        converter = _Converter(frozen_bits)
    else:
        path = {id(m): n for n, m in backbone.named_modules(remove_duplicate=False)}

        def read(*stock: nn.Module) -> None:  # a lazy backbone's layer, read when needed
            for m in stock:
                materialize(backbone, path[id(m)])

        def drop(*stock: nn.Module) -> None:  # and its float32 weights released once made
            for m in stock:
                for key, t in list(m.named_parameters()) + list(m.named_buffers()):
                    set_tensor(m, key, t.detach().to("meta"))

        converter = _Converter(frozen_bits, read, drop)

    def convert(owner: nn.Module, name: str) -> nn.Module:
        lean = converter.module(getattr(owner, name))
        if consume:
            setattr(owner, name, nn.Identity())  # what is left of the stock part goes
        return lean

    stem = convert(backbone, "stem")
    blocks = [convert(backbone.blocks, str(i)) for i in range(len(backbone.blocks))]
    neck = convert(backbone, "neck")
    pool = convert(backbone, "pool")
    if consume:
        backbone.classifier = nn.Identity()
        classifier = nn.Identity()
    else:
        classifier = copy.deepcopy(backbone.classifier)
    lean = Backbone(
        name=backbone.name,
        stem=stem,
        blocks=blocks,
        neck=neck,
        pool=pool,
        classifier=classifier,
        feature_dim=backbone.feature_dim,
        preprocess=backbone.preprocess,
        weights=backbone.weights,
    )
    lean.requires_grad_(False)
    return lean.eval()


def share_clone(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` whose parameters and buffers are the same tensors.

    Methods clone the shared lean backbone this way and then replace, per domain, only the
    tensors they train; the frozen weights exist once in memory for all domains.
    """
    memo = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return copy.deepcopy(module, memo)
