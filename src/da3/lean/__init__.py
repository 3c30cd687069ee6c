"""The memory-lean frozen backbone: layers whose backward keeps (almost) nothing."""

from da3.lean.convert import convert_module, share_clone, to_lean
from da3.lean.ops import (
    GlobalAvgPool,
    LeanAffine,
    LeanConv2d,
    LeanMaxPool2d,
    LeanReLU,
    LeanReLU6,
    fold_conv_bn,
    lean_adaptive_avg_pool2d,
    lean_avg_pool2d,
    pack_bits,
    unpack_bits,
)

__all__ = [
    "GlobalAvgPool",
    "LeanAffine",
    "LeanConv2d",
    "LeanMaxPool2d",
    "LeanReLU",
    "LeanReLU6",
    "convert_module",
    "fold_conv_bn",
    "lean_adaptive_avg_pool2d",
    "lean_avg_pool2d",
    "pack_bits",
    "share_clone",
    "to_lean",
    "unpack_bits",
]
