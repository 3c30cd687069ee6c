"""Frozen layers whose autograd keeps (almost) nothing for backward.

Stock PyTorch keeps a convolution's input even when its weight is frozen, a batch norm's
input in eval mode, and a ReLU's full float output. When a trainable module sits before
them, a "frozen" backbone therefore buffers nearly every activation. The layers here keep
only what the input gradient really needs:

==================  ===============================================================
layer               kept for backward
==================  ===============================================================
LeanConv2d          nothing but the (frozen, shared) weight; batch norm folded in;
                    the weight stored in 32, 16 or 8 bits (below)
LeanReLU / ReLU6    a 1-bit mask, packed 8 per byte
LeanMaxPool2d       the arg-max position inside its window, one byte per output
GlobalAvgPool       nothing (``mean`` keeps only the shape)
lean_avg_pool2d     nothing (non-overlapping windows; gradient is a spread)
lean_adaptive_...   nothing (the backward kernel needs only the input's shape)
==================  ===============================================================

Forward values and input gradients equal the stock modules' to float32 rounding.

The frozen weights themselves (the largest thing a lean training run holds once the
activations are gone) can be stored small, since the backbone never changes
(:func:`quantize_weight`, ``frozen_bits``):

==========  =================================================  ==================
bits        stored per folded convolution weight                bytes vs float32
==========  =================================================  ==================
32          float32 (the default)                               1
16          float16                                             1/2
8           int8, symmetric, one float32 scale per out channel  ~1/4
==========  =================================================  ==================

A stored-small convolution is turned back into float32 one layer at a time, when it runs
(forward, and the input gradient in backward): only that one layer's float copy is alive,
and autograd keeps the small weight, not the copy. Biases stay float32 (they may train).
Values then equal a stock convolution whose weight is the dequantized one.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from da3.backbones.base import pad_same, same_conv_padding

# ---------------------------------------------------------------------------------------
# bit packing


_SHIFTS_CACHE: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    s = _SHIFTS_CACHE.get(device)
    if s is None:
        s = _SHIFTS_CACHE[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return s


_BIT_VALUES_CACHE: dict[torch.device, torch.Tensor] = {}


def _bit_values(device: torch.device) -> torch.Tensor:
    v = _BIT_VALUES_CACHE.get(device)
    if v is None:
        v = _BIT_VALUES_CACHE[device] = (1 << torch.arange(8, device=device)).to(torch.uint8)
    return v


def _memory_order(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``t`` viewed flat in its memory order (channels-last 4-d tensors are not copied)."""
    if (
        t.dim() == 4
        and not t.is_contiguous()
        and t.is_contiguous(memory_format=torch.channels_last)
    ):
        return t.permute(0, 2, 3, 1).reshape(-1), True
    return t.reshape(-1), False


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor into uint8, 8 elements per byte (little-endian bit order), in the
    tensor's memory order (see :func:`unpack_bits`)."""
    flat, _ = _memory_order(mask)
    pad = (-flat.numel()) % 8
    if pad:
        flat = F.pad(flat.view(torch.uint8), (0, pad))
    bits = flat.view(torch.uint8).view(-1, 8)
    return (bits * _bit_values(mask.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(
    packed: torch.Tensor, shape: torch.Size, channels_last: bool = False, as_bool: bool = True
) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a bool tensor of ``shape`` (channels-last strides if
    the packed mask came from a channels-last tensor); ``as_bool=False`` gives the 0/1 bits
    as uint8 (no conversion pass: a gradient multiplies by them much faster)."""
    bits = (packed.unsqueeze(1) >> _shifts(packed.device)) & 1
    flat = bits.view(-1)[: math.prod(shape)]
    if channels_last:
        n, c, h, w = shape
        out = flat.view(n, h, w, c).permute(0, 3, 1, 2)
    else:
        out = flat.view(shape)
    return out.bool() if as_bool else out


def packed_mask_bytes(numel: int) -> int:
    return (numel + 7) // 8


# ---------------------------------------------------------------------------------------
# convolution


def conv2d_input_grad(shape, weight, grad, stride, padding, dilation, groups) -> torch.Tensor:
    """The gradient of ``conv2d``'s input, as the transposed convolution of ``grad``.

    The same numbers as ``torch.nn.grad.conv2d_input`` (bit for bit on the CPU), with about
    half its workspace: that one runs the convolution's backward on a stand-in input, whose
    buffers a transposed convolution does not need.
    """
    k = weight.shape[-2:]
    extra = tuple(
        shape[2 + i]
        - ((grad.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k[i] - 1) + 1)
        for i in range(2)
    )
    return F.conv_transpose2d(grad, weight, None, stride, padding, extra, groups, dilation)


SLICE_BYTES: int | None = None
"""While set (:func:`sliced_convolutions`), a frozen convolution whose input, output or
float weight is larger than this many bytes runs in slices of channels
(:func:`sliced_conv2d`); None: every convolution runs whole."""
DEFAULT_SLICE_BYTES = 1 << 20
SLICE_ALIGN = 16  # channels per slice: a multiple of this (the kernels' channel blocking)


@contextlib.contextmanager
def sliced_convolutions(nbytes: int | None = DEFAULT_SLICE_BYTES):
    """Within this block, frozen convolutions larger than ``nbytes`` run in slices of
    channels (:func:`sliced_conv2d`): the same numbers for less memory, at some cost in
    time (micro-batches of one 224 px image, 1 MiB: steps about 1.1x slower, measured by
    ``benchmarks/memory_parts.py``). A training run in micro-batches runs so."""
    global SLICE_BYTES
    before, SLICE_BYTES = SLICE_BYTES, nbytes
    try:
        yield
    finally:
        SLICE_BYTES = before


def _slices(channels: int, nbytes: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of channels, each about :data:`SLICE_BYTES` of a tensor of
    ``nbytes`` with ``channels`` channels (one range when it is small, and while the model
    is being traced for export: a graph of whole convolutions, for any batch size)."""
    if SLICE_BYTES is None or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return [(0, channels)]
    parts = -(-nbytes // SLICE_BYTES)
    if parts <= 1 or channels <= SLICE_ALIGN:
        return [(0, channels)]
    step = max(SLICE_ALIGN, channels // parts // SLICE_ALIGN * SLICE_ALIGN)
    return [(a, min(a + step, channels)) for a in range(0, channels, step)]


FROZEN_BITS = (32, 16, 8)
INT8_MAX = 127  # symmetric: -127..127 (-128 unused, so that q and -q both exist)


def check_frozen_bits(bits) -> int:
    """``bits`` as one of :data:`FROZEN_BITS`; ValueError otherwise."""
    if isinstance(bits, bool) or bits not in FROZEN_BITS:
        raise ValueError(f"frozen_bits must be 32, 16 or 8, got {bits!r}")
    return int(bits)


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A convolution weight stored in ``bits``: (stored tensor, per-output-channel scale).

    32: the weight itself, no scale. 16: float16, no scale (a value beyond float16's range
    is refused). 8: int8 ``q = round(w / s)`` with ``s = max|w| / 127`` per output channel
    (symmetric; a channel of zeros gets ``s = 1``), and ``s`` as float32.
    """
    bits = check_frozen_bits(bits)
    if bits == 32:
        return weight, None
    if bits == 16:
        if any(
            weight[a:e].abs().max() > torch.finfo(torch.float16).max
            for a, e in _output_chunks(weight)
        ):
            raise ValueError("a frozen weight exceeds float16's range; use 8 or 32 bits")
        return weight.to(torch.float16).contiguous(), None
    w = weight.float()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    shape = (-1,) + (1,) * (w.dim() - 1)
    for a, e in _output_chunks(w):  # a few output channels at a time: each has its own scale
        part = w[a:e]
        amax = part.abs().amax(dim=tuple(range(1, w.dim())))
        s = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
        q[a:e] = torch.round(part / s.view(shape)).clamp_(-INT8_MAX, INT8_MAX)
        scale[a:e] = s
    return q, scale


def _output_chunks(weight: torch.Tensor, nbytes: int = 1 << 20) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of output channels of ``weight``, each about ``nbytes`` of
    float64: what folding and quantizing a large layer hold besides its weight (a
    ResNet-50's 3x3 convolutions of 512 channels are 9 MiB in float32, their float64
    temporaries twice that, several alive at once when done whole)."""
    rows = weight.shape[0]
    step = max(1, nbytes // max(1, weight[0].numel() * 8))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def dequantize_weight(
    weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The float weight a stored one stands for (:func:`quantize_weight`), in ``dtype``; a
    weight already in ``dtype`` is returned as it is (no copy)."""
    if scale is not None:
        # int8 x float: one multiply that writes the float copy (type promotion, no cast pass)
        shape = (-1,) + (1,) * (weight.dim() - 1)
        return torch.mul(weight, scale.to(dtype).view(shape))
    return weight if weight.dtype == dtype else weight.to(dtype)


def weight_bits(weight: torch.Tensor) -> int:
    """The frozen bits a stored weight stands for (32, 16 or 8)."""
    return {torch.int8: 8, torch.float16: 16, torch.bfloat16: 16}.get(weight.dtype, 32)


def _run_weight(weight, scale, dtype, shift=(0, 0)) -> torch.Tensor:
    """The float weight a convolution runs with: dequantized (:func:`dequantize_weight`),
    with a leading zero tap along each axis that ``shift`` names (see
    :func:`~da3.backbones.base.same_conv_padding`)."""
    w = dequantize_weight(weight, scale, dtype)
    if shift[0] or shift[1]:
        w = F.pad(w, (shift[1], 0, shift[0], 0))
    return w


def _float_bytes(weight: torch.Tensor, shift, dtype: torch.dtype) -> int:
    """Bytes of the float weight a stored one runs as (:func:`_run_weight`). Weights are
    sliced at twice :data:`SLICE_BYTES`: a ResNet-50's last stages have large weights on
    small maps, where more slices mean many more calls for little memory."""
    k = (weight.shape[2] + shift[0]) * (weight.shape[3] + shift[1])
    return weight.shape[0] * weight.shape[1] * k * torch.finfo(dtype).bits // 8


def _is_depthwise(channels: int, weight: torch.Tensor, groups: int) -> bool:
    return groups == channels == weight.shape[0] and weight.shape[1] == 1


def onednn_enabled() -> bool:
    """Whether PyTorch runs CPU convolutions with oneDNN now (see :func:`native_kernels`)."""
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


@contextlib.contextmanager
def native_kernels():
    """Within this block, CPU convolutions run on PyTorch's own kernels instead of oneDNN's
    (``torch.backends.mkldnn``), and frozen depthwise convolutions on :func:`depthwise_taps`.

    oneDNN is the fastest on the CPU, but it copies each convolution's tensors into its own
    blocked layouts, caches a compiled kernel for every shape it meets, and a process that
    uses it pages in more of libtorch's code. A training run in micro-batches (memory
    before speed) runs so, and its whole process needs less memory
    (``benchmarks/process_memory.py``). The numbers differ from oneDNN's by float rounding
    (sums in another order)."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def _tap_range(
    size_in: int, size_out: int, tap: int, stride: int, pad: int
) -> tuple[int, int, int]:
    """The outputs ``[lo, hi)`` along one axis that a kernel tap reads inside the input (not
    in its zero padding), and the input index the first of them reads."""
    lo = max(0, -(-(pad - tap) // stride))
    hi = min(size_out, (size_in - 1 + pad - tap) // stride + 1)
    return lo, hi, lo * stride + tap - pad


def _taps(in_hw, out_hw, kernel, stride, padding, shift):
    """Per kernel tap that meets the input: (i, j, output slices, input slices)."""
    for i in range(shift[0], kernel[0]):  # a leading zero tap (``shift``) adds nothing
        y0, y1, iy = _tap_range(in_hw[0], out_hw[0], i, stride[0], padding[0])
        if y1 <= y0:
            continue
        for j in range(shift[1], kernel[1]):
            x0, x1, ix = _tap_range(in_hw[1], out_hw[1], j, stride[1], padding[1])
            if x1 <= x0:
                continue
            rows = slice(iy, iy + (y1 - y0 - 1) * stride[0] + 1, stride[0])
            cols = slice(ix, ix + (x1 - x0 - 1) * stride[1] + 1, stride[1])
            yield i, j, (slice(y0, y1), slice(x0, x1)), (rows, cols)


def depthwise_taps(x, weight, bias, stride, padding, shift=(0, 0)) -> torch.Tensor:
    """A depthwise convolution (dilation 1) as one multiply-add per kernel tap over the
    whole map, in place into the output: no copy of the input, no workspace. (Without
    oneDNN, PyTorch's CPU kernel runs a depthwise convolution as one convolution per
    channel.) ``weight`` (C, 1, kh, kw) in float, its first ``shift`` taps zero."""
    n, c, h, w = x.shape
    kernel = tuple(weight.shape[2:])
    out_hw = [
        (d + 2 * p - k) // s + 1 for d, p, k, s in zip((h, w), padding, kernel, stride, strict=True)
    ]
    out = x.new_zeros((n, c, *out_hw))
    for i, j, (oy, ox), (iy, ix) in _taps((h, w), out_hw, kernel, stride, padding, shift):
        out[:, :, oy, ox].addcmul_(x[:, :, iy, ix], weight[:, 0, i, j].view(1, c, 1, 1))
    if bias is not None:
        out += bias.detach().to(out.dtype).view(1, c, 1, 1)
    return out


def depthwise_taps_input_grad(shape, weight, grad, stride, padding, shift=(0, 0)) -> torch.Tensor:
    """The input gradient of :func:`depthwise_taps`: each tap's multiply-add the other way."""
    c = shape[1]
    kernel = tuple(weight.shape[2:])
    out = grad.new_zeros(shape)
    taps = _taps(tuple(shape[2:]), tuple(grad.shape[2:]), kernel, stride, padding, shift)
    for i, j, (oy, ox), (iy, ix) in taps:
        out[:, :, iy, ix].addcmul_(grad[:, :, oy, ox], weight[:, 0, i, j].view(1, c, 1, 1))
    return out


def _by_taps(x: torch.Tensor, weight: torch.Tensor, groups: int, dilation) -> bool:
    """Whether a frozen convolution runs as :func:`depthwise_taps`: a depthwise one on the
    CPU while oneDNN is off (:func:`native_kernels`)."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False  # a graph for export: the convolution itself
    return (
        x.device.type == "cpu"
        and tuple(dilation) == (1, 1)
        and _is_depthwise(x.shape[1], weight, groups)
        and not onednn_enabled()
    )


def sliced_conv2d(x, weight, scale, bias, stride, padding, dilation, groups, shift=(0, 0)):
    """``F.conv2d`` of ``x`` with the float weight a stored one stands for (``weight`` and
    ``scale`` as stored, ``shift`` its leading zero taps: :func:`_run_weight`), run in
    slices of channels where its tensors are large: a depthwise convolution over its
    channels, any other (ungrouped) one over its output channels, each slice written into
    the output, its float weight made for that slice alone.

    The CPU kernels copy a convolution's input, output and weight into their own blocked
    layouts, and a weight stored small is first turned into float: whole, those copies of
    the widest layers of a mobile network, or of the largest weights of a ResNet, are the
    largest tensors of a training step, while a slice's are a few of them. Each output
    channel is the same sum, sliced or not: the same numbers, bit for bit (tested).
    Grouped convolutions that are not depthwise run whole."""
    kernel = (weight.shape[2] + shift[0], weight.shape[3] + shift[1])
    out_hw = [
        (x.shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
        for i in range(2)
    ]
    out_shape = (x.shape[0], weight.shape[0], *out_hw)
    if _by_taps(x, weight, groups, dilation):
        w = _run_weight(weight, scale, x.dtype, shift)
        return depthwise_taps(x, w, bias, stride, padding, shift)
    depthwise = _is_depthwise(x.shape[1], weight, groups)
    # what slices make smaller: the output and the weight, and a depthwise one's input
    big = max(x.numel() if depthwise else 0, math.prod(out_shape)) * x.element_size()
    big = max(big, _float_bytes(weight, shift, x.dtype) // 2)  # see _float_bytes
    slices = _slices(weight.shape[0], big) if depthwise or groups == 1 else [(0, 0)]
    if len(slices) == 1:
        w = _run_weight(weight, scale, x.dtype, shift)
        if groups == 1:
            return _conv_in_bands(x, w, bias, stride, padding, dilation)
        return F.conv2d(x, w, bias, stride, padding, dilation, groups)
    out = x.new_empty(out_shape)
    for a, e in slices:
        w = _run_weight(weight[a:e], None if scale is None else scale[a:e], x.dtype, shift)
        b = None if bias is None else bias[a:e]
        if depthwise:
            out[:, a:e] = F.conv2d(x[:, a:e], w, b, stride, padding, dilation, e - a)
        else:
            out[:, a:e] = _conv_in_bands(x, w, b, stride, padding, dilation)
        del w
    return out


def _conv_in_bands(x, w, bias, stride, padding, dilation) -> torch.Tensor:
    """An ungrouped ``F.conv2d``, run a band of output rows at a time while convolutions
    are sliced on PyTorch's own CPU kernels (:func:`native_kernels`). Those unfold the
    input (for a kernel larger than 1x1) and hand it to MKL's matrix product, which copies
    it again into a workspace of its own for each thread, each as large as the unfolded
    input: at one 224 px image, the largest transients of a step (a mobile network's
    projections at 112 x 112 and 56 x 56). A band's copies are about a quarter of
    :data:`SLICE_BYTES` each. Each output is the same sum: the same numbers, bit for bit
    (tested)."""
    n, cin, h, width = x.shape
    kh, kw = w.shape[2:]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    per_row = n * cin * kh * kw * ow * x.element_size()  # unfolded input of one output row
    if (
        SLICE_BYTES is None
        or x.device.type != "cpu"
        or onednn_enabled()
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or per_row * oh <= SLICE_BYTES // 4
    ):
        return F.conv2d(x, w, bias, stride, padding, dilation)
    rows = max(1, SLICE_BYTES // 4 // per_row)
    out = x.new_empty((n, w.shape[0], oh, ow))
    for r0 in range(0, oh, rows):
        r1 = min(oh, r0 + rows)
        band = _input_rows(x, r0, r1, stride[0], padding[0], dilation[0] * (kh - 1) + 1)
        out[:, :, r0:r1] = F.conv2d(band, w, bias, stride, (0, padding[1]), dilation)
        del band
    return out


def _input_rows(x: torch.Tensor, r0: int, r1: int, stride: int, pad: int, extent: int):
    """The rows of ``x`` that output rows ``[r0, r1)`` of a convolution read (``extent``:
    its kernel's height, dilation included), zero rows standing for the padding above and
    below: the band to convolve with no row padding of its own."""
    top = r0 * stride - pad
    bottom = (r1 - 1) * stride - pad + extent
    band = x[:, :, max(top, 0) : min(bottom, x.shape[2])]
    if top < 0 or bottom > x.shape[2]:
        band = F.pad(band, (0, 0, max(0, -top), max(0, bottom - x.shape[2])))
    return band


def sliced_conv2d_input_grad(
    shape, weight, scale, grad, stride, padding, dilation, groups, shift=(0, 0)
):
    """:func:`conv2d_input_grad` with the float weight a stored one stands for, in slices
    of the input's channels where its tensors are large (see :func:`sliced_conv2d`): a
    depthwise convolution over its channels, any other (ungrouped) one over its input
    channels; the same numbers, bit for bit (tested)."""
    if _by_taps(grad, weight, groups, dilation):
        w = _run_weight(weight, scale, grad.dtype, shift)
        return depthwise_taps_input_grad(shape, w, grad, stride, padding, shift)
    depthwise = _is_depthwise(shape[1], weight, groups)
    big = max(math.prod(shape), grad.numel() if depthwise else 0) * grad.element_size()
    big = max(big, _float_bytes(weight, shift, grad.dtype) // 2)
    slices = _slices(shape[1], big) if depthwise or groups == 1 else [(0, 0)]
    if len(slices) == 1:
        w = _run_weight(weight, scale, grad.dtype, shift)
        return conv2d_input_grad(shape, w, grad, stride, padding, dilation, groups)
    out = grad.new_empty(shape)
    for a, e in slices:
        part_shape = (shape[0], e - a, *shape[2:])
        if depthwise:
            sc = None if scale is None else scale[a:e]
            w, g, n = _run_weight(weight[a:e], sc, grad.dtype, shift), grad[:, a:e], e - a
        else:  # the scale is per output channel: all of it
            w, g, n = _run_weight(weight[:, a:e], scale, grad.dtype, shift), grad, 1
        out[:, a:e] = conv2d_input_grad(part_shape, w, g, stride, padding, dilation, n)
        del w
    return out


class _FrozenConv2dFn(Function):
    @staticmethod
    def forward(ctx, x, weight, scale, bias, stride, padding, dilation, groups, shift):
        # The stored (possibly small) weight is kept, never its float copy.
        ctx.save_for_backward(weight, scale)
        ctx.conf = (x.shape, stride, padding, dilation, groups, shift)
        return sliced_conv2d(x, weight, scale, bias, stride, padding, dilation, groups, shift)

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        shape, stride, padding, dilation, groups, shift = ctx.conf
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = sliced_conv2d_input_grad(
                shape, weight, scale, grad, stride, padding, dilation, groups, shift
            )
        if ctx.needs_input_grad[3]:
            grad_bias = grad.sum((0, 2, 3))
        return grad_x, None, None, grad_bias, None, None, None, None, None


class LeanConv2d(nn.Module):
    """A frozen convolution (with any eval-mode batch norm folded in).

    Its weight is a buffer, never trained; backward computes the input gradient by
    transposed convolution from the weight alone. The bias may be made trainable
    (``bias.requires_grad``), whose gradient needs nothing kept either.

    ``weight`` is the weight as stored: float32, float16, or int8 with ``weight_scale``
    (one float32 per output channel; None otherwise), see :func:`quantize_weight` and
    :meth:`stored_in`; :meth:`float_weight` is the float weight it stands for.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
        same_pad: bool = False,
        weight_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if (weight.dtype == torch.int8) != (weight_scale is not None):
            raise ValueError("LeanConv2d: an int8 weight needs weight_scale, no other does")
        self.register_buffer("weight", weight.detach())
        self.register_buffer(
            "weight_scale", None if weight_scale is None else weight_scale.detach()
        )
        self.bias = nn.Parameter(bias.detach(), requires_grad=False)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.same_pad = same_pad

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None) -> LeanConv2d:
        if conv.padding_mode != "zeros":
            raise ValueError(f"LeanConv2d: padding_mode {conv.padding_mode!r} is not supported")
        weight, bias = fold_conv_bn(conv, bn)
        return cls(
            weight,
            bias,
            conv.stride,
            _numeric_padding(conv),
            conv.dilation,
            conv.groups,
            same_pad=getattr(conv, "same_pad", False),
        )

    def stored_in(self, bits: int) -> LeanConv2d:
        """This convolution with its weight stored in ``bits`` (:func:`quantize_weight`),
        from its float weight; the bias and the geometry are shared, not copied. Itself
        when it is stored so already."""
        if bits == self.bits:
            return self
        weight, scale = quantize_weight(self.float_weight(), bits)
        conv = LeanConv2d(
            weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.same_pad,
            weight_scale=scale,
        )
        conv.bias = self.bias
        return conv

    @property
    def bits(self) -> int:
        """The bits its weight is stored in: 32, 16 or 8."""
        return weight_bits(self.weight)

    def float_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight the stored one stands for (a new tensor unless stored in
        ``dtype``, by default the bias's)."""
        return dequantize_weight(self.weight, self.weight_scale, dtype or self.bias.dtype)

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding, shift = self.padding, (0, 0)
        if self.same_pad:
            kernel = tuple(self.weight.shape[-2:])
            if self.dilation == (1, 1) and self.groups > 1 and self.weight.shape[1] == 1:
                # depthwise: no padded copy of the input, which at the block's widest point
                # would be alive beside the input itself (same outputs, bit for bit)
                padding, shift = same_conv_padding(tuple(x.shape[-2:]), kernel, self.stride)
            else:
                x = pad_same(x, kernel, self.stride)
        args = (x, self.weight, self.weight_scale, self.bias, self.stride, padding)
        args += (self.dilation, self.groups, shift)
        if not (x.requires_grad or self.bias.requires_grad):
            return sliced_conv2d(*args)
        return _FrozenConv2dFn.apply(*args)

    def channels(self, a: int, e: int) -> LeanConv2d:
        """Output channels ``[a, e)`` of this convolution, ungrouped or depthwise, as a
        convolution of their own whose tensors are views of this one's (a depthwise one then
        reads the same channels of its input)."""
        depthwise = _is_depthwise(self.in_channels, self.weight, self.groups)
        if self.groups != 1 and not depthwise:
            raise ValueError("LeanConv2d.channels: a grouped convolution is not depthwise")
        part = LeanConv2d(
            self.weight[a:e],
            self.bias.detach()[a:e],
            self.stride,
            self.padding,
            self.dilation,
            e - a if depthwise else 1,
            self.same_pad,
            weight_scale=None if self.weight_scale is None else self.weight_scale[a:e],
        )
        return part

    def extra_repr(self) -> str:
        k = tuple(self.weight.shape[-2:])
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={k}, stride={self.stride}, "
            f"padding={'same' if self.same_pad else self.padding}, groups={self.groups}"
            + ("" if self.bits == 32 else f", frozen_bits={self.bits}")
        )


def _numeric_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """``conv.padding`` as numbers (PyTorch also accepts the strings 'valid' and 'same')."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        if any(t % 2 for t in total):
            raise ValueError("LeanConv2d: padding='same' with an even extent is asymmetric")
        return tuple(t // 2 for t in total)
    return tuple(conv.padding)


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode batch norm as ``x * scale + shift`` (float64)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("a batch norm without running statistics cannot be frozen")
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one convolution equal to ``bn(conv(x))`` with ``bn`` in eval mode,
    computed in float64 a few output channels at a time (:func:`_output_chunks`: the same
    numbers as whole, without a large layer's float64 copies)."""
    weight = conv.weight.detach()
    b = (
        conv.bias.double()
        if conv.bias is not None
        else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    )
    if bn is None:
        return weight.clone(memory_format=torch.contiguous_format), b.to(weight.dtype)
    scale, shift = _bn_scale_shift(bn)
    w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    for a, e in _output_chunks(weight):
        w[a:e] = weight[a:e].double() * scale[a:e].view(-1, 1, 1, 1)
    return w, (b * scale + shift).to(weight.dtype)


class LeanAffine(nn.Module):
    """A frozen eval-mode batch norm not preceded by a convolution: ``x * scale + shift``."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        with torch.no_grad():
            scale, shift = (t.to(torch.float32) for t in _bn_scale_shift(bn))
        self.register_buffer("scale", scale.view(1, -1, 1, 1).contiguous())
        self.register_buffer("shift", shift.view(1, -1, 1, 1).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Multiplying by a tensor that does not require grad keeps only that tensor (a buffer).
        return torch.addcmul(self.shift, x, self.scale)


# ---------------------------------------------------------------------------------------
# activations


class _MaskedActFn(Function):
    @staticmethod
    def forward(ctx, x, upper, inplace):
        mask = x > 0 if upper is None else (x > 0) & (x < upper)
        ctx.shape = x.shape
        ctx.channels_last = _memory_order(mask)[1]
        ctx.save_for_backward(pack_bits(mask))
        if inplace:  # the caller guarantees x is a temporary nobody else reads
            ctx.mark_dirty(x)
            return x.clamp_min_(0) if upper is None else x.clamp_(0, upper)
        return x.clamp_min(0) if upper is None else x.clamp(0, upper)

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        bits = unpack_bits(packed, ctx.shape, ctx.channels_last, as_bool=False)
        # A multiply is much faster than a select here. It differs from stock only for an
        # infinite upstream gradient (inf * 0 = nan), when training has diverged anyway.
        return grad * bits, None, None


class LeanReLU(nn.Module):
    """ReLU keeping a 1-bit mask (``x > 0``) for backward.

    ``inplace=True`` overwrites its input; the converter sets it only where the input is a
    temporary that nothing else reads (a convolution's output, a block's sum).
    """

    upper: float | None = None

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.requires_grad:
            if self.upper is None:
                return F.relu(x, inplace=self.inplace)
            return F.relu6(x, inplace=self.inplace)
        return _MaskedActFn.apply(x, self.upper, self.inplace)

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""


class LeanReLU6(LeanReLU):
    """ReLU6 keeping a 1-bit mask: its gradient is 1 exactly where ``0 < x < 6``."""

    upper = 6.0


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)


class LeanSequential(nn.Sequential):
    """A sequence of frozen lean modules (the converter's form of ``nn.Sequential``).

    While frozen convolutions run in slices (:func:`sliced_convolutions`) and nothing in
    the sequence needs a gradient, the layers of an inverted residual run together, so
    that its largest maps never exist whole:

    * an expansion (a 1x1 convolution and its ReLU) and the depthwise convolution after it
      (and its ReLU), a slice of expanded channels at a time: only a slice of the expanded
      map exists, beside the depthwise convolution's output;
    * a depthwise convolution (stride 1), its ReLU and the 1x1 projection after it, a band
      of rows at a time: only a band of the depthwise convolution's output exists.

    Each output goes through the same operations as when the layers run one by one: the
    same numbers, bit for bit (tested). Layers with hooks of their own run one by one.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = list(self._modules.values())
        i = 0
        while i < len(layers):
            y, taken = _fused(layers, i, x)
            if y is None:
                y, taken = layers[i](x), 1
            x, i = y, i + taken
        return x


def _fused(layers: list[nn.Module], i: int, x: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """The output of the layers from ``layers[i]`` on run together, and how many entries
    they took; (None, 0) when no run of them may."""
    for fuse, width in ((_expand_depthwise, 4), (_depthwise_project, 3)):
        for run, taken in _runs(layers, i, width):
            y = fuse(run, x)
            if y is not None:
                return y, taken
    return None, 0


def _runs(layers: list[nn.Module], i: int, width: int) -> list[tuple[list[nn.Module], int]]:
    """The next ``width`` layers from ``layers[i]`` on, and how many entries they take:
    side by side (EfficientNet-Lite), or with a convolution and its activation in a
    sequence of their own (torchvision's MobileNetV2) unpacked."""
    runs = [(layers[i : i + width], width)] if i + width <= len(layers) else []
    flat, j = [], i
    while len(flat) < width and j < len(layers):
        flat += _as_pair(layers[j]) or [layers[j]]
        j += 1
    if len(flat) == width and j - i < width:
        runs.append((flat, j - i))
    return runs


def _as_pair(m: nn.Module) -> list[nn.Module]:
    """The two layers of a :class:`LeanSequential` of two, without hooks of its own."""
    if type(m) is LeanSequential and len(m) == 2 and not _hooked(m):
        return list(m)
    return []


def _fusable(layers: list[nn.Module], x: torch.Tensor) -> bool:
    """Whether ``layers`` may run fused on ``x``: slicing on, no gradient, no hooks, not
    traced, the plain lean layers themselves."""
    return (
        SLICE_BYTES is not None
        and not x.requires_grad
        and x.dim() == 4
        and not torch.jit.is_tracing()  # a graph for export: the layers themselves
        and not torch.compiler.is_compiling()
        and all(type(m) in (LeanConv2d, LeanReLU, LeanReLU6) for m in layers)
        and not any(isinstance(m, LeanConv2d) and m.bias.requires_grad for m in layers)
        and not any(_hooked(m) for m in layers)
        and not torch.nn.modules.module._global_forward_hooks
        and not torch.nn.modules.module._global_forward_pre_hooks
    )


def _is_pointwise(conv: nn.Module, channels: int) -> bool:
    """A 1x1 ungrouped convolution of stride 1 and no padding, taking ``channels``."""
    return (
        type(conv) is LeanConv2d
        and conv.groups == 1
        and tuple(conv.weight.shape[1:]) == (channels, 1, 1)
        and tuple(conv.stride) == (1, 1)
        and tuple(conv.padding) == (0, 0)
    )


def _depthwise_project(layers: list[nn.Module], x: torch.Tensor) -> torch.Tensor | None:
    """``layers`` (depthwise convolution of stride 1, ReLU, 1x1 convolution) run on ``x``
    a band of output rows at a time (see :class:`LeanSequential`); None when they are not
    such layers, may not run fused, or ``x`` is small enough to run whole."""
    if len(layers) != 3 or not _fusable(layers, x):
        return None
    dw, act, project = layers
    n, c, h, w = x.shape
    if not (
        type(act) is not LeanConv2d
        and type(dw) is LeanConv2d
        and _is_depthwise(c, dw.weight, dw.groups)
        and tuple(dw.stride) == (1, 1)
        and tuple(dw.dilation) == (1, 1)
        and _is_pointwise(project, c)
        and x.numel() * x.element_size() > SLICE_BYTES
    ):
        return None
    kh, kw = dw.weight.shape[2:]
    padding = tuple(dw.padding)
    if dw.same_pad:
        padding, shift = same_conv_padding((h, w), (kh, kw), (1, 1))
        if shift != (0, 0):
            return None
    oh, ow = h + 2 * padding[0] - kh + 1, w + 2 * padding[1] - kw + 1
    rows = max(1, SLICE_BYTES // 4 // (n * c * ow * x.element_size()))
    if rows >= oh:
        return None
    out = None
    for r0 in range(0, oh, rows):
        r1 = min(oh, r0 + rows)
        band = _input_rows(x, r0, r1, 1, padding[0], kh)
        part = sliced_conv2d(
            band, dw.weight, dw.weight_scale, dw.bias, (1, 1), (0, padding[1]), (1, 1), c
        )
        part = project(act(part))
        if out is None:
            out = part.new_empty((n, part.shape[1], oh, ow))
        out[:, :, r0:r1] = part
        del band, part
    return out


def _expand_depthwise(layers: list[nn.Module], x: torch.Tensor) -> torch.Tensor | None:
    """``layers`` (1x1 convolution, ReLU, depthwise convolution, ReLU) run on ``x`` a slice
    of expanded channels at a time (see :class:`LeanSequential`); None when they are not
    such layers, a gradient is needed, or the expanded map is small enough to run whole."""
    if len(layers) != 4 or not _fusable(layers, x):
        return None
    expand, act, dw, act2 = layers
    if not (
        _is_pointwise(expand, x.shape[1])
        and type(dw) is LeanConv2d
        and type(act) is not LeanConv2d
        and type(act2) is not LeanConv2d
        and _is_depthwise(expand.out_channels, dw.weight, dw.groups)
    ):
        return None
    channels = expand.out_channels
    slices = _slices(channels, x.shape[0] * channels * x.shape[2] * x.shape[3] * x.element_size())
    if len(slices) == 1:
        return None
    out = None
    for a, e in slices:
        part = dw.channels(a, e)(act(expand.channels(a, e)(x)))
        if out is None:
            out = part.new_empty((part.shape[0], channels, *part.shape[2:]))
        out[:, a:e] = act2(part)
        del part
    return out


# ---------------------------------------------------------------------------------------
# pooling


class _MaxPoolFn(Function):
    @staticmethod
    def forward(ctx, x, kernel, stride, padding):
        y, idx = F.max_pool2d(x, kernel, stride, padding, return_indices=True)
        n, c, h, w = x.shape
        oh, ow = y.shape[-2:]
        # Flat index into the H x W plane -> position inside the k x k window (one byte).
        oy = torch.arange(oh, device=x.device).view(oh, 1) * stride - padding
        ox = torch.arange(ow, device=x.device).view(1, ow) * stride - padding
        local = (idx // w - oy) * kernel + (idx % w - ox)
        ctx.conf = (x.shape, kernel, stride, padding)
        ctx.save_for_backward(local.to(torch.uint8))
        return y

    @staticmethod
    def backward(ctx, grad):
        (local,) = ctx.saved_tensors
        shape, kernel, stride, padding = ctx.conf
        n, c, h, w = shape
        oh, ow = grad.shape[-2:]
        oy = torch.arange(oh, device=grad.device).view(oh, 1) * stride - padding
        ox = torch.arange(ow, device=grad.device).view(1, ow) * stride - padding
        local = local.long()
        flat = (oy + local // kernel) * w + (ox + local % kernel)
        grad_x = grad.new_zeros(n, c, h * w)
        grad_x.scatter_add_(2, flat.reshape(n, c, -1), grad.reshape(n, c, -1))
        return grad_x.view(shape), None, None, None


class LeanMaxPool2d(nn.Module):
    """Max pooling that keeps the arg-max's position in its window as one byte."""

    def __init__(self, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        if kernel_size * kernel_size > 256:
            raise ValueError("LeanMaxPool2d: window positions must fit in one byte")
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    @classmethod
    def from_module(cls, m: nn.MaxPool2d) -> LeanMaxPool2d:
        def one(v):
            if not isinstance(v, int):
                if len(set(v)) != 1:
                    raise ValueError(f"LeanMaxPool2d supports square windows only, not {v}")
                v = v[0]
            return int(v)

        if m.dilation not in (1, (1, 1)) or m.ceil_mode:
            raise ValueError("LeanMaxPool2d supports dilation 1 and floor mode only")
        return cls(one(m.kernel_size), one(m.stride), one(m.padding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.requires_grad:
            return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)
        return _MaxPoolFn.apply(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class GlobalAvgPool(nn.Module):
    """Global average pooling to N x C x 1 x 1 with ``mean``, which keeps no tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3), keepdim=True)


class _AvgPoolFn(Function):
    @staticmethod
    def forward(ctx, x, r):
        ctx.conf = (x.shape, r)
        return F.avg_pool2d(x, r, r)

    @staticmethod
    def backward(ctx, grad):
        shape, r = ctx.conf
        g = grad.repeat_interleave(r, dim=2).repeat_interleave(r, dim=3) / (r * r)
        ph, pw = shape[2] - g.shape[2], shape[3] - g.shape[3]
        if ph or pw:  # rows/columns that no window covered get no gradient
            g = F.pad(g, (0, pw, 0, ph))
        return g, None


class _AdaptiveAvgPoolFn(Function):
    @staticmethod
    def forward(ctx, x, size):
        ctx.shape = x.shape
        return F.adaptive_avg_pool2d(x, size)

    @staticmethod
    def backward(ctx, grad):
        # The kernel reads only the input's shape: an expanded one-element tensor stands in.
        shape_only = grad.new_empty(1).expand(ctx.shape)
        return torch.ops.aten._adaptive_avg_pool2d_backward(grad, shape_only), None


def lean_adaptive_avg_pool2d(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``adaptive_avg_pool2d(x, size)`` whose backward keeps nothing (stock keeps the input)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if not x.requires_grad:
        return F.adaptive_avg_pool2d(x, size)
    return _AdaptiveAvgPoolFn.apply(x, tuple(size))


def lean_avg_pool2d(x: torch.Tensor, r: int) -> torch.Tensor:
    """``avg_pool2d(x, r, r)`` whose backward keeps nothing (stock keeps the input)."""
    if r == 1:
        return x
    if not x.requires_grad:
        return F.avg_pool2d(x, r, r)
    return _AvgPoolFn.apply(x, r)
