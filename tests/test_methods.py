"""Every adaptation method on every backbone, and the DA3 method's own promises.

1. Table-driven over ``list_methods() x list_backbones()`` (random weights, 32 px, batch 2):
   one training step changes the domain's tensors and never the shared frozen backbone;
   ``domain_state`` holds the domain's tensors only and round-trips through a file; each
   method starts from the pretrained function where it is meant to.
2. DA3's dynamic gates at inference: a closed gate really skips the frozen branch (FLOPs
   counted), computes ``act(shortcut(x) + A)``; open gates compute the ungated model; a batch
   mixing open and closed samples equals the samples run one by one.
3. DA3's gradients against a reference written here with stock PyTorch modules.
4. What DA3 keeps for backward, against a bound derived from the architecture.
5. ``parse_config`` / ``make_config``.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from conftest import calibrate_bn
from da3.backbones import create_backbone, list_backbones
from da3.errors import Da3Error
from da3.io import read_tensors, write_tensors
from da3.lean import LeanConv2d, LeanReLU
from da3.memory import saved_activation_bytes
from da3.methods import (
    FrozenBackbone,
    build_model,
    get_method,
    list_methods,
    make_config,
    parse_config,
)
from da3.methods.da3 import DA3Block
from da3.train import make_optimizer, train_step

METHODS = list_methods()
BACKBONES = list_backbones()
SIZE, BATCH, CLASSES = 32, 2, 3


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


_FROZEN: dict[str, FrozenBackbone] = {}


def calibrated(backbone: nn.Module, size: int = SIZE) -> nn.Module:
    """A random network whose features depend on the input (conftest.calibrate_bn)."""
    x = torch.rand(16, 3, size, size, generator=torch.Generator().manual_seed(2)) * 4 - 2
    return calibrate_bn(backbone, x)


def frozen_backbone(name: str) -> FrozenBackbone:
    """A calibrated random-weights backbone, shared (frozen) by the tests of this module, as a
    domain store shares it between domains."""
    if name not in _FROZEN:
        torch.manual_seed(1234)
        _FROZEN[name] = FrozenBackbone(calibrated(create_backbone(name, "none")))
    return _FROZEN[name]


def frozen_tensors(frozen: FrozenBackbone) -> dict[str, torch.Tensor]:
    """Clones of every parameter and buffer of the stock and the lean backbone."""
    out = {}
    for tag, module in (("stock", frozen.stock), ("lean", frozen.lean)):
        for k, v in module.named_parameters():
            out[f"{tag}.param.{k}"] = v.detach().clone()
        for k, v in module.named_buffers():
            out[f"{tag}.buffer.{k}"] = v.detach().clone()
    return out


def frozen_storages(frozen: FrozenBackbone) -> set[int]:
    ts = [*frozen.stock.parameters(), *frozen.stock.buffers()]
    ts += [*frozen.lean.parameters(), *frozen.lean.buffers()]
    return {t.untyped_storage().data_ptr() for t in ts}


def numel(module: nn.Module) -> int:
    return sum(t.numel() for t in [*module.parameters(), *module.buffers()])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def da3_blocks(model) -> dict[int, DA3Block]:
    return {i: b for i, b in enumerate(model.features.backbone.blocks) if isinstance(b, DA3Block)}


def randomise_adaptors(model, seed: int = 3, scale: float = 0.1) -> None:
    """Non-zero ``expand`` convolutions, so that the adaptors change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in da3_blocks(model).values():
            for p in (b.adaptor.expand.weight, b.adaptor.expand.bias):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def adaptor_sizes(model, x: torch.Tensor) -> dict[int, tuple[int, int]]:
    """The resolution each DA3 adaptor really runs at (read off its input), so that the
    references below pool the block input to the same size."""
    seen: dict[int, tuple[int, int]] = {}
    hooks = [
        b.adaptor.register_forward_pre_hook(
            lambda m, a, i=i: seen.__setitem__(i, tuple(a[0].shape[-2:]))
        )
        for i, b in da3_blocks(model).items()
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def output_sides(model, x: torch.Tensor) -> dict[int, int]:
    """The output side of each DA3 block."""
    sides: dict[int, int] = {}
    hooks = [
        b.register_forward_hook(lambda m, a, out, i=i: sides.__setitem__(i, out.shape[-1]))
        for i, b in da3_blocks(model).items()
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return sides


def out_hw(x: torch.Tensor, stride: int) -> tuple[int, int]:
    return -(-x.shape[-2] // stride), -(-x.shape[-1] // stride)


def pooled(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Average pooling of ``x`` to ``size`` with stock PyTorch (equal windows: the tests use
    power-of-two inputs)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    assert x.shape[-2] % size[0] == 0 and x.shape[-1] % size[1] == 0, (x.shape, size)
    return F.adaptive_avg_pool2d(x, size)


# ---------------------------------------------------------------------------------------
# 1. every method x every backbone


# What each known method may keep as its own (besides the head). A method added later is
# checked by the storage rule only (nothing of the shared backbone) until it is listed here.
OWN_KEYS = {
    "linear": lambda k: False,
    "bias": lambda k: k.endswith(".bias"),
    "da3": lambda k: ".adaptor." in k or ".gate." in k,
    "tinytl": lambda k: ".lite." in k or k.endswith(".bias"),
    "udta": lambda k: k.startswith(("features.side.", "features.side_out.")),
    "piggyback": lambda k: k.endswith((".mask", ".shift")),
    "series_adapter": lambda k: ".dbn." in k or ".adapter." in k,
    "parallel_adapter": lambda k: ".dbn." in k or ".adapter." in k,
    "finetune": lambda k: True,
}
# Methods whose new modules start at zero: before training they compute the lean backbone.
STARTS_AS_LEAN = {
    "linear",
    "bias",
    "da3",
    "tinytl",
    "udta",
    "piggyback",
    "series_adapter",
    "parallel_adapter",
}


def _own_key(method: str, key: str) -> bool:
    """Whether ``key`` may be in ``method``'s domain state (by what the method trains)."""
    return key.startswith("head.") or OWN_KEYS.get(method, lambda k: True)(key)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("method", METHODS)
def test_method_trains_only_its_own_tensors(method, backbone, tmp_path):
    frozen = frozen_backbone(backbone)
    config = make_config(method)
    torch.manual_seed(0)
    model = build_model(method, frozen, CLASSES, config)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
    y = torch.tensor([0, 2])

    # Starts from the pretrained function where the method is meant to.
    model.eval()
    with torch.no_grad():
        feats = model.features(x)
        lean = frozen.lean.forward_features(x)
        stock = frozen.stock.forward_features(x)
    assert feats.shape == (BATCH, frozen.feature_dim)
    if method == "finetune":
        assert torch.equal(feats, stock)
    elif method in STARTS_AS_LEAN:
        assert rel_err(feats, lean) < 1e-5
    spread = float((feats[0] - feats[1]).abs().max())
    assert spread > 1e-2 * float(feats.abs().max()), "features do not depend on the input"

    # The domain's state: nothing of the shared backbone, far smaller than it where the
    # method trains little, and exactly the tensors the method trains.
    state = model.domain_state()
    shared = frozen_storages(frozen)
    assert not any(v.untyped_storage().data_ptr() in shared for v in state.values())
    assert all(_own_key(method, k) for k in state), sorted(state)[:5]
    # (training_state: what the domain trains, where it stores a reduced form of it, as
    # piggyback stores mask bits for its scores; the reload below checks that form)
    trained = model.training_state()
    trainable = {id(p) for p in model.trainable_parameters()}
    own_params = {id(p) for k, p in model.named_parameters() if k in trained}
    assert trainable <= own_params, "a trainable parameter is not part of the domain state"
    head = frozen.feature_dim * CLASSES + CLASSES
    total = sum(v.numel() for v in state.values())
    backbone_numel = numel(frozen.stock)
    if method == "linear":
        assert total == head
    elif method == "bias":
        conv_biases = sum(
            m.out_channels for m in frozen.lean.modules() if isinstance(m, LeanConv2d)
        )
        assert total == head + conv_biases
    elif method == "da3":
        assert total < 0.2 * backbone_numel, (total, backbone_numel)
        assert all(isinstance(b, DA3Block) for b in da3_blocks(model).values())
        assert da3_blocks(model), "da3 put no adaptor anywhere"
    elif method == "finetune":  # a whole copy of the backbone (less its classifier) + head
        assert total == backbone_numel - numel(frozen.stock.classifier) + head
    else:
        assert total < backbone_numel, (total, backbone_numel)

    # One training step.
    before_frozen = frozen_tensors(frozen)
    before_own = {k: v.detach().clone() for k, v in trained.items()}
    model.train()
    optimizer = make_optimizer(model, config)
    loss, logits = train_step(model, optimizer, x, y)
    assert torch.isfinite(loss) and logits.shape == (BATCH, CLASSES)
    after_own = model.training_state()
    changed = {k for k in before_own if not torch.equal(before_own[k], after_own[k])}
    assert any(k.startswith("head.") for k in changed)
    if method != "linear":
        assert any(not k.startswith("head.") for k in changed), "only the head trained"
    after_frozen = frozen_tensors(frozen)
    assert before_frozen.keys() == after_frozen.keys()
    touched = [k for k in before_frozen if not torch.equal(before_frozen[k], after_frozen[k])]
    assert not touched, f"the shared frozen backbone changed: {touched[:5]}"

    # Save / reload: a fresh model of the same method (other init) gets the same function.
    path = tmp_path / "state.safetensors"
    write_tensors(path, model.domain_state())
    torch.manual_seed(99)
    fresh = build_model(method, frozen, CLASSES, config).eval()
    model.eval()
    with torch.no_grad():
        expected = model(x)
        assert not torch.equal(fresh(x), expected)
        fresh.load_domain_state(read_tensors(path))
        assert torch.equal(fresh(x), expected)


def test_load_domain_state_refuses_another_method_state():
    frozen = frozen_backbone("resnet18")
    da3 = build_model("da3", frozen, CLASSES)
    bias = build_model("bias", frozen, CLASSES)
    with pytest.raises(Da3Error, match="does not fit"):
        bias.load_domain_state(da3.domain_state())
    other_classes = build_model("bias", frozen, CLASSES + 1)
    with pytest.raises(Da3Error, match="shape"):
        bias.load_domain_state(other_classes.domain_state())


# ---------------------------------------------------------------------------------------
# 2. DA3 gates at inference


def gated_model(seed: int = 0):
    frozen = frozen_backbone("efficientnet_lite0")
    torch.manual_seed(seed)
    cfg = make_config("da3", {"gates": True, "blocks": "all"})
    model = build_model("da3", frozen, CLASSES, cfg)
    randomise_adaptors(model)
    return frozen, model.eval()


def gated(model) -> dict[int, DA3Block]:
    return {i: b for i, b in da3_blocks(model).items() if b.gate is not None}


def set_gates(model, bias: float) -> None:
    with torch.no_grad():
        for b in gated(model).values():
            b.gate.weight.zero_()
            b.gate.bias.fill_(bias)


def flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def reference_forward(model, x: torch.Tensor, sizes: dict, closed: bool):
    """The DA3 model's function written out from its parts: closed gates skip the branch."""
    bb = model.features.backbone
    h = bb.stem(x)
    for i, blk in enumerate(bb.blocks):
        if not isinstance(blk, DA3Block):
            h = blk(h)
            continue
        inner = blk.block
        a = blk.adaptor(pooled(h, sizes[i]), out_hw(h, inner.stride))
        s = inner.forward_shortcut(h)
        y = a if s is None else s + a
        if not (closed and blk.gate is not None):
            y = inner.branch(h) + y
        h = inner.act(y)
    h = bb.neck(h)
    return model.head(torch.flatten(bb.pool(h), 1))


def test_da3_closed_gates_skip_the_frozen_branch():
    frozen, model = gated_model()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    blocks = gated(model)
    assert len(blocks) >= 5  # efficientnet_lite0: every identity-shortcut block

    set_gates(model, 20.0)
    open_flops = flops(lambda: model(x))
    set_gates(model, -20.0)
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        b.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
        for i, b in blocks.items()
    ]
    with torch.no_grad():
        closed_out = model(x)
    for h in hooks:
        h.remove()
    closed_flops = flops(lambda: model(x))
    assert all(bool((b.last_gate < 0.5).all()) for b in blocks.values())
    branch_flops = sum(flops(lambda b=b, i=i: b.block.branch(inputs[i])) for i, b in blocks.items())
    assert branch_flops > 0
    assert open_flops - closed_flops >= branch_flops, (open_flops, closed_flops, branch_flops)

    sizes = adaptor_sizes(model, x)
    with torch.no_grad():
        expected_closed = reference_forward(model, x, sizes, closed=True)
        expected_open = reference_forward(model, x, sizes, closed=False)
    assert rel_err(closed_out, expected_closed) < 1e-5
    assert rel_err(expected_closed, expected_open) > 1e-3  # skipping really changes things


def test_da3_open_gates_equal_the_ungated_model():
    frozen, model = gated_model()
    set_gates(model, 20.0)
    torch.manual_seed(7)
    plain = build_model("da3", frozen, CLASSES, make_config("da3", {"blocks": "all"})).eval()
    assert not any(b.gate is not None for b in da3_blocks(plain).values())
    for i, b in da3_blocks(model).items():
        da3_blocks(plain)[i].adaptor.load_state_dict(b.adaptor.state_dict())
    plain.head.load_state_dict(model.head.state_dict())
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        a, b = model(x), plain(x)
    assert rel_err(a, b) < 1e-6


def split_gates(model, x: torch.Tensor, seed: int = 0) -> None:
    """Gate weights, block by block, that open the gate for half of the batch: which half
    depends on the input (a random direction of the pooled block input)."""
    g = torch.Generator().manual_seed(seed)
    for b in gated(model).values():
        seen = {}
        hook = b.gate.register_forward_pre_hook(lambda m, a, seen=seen: seen.__setitem__("f", a[0]))
        with torch.no_grad():
            model(x)
        hook.remove()
        f = seen["f"]
        w = torch.randn(f.shape[1], generator=g)
        s = (f @ w).sort().values
        half = len(s) // 2
        threshold, gap = (s[half - 1] + s[half]) / 2, (s[half] - s[half - 1]) / 2
        assert gap > 0
        scale = 6.0 / float(gap)  # the decision has a margin of sigmoid(+-6)
        with torch.no_grad():
            b.gate.weight.copy_(w.view(1, -1) * scale)
            b.gate.bias.fill_(-float(threshold) * scale)


def test_da3_mixed_gates_equal_samples_run_alone():
    frozen, model = gated_model()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    split_gates(model, x)
    with torch.no_grad():
        out = model(x)
    decisions = torch.stack([b.last_gate > 0.5 for b in gated(model).values()])  # blocks x N
    assert bool(decisions.any()) and not bool(decisions.all())
    mixed = [bool(row.any()) and not bool(row.all()) for row in decisions]
    assert sum(mixed) >= 3, decisions
    for n in range(len(x)):
        with torch.no_grad():
            alone = model(x[n : n + 1])
        alone_decisions = torch.stack([b.last_gate > 0.5 for b in gated(model).values()])
        assert torch.equal(alone_decisions[:, 0], decisions[:, n])
        assert rel_err(out[n : n + 1], alone) < 1e-4, n  # batch 4 vs batch 1: rounding only
    # and each sample equals the written-out reference with its own gate pattern
    sizes = adaptor_sizes(model, x)
    for n in range(len(x)):
        with torch.no_grad():
            closed = reference_forward(model, x[n : n + 1], sizes, closed=True)
            opened = reference_forward(model, x[n : n + 1], sizes, closed=False)
        if bool(decisions[:, n].all()):
            assert rel_err(out[n : n + 1], opened) < 1e-4, n
        if not bool(decisions[:, n].any()):
            assert rel_err(out[n : n + 1], closed) < 1e-4, n


# ---------------------------------------------------------------------------------------
# 3. DA3 gradients against stock PyTorch


def stock_reference(frozen, model, x, sizes):
    """DA3 written with the STOCK (non-lean) frozen blocks and copies of the domain's
    modules; gates (if any) use the exact straight-through estimator on the full F(x)."""
    adaptors = nn.ModuleDict(
        {str(i): copy.deepcopy(b.adaptor) for i, b in da3_blocks(model).items()}
    )
    gates = nn.ModuleDict(
        {str(i): copy.deepcopy(b.gate) for i, b in da3_blocks(model).items() if b.gate is not None}
    )
    head = copy.deepcopy(model.head)
    stock = frozen.stock
    h = stock.stem(x)
    for i, blk in enumerate(stock.blocks):
        if str(i) not in adaptors:
            h = blk(h)
            continue
        z = pooled(h, sizes[i])
        a = adaptors[str(i)](z, out_hw(h, blk.stride))
        f = blk.branch(h)
        if str(i) in gates:
            soft = torch.sigmoid(gates[str(i)](z.mean((2, 3)))).squeeze(1)
            hard = (soft > 0.5).to(f.dtype)
            f = f * (soft + (hard - soft).detach()).view(-1, 1, 1, 1)  # exact STE
        s = blk.shortcut(h) if blk.shortcut is not None else 0
        h = blk.act(f + s + a)
    h = stock.neck(h)
    return head(torch.flatten(stock.pool(h), 1)), adaptors, gates, head


_FROZEN64: dict[str, FrozenBackbone] = {}


def frozen_backbone64(name: str) -> FrozenBackbone:
    """The calibrated backbone in float64. Gradients are compared in float64: in float32 the
    lean and the stock forward differ by ~1e-6, which flips the odd ReLU whose input is that
    close to 0, and one flipped unit of a 512-channel layer moves the gradient reaching the
    earlier blocks by ~1% (measured on resnet18: 1 flip of 4096 -> 1e-2)."""
    if name not in _FROZEN64:
        torch.manual_seed(1234)
        _FROZEN64[name] = FrozenBackbone(calibrated(create_backbone(name, "none")).double())
    return _FROZEN64[name]


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet18"])
def test_da3_adaptor_gradients_equal_stock_reference(backbone):
    frozen = frozen_backbone64(backbone)
    torch.manual_seed(0)
    model = build_model("da3", frozen, CLASSES, make_config("da3", {"blocks": "all"})).double()
    randomise_adaptors(model)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 64, 64, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2])
    sizes = adaptor_sizes(model, x)
    sides = output_sides(model, x)
    assert any(sizes[i][0] < sides[i] for i in sizes)  # some adaptors run at reduced resolution
    model.train()
    F.cross_entropy(model(x), y).backward()
    ref, adaptors, _, head = stock_reference(frozen, model, x, sizes)
    F.cross_entropy(ref, y).backward()
    for i, b in da3_blocks(model).items():
        for (name, p), q in zip(
            b.adaptor.named_parameters(), adaptors[str(i)].parameters(), strict=True
        ):
            assert q.grad is not None and float(q.grad.norm()) > 0, (i, name)
            # measured in float64: ~1e-12 (lite0), ~1e-13 (resnet18)
            assert rel_err(p.grad, q.grad) < 1e-8, (i, name, rel_err(p.grad, q.grad))
    assert rel_err(model.head.weight.grad, head.weight.grad) < 1e-8


@pytest.mark.parametrize("cfg", [{}, {"blocks": "all", "gates": True}], ids=["auto", "gates"])
def test_da3_builds_on_a_float64_backbone(cfg):
    frozen = frozen_backbone64("resnet18")
    model = build_model("da3", frozen, CLASSES, make_config("da3", cfg)).double()
    model(torch.randn(1, 3, 32, 32, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_da3_builds_on_a_cuda_backbone():
    frozen = FrozenBackbone(create_backbone("resnet18", "none").cuda())
    model = build_model("da3", frozen, CLASSES).cuda()
    model(torch.randn(1, 3, 32, 32, device="cuda"))


def gate_gradients(backbone: str, seed: int = 4):
    """Per gated block: (output side, the model's gate gradient, the exact STE gradient)."""
    frozen = frozen_backbone(backbone)
    torch.manual_seed(0)
    cfg = make_config("da3", {"blocks": "all", "gates": True})
    model = build_model("da3", frozen, CLASSES, cfg)
    randomise_adaptors(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in gated(model).values():
            b.gate.weight.copy_(torch.randn(b.gate.weight.shape, generator=g) * 0.01)
    x = torch.randn(4, 3, 64, 64, generator=g)
    y = torch.tensor([0, 2, 1, 0])
    sizes = adaptor_sizes(model, x)
    sides = output_sides(model, x)
    model.train()
    F.cross_entropy(model(x), y).backward()
    ref, _, gates, _ = stock_reference(frozen, model, x, sizes)
    F.cross_entropy(ref, y).backward()

    def flat(q):
        return torch.cat([q.weight.grad.flatten(), q.bias.grad])

    return {i: (sides[i], flat(b.gate), flat(gates[str(i)])) for i, b in gated(model).items()}


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_da3_gate_gradient_is_exact_on_small_maps(backbone):
    """Where the block output is at most 4 x 4 nothing is pooled: the gate gradient is the
    straight-through gradient of the full F(x) (float32: cosine, not equality)."""
    grads = gate_gradients(backbone)
    small = {i: v for i, v in grads.items() if v[0] <= 4}
    assert len(small) >= 2
    for i, (_, mine, exact) in small.items():
        assert float(exact.norm()) > 0
        assert F.cosine_similarity(mine, exact, dim=0) > 0.99, i
    mine = torch.cat([v[1] for v in grads.values()])
    exact = torch.cat([v[2] for v in grads.values()])
    assert F.cosine_similarity(mine, exact, dim=0) > 0.9


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_da3_gate_gradient_approximates_the_exact_ste_on_large_maps(backbone):
    cosines = {}
    for seed in range(6):
        for i, (side, mine, exact) in gate_gradients(backbone, seed).items():
            if side > 4:
                cosines[(seed, i)] = float(F.cosine_similarity(mine, exact, dim=0))
    assert cosines
    assert min(cosines.values()) > 0.9, cosines


# ---------------------------------------------------------------------------------------
# 4. what DA3 keeps for backward


def test_da3_saved_activations_within_architecture_bound():
    torch.manual_seed(0)
    frozen = FrozenBackbone(create_backbone("efficientnet_lite0", "none"))
    batch, size = 4, 64
    model = build_model("da3", frozen, CLASSES).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.tensor([0, 1, 2, 0])
    bb = model.features.backbone
    first = min(da3_blocks(model))

    # Shapes from the architecture (forward hooks, no memory accounting involved).
    relu_numels: list[int] = []
    z_shapes: dict[int, torch.Size] = {}
    hooks = []
    relus = [m for b in list(bb.blocks)[first:] for m in b.modules()] + list(bb.neck.modules())
    for m in relus:
        if isinstance(m, LeanReLU | nn.ReLU | nn.ReLU6):
            hooks.append(m.register_forward_hook(lambda m, a, out: relu_numels.append(out.numel())))
    for i, b in da3_blocks(model).items():
        hooks.append(
            b.adaptor.register_forward_pre_hook(
                lambda m, a, i=i: z_shapes.__setitem__(i, a[0].shape)
            )
        )
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert relu_numels and z_shapes
    masks = sum(math.ceil(n / 8) for n in relu_numels)  # 1 bit per ReLU6 output element
    adaptors = 0
    for i, z in z_shapes.items():
        b = da3_blocks(model)[i]
        hidden, c_in = b.adaptor.reduce.out_channels, b.block.in_channels
        # z, and a handful of hidden-width maps, all at the pooled resolution; plus the
        # per-sample channel attention vectors
        adaptors += 4 * (hidden + c_in) * z[-2] * z[-1] * 4 * batch + 2 * hidden * 4 * batch
    head = frozen.feature_dim * 4 * batch + 2 * CLASSES * 4 * batch  # head input, softmax
    bound = masks + adaptors + head

    kept = saved_activation_bytes(model, lambda: F.cross_entropy(model(x), y), exclude=frozen.stock)
    assert 0 < kept <= bound, (kept, bound)

    finetune = build_model("finetune", frozen, CLASSES).train()
    kept_finetune = saved_activation_bytes(
        finetune, lambda: F.cross_entropy(finetune(x), y), exclude=frozen.stock
    )
    # Measured: da3 ~0.47 MB, finetune ~26.7 MB at 64 px, batch 4 (ratio ~56).
    assert kept_finetune / kept > 20, (kept_finetune, kept)


# ---------------------------------------------------------------------------------------
# 5. configs


def test_parse_config_unknown_key_is_named():
    with pytest.raises(Da3Error, match="'reductoin'"):
        parse_config("da3", {"reductoin": "2"})
    with pytest.raises(Da3Error, match="'nope'"):
        make_config("linear", {"nope": 1})
    with pytest.raises(Da3Error, match="unknown method"):
        make_config("no-such-method")


@pytest.mark.parametrize(
    "key, value",
    [
        ("lr", "abc"),
        ("lr", True),
        ("reduction", "1.5"),
        ("reduction", "abc"),
        ("reduction", 2.5),
        ("reduction", True),
        ("gates", "maybe"),
        ("gates", "2"),
        ("gates", 1.0),
    ],
)
def test_parse_config_wrong_type(key, value):
    with pytest.raises(Da3Error, match=key):
        parse_config("da3", {key: value})


def test_parse_config_coerces_strings():
    c = parse_config(
        "da3",
        {"lr": "0.01", "reduction": "3", "gates": "true", "blocks": "2-", "weight_decay": "1e-4"},
    )
    assert c.lr == 0.01 and isinstance(c.lr, float)
    assert c.reduction == 3 and isinstance(c.reduction, int)
    assert c.gates is True
    assert c.blocks == "2-"
    assert c.weight_decay == 1e-4
    for text, value in [("FALSE", False), ("0", False), ("off", False), ("Yes", True)]:
        assert parse_config("da3", {"gates": text}).gates is value
    assert parse_config("da3", {"reduction": 4.0}).reduction == 4  # JSON may give 4.0
    assert parse_config("da3", {"lr": 1}).lr == 1.0  # YAML may give an int


@pytest.mark.parametrize("method", METHODS)
def test_config_round_trips_through_strings_and_json(method):
    """What a domain file stores (asdict -> JSON) and what the command line gives (strings)
    both rebuild the same config."""
    default = make_config(method)
    assert default == get_method(method).config_class()
    assert parse_config(method, dataclasses.asdict(default)) == default
    as_text = {k: str(v) for k, v in dataclasses.asdict(default).items()}
    assert parse_config(method, as_text) == default


def test_da3_blocks_spec():
    frozen = frozen_backbone("resnet18")
    n = len(frozen.lean.blocks)
    for spec, expected in [
        ("all", range(n)),
        ("5-", range(5, n)),
        ("1-3", [1, 2, 3]),
        ("0,7", [0, 7]),
    ]:
        model = build_model("da3", frozen, CLASSES, make_config("da3", {"blocks": spec}))
        assert sorted(da3_blocks(model)) == list(expected), spec
    for bad in ["x", "9-", "3-99", "-1"]:
        with pytest.raises(Da3Error, match="blocks"):
            build_model("da3", frozen, CLASSES, make_config("da3", {"blocks": bad}))
