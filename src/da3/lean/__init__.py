"""The memory-lean frozen backbone: layers whose backward keeps (almost) nothing."""

from da3.lean.convert import (
    convert_module,
    frozen_bits_of,
    share_clone,
    to_lean,
)
from da3.lean.ops import (
    FROZEN_BITS,
    GlobalAvgPool,
    LeanAffine,
    LeanConv2d,
    LeanMaxPool2d,
    LeanReLU,
    LeanReLU6,
    LeanSequential,
    check_frozen_bits,
    dequantize_weight,
    fold_conv_bn,
    lean_adaptive_avg_pool2d,
    lean_avg_pool2d,
    pack_bits,
    quantize_weight,
    unpack_bits,
)

__all__ = [
    "FROZEN_BITS",
    "GlobalAvgPool",
    "LeanAffine",
    "LeanConv2d",
    "LeanMaxPool2d",
    "LeanReLU",
    "LeanReLU6",
    "LeanSequential",
    "check_frozen_bits",
    "convert_module",
    "dequantize_weight",
    "fold_conv_bn",
    "frozen_bits_of",
    "lean_adaptive_avg_pool2d",
    "lean_avg_pool2d",
    "pack_bits",
    "quantize_weight",
    "share_clone",
    "to_lean",
    "unpack_bits",
]
