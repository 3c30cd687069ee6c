"""DA3: Dynamic Additive Attention Adaption (Yang, Rakin, Fan; arXiv 2012.01362).

From the paper (abstract): the pretrained backbone is frozen for every domain; each domain
learns an *additive attention adaptor* designed so that training does not buffer the
backbone's activations, and the same module acts as a *dynamic gate* that cuts inference
compute. Everything below that is more specific is our reconstruction (the exact layers are
not published), documented in docs/methods.md.

For a frozen block ``y = act(F(x) + S(x))`` (ResNet) or ``y = F(x) + x`` (inverted residual):

    z = adaptive_avgpool(x)                    at the reduced resolution; keeps nothing
    u = relu(dw3x3(relu(conv1x1(z))))          hidden width h
    v = u * channel_att(GAP(u)) * spatial_att(u)
    A = upsample_nearest(conv1x1(v), out_hw)   last conv zero-initialised: A = 0 at start
    g = 1[sigmoid(w . GAP(z) + b) > 1/2]       one gate per sample and block (optional)
    y = act(g * F(x) + S(x) + A)

``A``'s gradient does not involve ``F(x)``; on the lean engine the frozen path keeps only
1-bit ReLU masks, and everything the adaptor keeps is at the pooled resolution. A closed
gate skips ``F`` (gates exist only where the shortcut is the identity). The gate's gradient
``<dL/dy, F(x)>`` needs ``F(x)``: gated blocks keep it in 8 bits (1 byte per element, with a
scale per sample and channel) during gate training, a cost the profiler counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from da3.backbones.base import Backbone, Block
from da3.errors import Da3Error
from da3.lean import lean_adaptive_avg_pool2d, share_clone
from da3.methods.base import (
    AdaptedModel,
    BackboneFeatures,
    ExportContext,
    FrozenBackbone,
    GateUsage,
    MethodConfig,
    new_head,
    register_method,
)


@dataclass
class DA3Config(MethodConfig):
    lr: float = field(default=3e-3, metadata={"help": "learning rate of adaptors, gates"})
    head_lr: float = field(default=3e-3, metadata={"help": "learning rate of the new head"})
    head_warmup: float = field(
        default=0.0,
        metadata={
            "help": "fraction of the training steps in which only the head learns (adaptors "
            "and gates wait, then follow the cosine decay from there); helps few-shot domains"
        },
    )
    head_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "number of first steps in which only the head learns (at most a third of "
            "the run; the longer of this and head_warmup counts), so the adaptors do not "
            "first learn through a random head; helps few-shot domains, costs domains far "
            "from the pretraining"
        },
    )
    blocks: str = field(
        default="auto",
        metadata={
            "help": "blocks that get an adaptor: 'all', 'auto' (from the first block whose "
            "output is at 1/16 of the input resolution or less: a short gradient path), "
            "'K-' (block K onwards), 'K-M', or a comma list"
        },
    )
    reduction: int = field(
        default=4, metadata={"help": "the adaptor runs at the block output resolution / this"}
    )
    min_size: int = field(default=4, metadata={"help": "... but never below this side (pixels)"})
    hidden_ratio: float = field(
        default=0.25, metadata={"help": "adaptor hidden width as a fraction of the block input"}
    )
    max_hidden: int = field(default=64, metadata={"help": "cap on the adaptor hidden width"})
    gates: bool = field(default=False, metadata={"help": "learn dynamic gates that skip blocks"})
    gate_target: float = field(
        default=0.7,
        metadata={"help": "fraction of the model's inference FLOPs the gates aim to execute"},
    )
    gate_weight: float = field(default=5.0, metadata={"help": "weight of the FLOP-budget loss"})
    gate_init: float = field(default=3.0, metadata={"help": "initial gate logit (open)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(
            reduction=self.reduction >= 1,
            min_size=self.min_size >= 1,
            hidden_ratio=self.hidden_ratio > 0,
            max_hidden=self.max_hidden >= 1,
            gate_target=0 < self.gate_target <= 1,
            gate_weight=self.gate_weight >= 0,
            gate_init=True,
            head_warmup=0 <= self.head_warmup < 1,
            head_warmup_steps=self.head_warmup_steps >= 0,
        )


def select_blocks(spec: str, backbone: Backbone, image_size: int = 224) -> list[int]:
    """Indices of the blocks that get an adaptor, from a ``blocks`` spec."""
    n = len(backbone.blocks)
    spec = spec.strip().lower()
    if spec == "all":
        return list(range(n))
    if spec == "auto":
        # Output resolution of each block, from the strides (stem included).
        with torch.no_grad():
            h = backbone.stem(_probe(backbone, 64)).shape[-1]
        for i, b in backbone.iter_blocks():
            h = -(-h // b.stride)
            if h * 16 <= 64:
                return list(range(i, n))
        return [n - 1]
    try:
        if spec.endswith("-"):
            chosen = list(range(int(spec[:-1]), n))
        elif "-" in spec:
            a, b = (int(t) for t in spec.split("-"))
            chosen = list(range(a, min(b, n) + 1))  # b past the last block: refused below
        else:
            chosen = sorted({int(t) for t in spec.split(",")})
    except ValueError:
        raise Da3Error(
            f"da3: blocks={spec!r} is not 'all', 'auto', 'K-', 'K-M' or a list"
        ) from None
    if not chosen or chosen[0] < 0 or chosen[-1] >= n:
        raise Da3Error(f"da3: blocks={spec!r} selects no valid block (the backbone has {n})")
    return chosen


class AdditiveAttentionAdaptor(nn.Module):
    """The additive attention branch ``A``, computed at the pooled resolution."""

    def __init__(self, c_in: int, c_out: int, hidden: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(c_in, hidden, 1)
        self.spatial_mix = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.channel_att = nn.Linear(hidden, hidden)
        self.spatial_att = nn.Conv2d(hidden, 1, 1)
        self.expand = nn.Conv2d(hidden, c_out, 1)
        nn.init.zeros_(self.expand.weight)  # A = 0: training starts from the pretrained net
        nn.init.zeros_(self.expand.bias)

    def forward(self, z: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
        u = F.relu(self.spatial_mix(F.relu(self.reduce(z))))
        ca = torch.sigmoid(self.channel_att(u.mean((2, 3))))[:, :, None, None]
        sa = torch.sigmoid(self.spatial_att(u))
        a = self.expand(u * ca * sa)
        if a.shape[-2:] != out_hw:
            a = F.interpolate(a, size=out_hw, mode="nearest")  # keeps nothing for backward
        return a


class _GateFn(Function):
    """``f * hard(g)`` with a straight-through gradient ``<dL/dy, f>`` for ``g``.

    ``f`` (the frozen branch's output) is kept for that inner product in 8 bits: int8 with
    one scale per sample and channel, 1 byte per element instead of 4. (Pooling ``f`` and the
    gradient before the product is cheaper but loses their fine-grained correlation: the
    estimate then often has the wrong sign on maps larger than a few pixels.)
    """

    @staticmethod
    def forward(ctx, f, g_soft):
        hard = (g_soft > 0.5).to(f.dtype)
        with torch.no_grad():
            scale = f.abs().amax((2, 3), keepdim=True).clamp_min(1e-12) / 127.0
            q = torch.round(f / scale).to(torch.int8)
        ctx.save_for_backward(hard, q, scale)
        return f * hard.view(-1, 1, 1, 1)

    @staticmethod
    def backward(ctx, grad):
        hard, q, scale = ctx.saved_tensors
        grad_f = grad * hard.view(-1, 1, 1, 1)
        grad_g = (grad * (q.to(grad.dtype) * scale)).sum((1, 2, 3))
        return grad_f, grad_g


class DA3Block(nn.Module):
    """A frozen (lean) block with its additive attention adaptor and optional gate."""

    def __init__(self, block: Block, config: DA3Config, gated: bool) -> None:
        super().__init__()
        self.block = block
        hidden = max(8, min(config.max_hidden, round(block.in_channels * config.hidden_ratio)))
        self.adaptor = AdditiveAttentionAdaptor(block.in_channels, block.out_channels, hidden)
        self.reduction, self.min_size = config.reduction, config.min_size
        self.gate = None
        if gated:
            self.gate = nn.Linear(block.in_channels, 1)
            nn.init.zeros_(self.gate.weight)
            nn.init.constant_(self.gate.bias, config.gate_init)
        self.branch_flops = 0.0  # set by the builder, for the budget
        self.last_gate: torch.Tensor | None = None  # soft gates of the last forward
        self.usage: tuple[GateUsage, int] | None = None  # (counter, this branch's index)

    def _out_hw(self, x: torch.Tensor) -> tuple[int, int]:
        s = self.block.stride
        return -(-x.shape[-2] // s), -(-x.shape[-1] // s)

    def adaptor_size(self, out_hw: tuple[int, int]) -> tuple[int, int]:
        """The adaptor's resolution: the block output's / ``reduction``, but at least
        ``min_size`` a side (and never more than the output itself)."""
        return tuple(min(s, max(self.min_size, -(-s // self.reduction))) for s in out_hw)

    def side(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The adaptor's output ``A`` and the soft gates ``g`` (``None`` without a gate), both
        from the pooled input; everything of the block but its frozen branch and shortcut
        (da3.export rebuilds the block around it)."""
        out_hw = self._out_hw(x)
        z = lean_adaptive_avg_pool2d(x, self.adaptor_size(out_hw))
        a = self.adaptor(z, out_hw)
        g = None if self.gate is None else torch.sigmoid(self.gate(z.mean((2, 3)))).squeeze(1)
        return a, g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.side(x)
        s = self.block.forward_shortcut(x)
        if g is None:
            y = self.block.branch(x)
        else:
            self.last_gate = g
            if self.training:
                y = _GateFn.apply(self.block.branch(x), g)
            else:
                y = self._gated_inference(x, g)
        if s is not None:
            y += s  # in place: y is the branch's (or the gate's) fresh output
        y += a
        return self.block.act(y)

    def _gated_inference(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Run the frozen branch only for the samples whose gate is open."""
        open_ = g > 0.5
        if self.usage is not None:
            counter, branch = self.usage
            counter.add(branch, int(open_.sum()), len(open_))
        if bool(open_.all()):
            return self.block.branch(x)
        out = torch.zeros(
            x.shape[0], self.block.out_channels, *self._out_hw(x), dtype=x.dtype, device=x.device
        )
        if bool(open_.any()):
            idx = open_.nonzero().squeeze(1)
            out[idx] = self.block.branch(x[idx])
        return out

    def export_form(self, ctx: ExportContext) -> nn.Module:
        """This block in an exported model (see :mod:`da3.export`): as it is without a gate;
        with one, the branch computed and multiplied by the hard gate (``static``) or run
        only when the gate opens (``dynamic``: an ONNX ``If`` / scripted control flow)."""
        if self.gate is None:
            return self
        if self.block.shortcut_kind != "identity":  # da3 gates no other block
            raise Da3Error(f"gated block: {self.block.shortcut_kind} shortcut")
        out_chw = tuple(self.block.branch(ctx.example).shape[1:])
        if ctx.gates == "static":
            return _StaticGatedBlock(self)
        if ctx.fmt == "onnx":
            return _CondGatedBlock(self, out_chw)
        return _script_gated(self, ctx.example, list(out_chw))


class DA3Model(AdaptedModel):
    """Adds the FLOP-budget loss of the gates to the training loss."""

    config: DA3Config

    def gated_blocks(self) -> list[DA3Block]:
        return [m for m in self.modules() if isinstance(m, DA3Block) and m.gate is not None]

    def count_gates(self) -> GateUsage | None:
        blocks = self.gated_blocks()
        if not blocks:
            return None

        def detach() -> None:
            for b in blocks:
                b.usage = None

        usage = GateUsage([b.branch_flops for b in blocks], detach=detach)
        for i, b in enumerate(blocks):
            b.usage = (usage, i)
        return usage

    def batch_coupling(self) -> str | None:
        if self.gated_blocks():
            return "the gates' FLOP budget is a function of each micro-batch's mean gate"
        return None

    def auxiliary_loss(self) -> torch.Tensor | None:
        blocks = self.gated_blocks()
        if not blocks or not self.training or blocks[0].last_gate is None:
            return None
        skipped = sum(b.branch_flops * (1 - b.last_gate.mean()) for b in blocks)
        executed = 1.0 - skipped  # fraction of the model's FLOPs, in expectation
        return self.config.gate_weight * F.relu(executed - self.config.gate_target) ** 2


def _probe(backbone: Backbone, image_size: int) -> torch.Tensor:
    """A zero image on the backbone's device, in its (float) dtype."""
    tensors = [*backbone.buffers(), *backbone.parameters()]
    t = next((t for t in tensors if t.is_floating_point() and t.element_size() >= 4), tensors[0])
    return torch.zeros(1, 3, image_size, image_size, dtype=t.dtype, device=t.device)


def _branch_flop_fractions(backbone: Backbone, blocks: list[int], image_size: int = 64) -> dict:
    """Each chosen block's branch FLOPs as a fraction of the whole network's."""
    # imported here: the FLOP counter costs ~80 MiB of resident memory (it pulls in torch's
    # decompositions), which a run without gates does not pay
    from torch.utils.flop_counter import FlopCounterMode

    x = _probe(backbone, image_size)
    with torch.no_grad():
        total = FlopCounterMode(display=False)
        with total:
            backbone(x)
        fractions, h = {}, backbone.stem(x)
        for i, b in backbone.iter_blocks():
            if i in blocks:
                c = FlopCounterMode(display=False)
                with c:
                    b.branch(h)
                fractions[i] = c.get_total_flops() / total.get_total_flops()
            h = b(h)
    return fractions


@register_method("da3", DA3Config, "dynamic additive attention adaptors (+ gates), lean engine")
def build(frozen: FrozenBackbone, num_classes: int, config: DA3Config) -> DA3Model:
    backbone = share_clone(frozen.lean)
    chosen = select_blocks(config.blocks, backbone)
    gated = {i for i in chosen if backbone.blocks[i].shortcut_kind == "identity"}
    fractions = _branch_flop_fractions(frozen.lean, sorted(gated)) if config.gates else {}
    for i in chosen:
        wrapped = DA3Block(backbone.blocks[i], config, gated=config.gates and i in gated)
        wrapped.branch_flops = fractions.get(i, 0.0)
        backbone.blocks[i] = wrapped
    model = DA3Model(
        BackboneFeatures(backbone), new_head(frozen.feature_dim, num_classes), frozen, "da3"
    )
    model.config = config
    return model


# ---------------------------------------------------------------------------------------
# the export forms of a gated block (DA3Block.export_form)


class _Side(nn.Module):
    """A gated block's adaptor output and hard gate decision (1 open, 0 closed) per sample."""

    def __init__(self, block: DA3Block) -> None:
        super().__init__()
        self.block = block  # only its adaptor and gate run here

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, g = self.block.side(x)
        return a, (g > 0.5).to(x.dtype).view(-1, 1, 1, 1)


class _StaticGatedBlock(nn.Module):
    """``act(F(x) * open + x + A)``: the frozen branch always runs."""

    def __init__(self, block: DA3Block) -> None:
        super().__init__()
        self.side, self.branch, self.act = _Side(block), block.block.branch, block.block.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, open_ = self.side(x)
        # The order of PyTorch's sums ((F + shortcut) + A), so that the logits agree closely.
        y = self.branch(x) * open_ + x
        return self.act(y + a)


class _CondGatedBlock(nn.Module):
    """The same with ``torch.cond``: an ONNX ``If`` whose true branch is the frozen branch."""

    def __init__(self, block: DA3Block, out_chw: tuple[int, int, int]) -> None:
        super().__init__()
        self.side, self.branch, self.act = _Side(block), block.block.branch, block.block.act
        self.out_chw = out_chw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, open_ = self.side(x)
        y = torch.cond(open_.sum() > 0, self._run, self._skip, (x, open_))
        return self.act(y + x + a)

    def _run(self, x: torch.Tensor, open_: torch.Tensor) -> torch.Tensor:
        return self.branch(x) * open_

    def _skip(self, x: torch.Tensor, open_: torch.Tensor) -> torch.Tensor:
        return x.new_zeros((x.shape[0], *self.out_chw))


class _ScriptGatedBlock(nn.Module):
    """The same for TorchScript: scripted control flow around traced pieces."""

    def __init__(self, side: nn.Module, branch: nn.Module, act: nn.Module, out_chw: list[int]):
        super().__init__()
        self.side, self.branch, self.act = side, branch, act
        self.out_chw = out_chw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, open_ = self.side(x)
        if bool(open_.sum() > 0):
            y = self.branch(x) * open_
        else:
            y = x.new_zeros([x.shape[0]] + self.out_chw)
        return self.act(y + x + a)


def _script_gated(block: DA3Block, x: torch.Tensor, out_chw: list[int]) -> nn.Module:
    # (the exporter calls export_form with torch's warnings and progress lines silenced)
    side = torch.jit.trace(_Side(block), x, check_trace=False)
    branch = torch.jit.trace(block.block.branch, x, check_trace=False)
    act = torch.jit.trace(block.block.act, branch(x), check_trace=False)
    return torch.jit.script(_ScriptGatedBlock(side, branch, act, out_chw))


#
