"""``piggyback``: a learned binary mask over every frozen convolution weight (Mallya, Davis,
Lazebnik; ECCV 2018) + a new head.

From the paper: the pretrained weights ``W`` stay fixed; each task learns real-valued scores
``s`` of ``W``'s shape, thresholded into a binary mask ``m = 1[s > t]``; the layer computes
with ``W * m``. Scores start at 1e-2 above a threshold of 5e-3 (every bit 1: the network
starts as the pretrained one). The threshold's gradient is taken as the identity (straight
through), so ``dL/ds = dL/dm = dL/d(W*m) * W``. A task stores one bit per weight.

The paper also learns each task's batch-norm parameters on networks that have them; here
every masked convolution learns a per-channel shift (its batch norm's beta, added to the
folded bias; ``shift_lr``), its scale stays frozen. Without it, training on this project's
backbones can collapse: the scores that one sign of gradient pushes down all reach the
threshold within a few steps (AdamW moves each by about the learning rate a step), thousands
of bits turn off within five steps, the frozen batch-norm statistics no longer fit, and the
loss goes to chance and stays there (``benchmarks/piggyback_collapse.py``). With a learned
shift the network recovers from that step. The shift's gradient needs nothing kept (a sum
of the output gradient), so it costs no memory for backward.

Our choices: the masks cover every convolution of the backbone (stem, blocks, shortcuts,
neck), whose eval-mode batch norm is folded into the weight as on the lean engine. Masking
the folded weight ``W * a`` (``a`` one scale per output channel) computes the same function
as masking ``W`` then applying the batch norm, and gives the same mask gradient: ``a``
multiplies both ``dL/d(W*m)`` of the unfolded layer and ``W``, so either way the product is
``dL/d((W*a)*m) * (W*a)``. Batch norm stays frozen.

Memory: a mask's gradient needs the convolution's input, so every masked convolution keeps
its input (that is the method's real cost); the input gradient needs the masked weight,
recomputed in backward from the scores and the frozen weight, which exist anyway. ReLUs and
max-pools stay lean (bits, bytes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from da3.backbones.base import same_padding
from da3.errors import Da3Error
from da3.lean import LeanConv2d, dequantize_weight, pack_bits, share_clone, unpack_bits
from da3.methods.base import (
    AdaptedModel,
    BackboneFeatures,
    FrozenBackbone,
    MethodConfig,
    new_head,
    register_method,
)


@dataclass
class PiggybackConfig(MethodConfig):
    # The paper: Adam at 1e-4 for 30 epochs. In our 5 short epochs 1e-4 barely flips a bit
    # (a score must move by 5e-3, Adam moves it by at most lr a step); 4e-4 and more flip bits
    # so fast that training collapses. Measurements in docs/methods.md.
    lr: float = field(default=2e-4, metadata={"help": "learning rate of the mask scores"})
    head_lr: float = field(default=3e-3, metadata={"help": "learning rate of the new head"})
    score_init: float = field(
        default=1e-2, metadata={"help": "initial value of every score (above threshold: bit 1)"}
    )
    threshold: float = field(
        default=5e-3, metadata={"help": "a mask bit is 1 where its score is above this"}
    )
    shift_lr: float = field(
        default=1e-3,
        metadata={
            "help": "learning rate of every masked convolution's per-channel shift (its batch "
            "norm's beta, learned per domain; 0: frozen, masks alone)"
        },
    )

    # Results and domain files from before shift_lr existed trained no shift.
    legacy = {"shift_lr": 0.0}

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(
            score_init=self.score_init > self.threshold, threshold=True, shift_lr=self.shift_lr >= 0
        )


class _MaskedConv2dFn(Function):
    """Convolution with ``weight * 1[scores > threshold]``, straight-through to the scores.

    Keeps the input ``x`` (unpadded), the scores and the weight; the latter two are the
    model's own tensors, so only ``x`` costs memory.
    """

    @staticmethod
    def forward(
        ctx, x, scores, weight, scale, bias, threshold, pad, stride, padding, dilation, groups
    ):
        # the weight as stored (8/16 bits too), turned into float here and again in backward
        ctx.save_for_backward(x, scores, weight, scale)
        ctx.conf = (threshold, pad, stride, padding, dilation, groups)
        xp = F.pad(x, pad) if any(pad) else x
        w = dequantize_weight(weight, scale, x.dtype) * (scores > threshold)
        return F.conv2d(xp, w, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, scores, weight, scale = ctx.saved_tensors
        threshold, pad, stride, padding, dilation, groups = ctx.conf
        weight = dequantize_weight(weight, scale, x.dtype)
        xp = F.pad(x, pad) if any(pad) else x
        grad_x = grad_scores = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = weight * (scores > threshold)
            grad_xp = torch.nn.grad.conv2d_input(
                xp.shape, w, grad, stride, padding, dilation, groups
            )
            left, right, top, bottom = pad
            h, wd = grad_xp.shape[-2:]
            grad_x = grad_xp[..., top : h - bottom, left : wd - right]
        if ctx.needs_input_grad[1]:
            grad_w = torch.nn.grad.conv2d_weight(
                xp, weight.shape, grad, stride, padding, dilation, groups
            )
            grad_scores = grad_w * weight  # d(W*m)/dm = W; the threshold passes straight
        if ctx.needs_input_grad[4]:
            grad_bias = grad.sum((0, 2, 3))
        return grad_x, grad_scores, None, None, grad_bias, None, None, None, None, None, None


class MaskedConv2d(nn.Module):
    """A frozen lean convolution whose weight is masked by the domain's binary mask.

    ``weight`` and ``bias`` are the shared lean convolution's own tensors (batch norm folded
    in); ``scores`` (the weight's shape) is the domain's, trained, and so is ``shift`` (one
    per output channel, added to the frozen bias) when ``train_shift``.
    """

    # Tells da3.memory.analytical_floor_bytes that this layer's trainable tensor (the scores)
    # needs the layer's input for its gradient.
    grad_needs_input = True

    def __init__(
        self, conv: LeanConv2d, score_init: float, threshold: float, train_shift: bool = False
    ) -> None:
        super().__init__()
        self.register_buffer("weight", conv.weight)  # as stored: float32, float16 or int8
        self.register_buffer("weight_scale", conv.weight_scale)
        self.register_buffer("bias", conv.bias.detach())
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups, self.same_pad = conv.dilation, conv.groups, conv.same_pad
        self.score_init, self.threshold = score_init, threshold
        self.scores = nn.Parameter(conv.bias.new_full(conv.weight.shape, score_init))
        self.shift = nn.Parameter(torch.zeros_like(self.bias)) if train_shift else None

    def _bias(self) -> torch.Tensor:
        return self.bias if self.shift is None else self.bias + self.shift

    def mask(self) -> torch.Tensor:
        return self.scores.detach() > self.threshold

    def packed_mask(self) -> torch.Tensor:
        """The mask, 1 bit per weight (uint8, 8 per byte)."""
        return pack_bits(self.mask())

    @torch.no_grad()
    def set_mask(self, packed: torch.Tensor) -> None:
        """Scores that give the mask ``packed`` (bits from :meth:`packed_mask`)."""
        bits = unpack_bits(packed.to(self.scores.device), self.scores.shape)
        # 1 bits sit at the initial score, 0 bits as far below the threshold.
        off = 2 * self.threshold - self.score_init
        self.scores.copy_(torch.where(bits, self.score_init, off))

    def _pad(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        if not self.same_pad:
            return (0, 0, 0, 0)
        kh, kw = self.weight.shape[-2:]
        top, bottom = same_padding(x.shape[-2], kh, self.stride[0])
        left, right = same_padding(x.shape[-1], kw, self.stride[1])
        return (left, right, top, bottom)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self._pad(x)
        bias = self._bias()
        grads = x.requires_grad or bias.requires_grad or self.scores.requires_grad
        if torch.is_grad_enabled() and grads:
            return _MaskedConv2dFn.apply(
                x,
                self.scores,
                self.weight,
                self.weight_scale,
                bias,
                self.threshold,
                pad,
                self.stride,
                self.padding,
                self.dilation,
                self.groups,
            )
        w = dequantize_weight(self.weight, self.weight_scale, x.dtype) * self.mask()
        xp = F.pad(x, pad) if any(pad) else x
        return F.conv2d(xp, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        o, i, kh, kw = self.weight.shape
        return (
            f"{i * self.groups}, {o}, kernel_size={(kh, kw)}, stride={self.stride}, "
            f"groups={self.groups}, threshold={self.threshold}"
        )


def mask_convolutions(module: nn.Module, config: PiggybackConfig) -> int:
    """Replace every LeanConv2d under ``module`` by a MaskedConv2d; returns how many."""
    n = 0
    for name, child in module.named_children():
        if isinstance(child, LeanConv2d):
            masked = MaskedConv2d(child, config.score_init, config.threshold, config.shift_lr > 0)
            setattr(module, name, masked)
            n += 1
        else:
            n += mask_convolutions(child, config)
    return n


class PiggybackModel(AdaptedModel):
    """Stores each mask as bits (``NAME.mask``, uint8) instead of its float scores.

    :meth:`training_state` (checkpoints) keeps the scores themselves, so that an interrupted
    run resumes exactly; :meth:`domain_state` is what a domain file holds.
    """

    def masked_convs(self) -> dict[str, MaskedConv2d]:
        return {n: m for n, m in self.named_modules() if isinstance(m, MaskedConv2d)}

    def param_lrs(self, config: PiggybackConfig) -> list[tuple[list[nn.Parameter], float]]:
        shifts = [m.shift for m in self.masked_convs().values() if m.shift is not None]
        return [(shifts, config.shift_lr)] if shifts else []

    def training_state(self) -> dict[str, torch.Tensor]:
        return AdaptedModel.domain_state(self)

    @torch.no_grad()
    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.training_state()
        if set(own) != set(state):
            diff = sorted(set(own) ^ set(state))
            raise Da3Error(f"training state does not fit the piggyback model ({diff[:3]})")
        for k, t in own.items():
            if t.shape != state[k].shape:
                raise Da3Error(f"training state {k}: shape {tuple(state[k].shape)} != {t.shape}")
        for k, t in own.items():
            t.copy_(state[k])

    def domain_state(self) -> dict[str, torch.Tensor]:
        state = {
            k: v for k, v in AdaptedModel.domain_state(self).items() if not k.endswith(".scores")
        }
        for name, m in self.masked_convs().items():
            state[f"{name}.mask"] = m.packed_mask()
        return state

    @torch.no_grad()
    def load_domain_state(self, state: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
        convs = self.masked_convs()
        for name in convs:
            t = state.get(f"{name}.mask")
            if t is not None and t.dtype != torch.uint8:
                raise Da3Error(f"domain state {name}.mask: dtype {t.dtype} is not uint8 bits")
        # Checks every key and shape, copies the head; the masks are set below.
        missing = super().load_domain_state(state, strict)
        for name, m in convs.items():
            if f"{name}.mask" in state:
                m.set_mask(state[f"{name}.mask"])
        return missing


@register_method("piggyback", PiggybackConfig, "binary masks over frozen conv weights + head")
def build(frozen: FrozenBackbone, num_classes: int, config: PiggybackConfig) -> AdaptedModel:
    backbone = share_clone(frozen.lean)
    for part in (backbone.stem, backbone.blocks, backbone.neck):
        mask_convolutions(part, config)
    return PiggybackModel(
        BackboneFeatures(backbone), new_head(frozen.feature_dim, num_classes), frozen, "piggyback"
    )
