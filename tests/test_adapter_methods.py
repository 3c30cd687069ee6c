"""The comparison methods ``piggyback``, ``series_adapter`` and ``parallel_adapter``.

1. What they keep for backward equals a figure derived from the architecture (shapes of the
   stock network's convolutions, activations and pools): piggyback keeps every convolution's
   input, the adapters every adapted convolution's output and the adapters' inputs; ReLUs
   1 bit, max-pools 1 byte.
2. Their gradients equal a reference written with the STOCK frozen network (batch norm not
   folded) in float64: piggyback's straight-through mask gradient on the raw weights, the
   adapters as plain PyTorch ops, the parallel adapter as a change of the kernel's centre tap.
3. Piggyback's domain file: 1 bit per weight, bit-identical outputs after reloading; its
   checkpoints keep the float scores; its default learning rate flips bits within a few steps.
4. The adapters start as the pretrained network (lean and stock).
"""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from da3.backbones import create_backbone
from da3.backbones.efficientnet_lite import Conv2dSame
from da3.domains import DomainStore, MultiDomainModel
from da3.errors import Da3Error
from da3.io import read_json, read_tensors, write_json, write_tensors
from da3.lean import LeanConv2d
from da3.memory import analytical_floor_bytes, saved_activation_bytes
from da3.methods import FrozenBackbone, build_model, make_config
from da3.methods.adapters import AdaptedConv
from da3.methods.piggyback import MaskedConv2d, PiggybackModel
from da3.train import TrainConfig, fit, make_optimizer, train_step
from test_methods import CLASSES, frozen_backbone, frozen_backbone64, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

ADAPTERS = ["series_adapter", "parallel_adapter"]
METHODS = ["piggyback", *ADAPTERS]


def stock_convs(stock: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Every convolution of a stock backbone with the batch norm that follows it (in module
    order they alternate), the classifier excluded."""
    mods = [m for m in stock.modules() if isinstance(m, nn.Conv2d | nn.BatchNorm2d)]
    pairs = list(zip(mods[::2], mods[1::2], strict=True))
    assert all(isinstance(c, nn.Conv2d) and isinstance(b, nn.BatchNorm2d) for c, b in pairs)
    return pairs


def wrappers(model, kind) -> list:
    return [m for m in model.modules() if isinstance(m, kind)]


# ---------------------------------------------------------------------------------------
# 1. bytes kept for backward


def architecture(stock: nn.Module, x: torch.Tensor) -> dict:
    """Per stock convolution its input (storage id, bytes) and output bytes; 1-bit masks of
    every ReLU output; 1 byte per max-pool output. From one stock forward, with every
    tensor held alive so that storages are not reused."""
    alive, convs = [], []
    masks = pools = 0

    def conv_hook(m, a, out):
        alive.extend([a[0], out])
        convs.append((a[0].untyped_storage().data_ptr(), a[0].nbytes, out.nbytes))

    def act_hook(m, a, out):
        nonlocal masks
        masks += math.ceil(out.numel() / 8)

    def pool_hook(m, a, out):
        nonlocal pools
        pools += out.numel()

    hooks = []
    for m in stock.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.ReLU | nn.ReLU6):
            hooks.append(m.register_forward_hook(act_hook))
        elif isinstance(m, nn.MaxPool2d):
            hooks.append(m.register_forward_hook(pool_hook))
    try:
        with torch.no_grad():
            stock.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    return {"convs": convs, "masks": masks, "pools": pools}


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_saved_activations_equal_the_architecture_figure(backbone):
    frozen = FrozenBackbone(create_backbone(backbone, "none"))
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 2])
    arch = architecture(frozen.stock, x)
    assert arch["masks"] > 0 and len(arch["convs"]) > 10

    def kept(method):
        torch.manual_seed(0)
        model = build_model(method, frozen, CLASSES).train()
        step = lambda: F.cross_entropy(model(x), y)  # noqa: E731
        return model, saved_activation_bytes(model, step, exclude=frozen.stock)

    _, head = kept("linear")  # the head's input and the loss: the same for every method
    _, finetune = kept("finetune")
    lean_floor = arch["masks"] + arch["pools"] + head
    inputs = {ptr: nbytes for ptr, nbytes, _ in arch["convs"]}  # a block input counts once
    outputs = sum(out for _, _, out in arch["convs"])
    results = {}
    for method in METHODS:
        model, got = kept(method)
        if method == "piggyback":
            # every convolution's input, nothing else but the lean masks and the head
            expected = sum(inputs.values()) + lean_floor
        else:
            # every convolution's output (the domain's scale), plus each adapter's input:
            # the output again (series) or the frozen convolution's input (parallel)
            kinds = [w.kind for w in wrappers(model, AdaptedConv)]
            assert len(kinds) == len(arch["convs"]) and any(kinds)
            series, parallel = 0, {}
            for kind, (ptr, nbytes, out) in zip(kinds, arch["convs"], strict=True):
                if kind == "series":
                    series += out
                elif kind == "parallel":
                    parallel[ptr] = nbytes
            expected = outputs + series + sum(parallel.values()) + lean_floor
        assert got == expected, (method, got, expected)
        assert analytical_floor_bytes(model, x) <= got
        results[method] = got
    # Measured (48 px, batch 2): finetune / piggyback ~2.9, / series ~1.4 (resnet18) to
    # 2.7 (lite0), / parallel ~1.3 to 1.9: none of them is cheap, as the issue expects.
    assert all(finetune > v for v in results.values()), (finetune, results)


# ---------------------------------------------------------------------------------------
# 2. gradients against the stock network


class _StockFeatures(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone.forward_features(x)


def _grad_setup(backbone: str, method: str):
    frozen = frozen_backbone64(backbone)
    torch.manual_seed(0)
    model = build_model(method, frozen, CLASSES, make_config(method)).double().train()
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    return frozen, model, x, torch.tensor([0, 2])


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_piggyback_gradients_equal_stock_straight_through_reference(backbone):
    frozen, model, x, y = _grad_setup(backbone, "piggyback")
    masked = wrappers(model, MaskedConv2d)
    pairs = stock_convs(frozen.stock)
    assert len(masked) == len(pairs)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # about 10% of the bits 0, scores spread around the threshold
        for m in masked:
            m.scores.copy_(m.threshold + (torch.rand(m.scores.shape, generator=g) - 0.1) * 0.05)
            m.shift.copy_(torch.randn(m.shift.shape, generator=g, dtype=m.shift.dtype) * 0.1)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()

    # The reference: stock convolutions (raw weights, batch norm after them) whose weight is
    # W * m, with m = 1[s > t] and the straight-through d m / d s = 1; the shift adds to the
    # batch norm's beta.
    scores = [m.scores.detach().clone().requires_grad_(True) for m in masked]
    shifts = [m.shift.detach().clone().requires_grad_(True) for m in masked]
    names = {id(c): n for n, c in frozen.stock.named_modules()}
    weights = {}
    for s, b, m, (conv, bn) in zip(scores, shifts, masked, pairs, strict=True):
        assert conv.weight.shape == s.shape
        hard = (s > m.threshold).to(s.dtype)
        weights[f"backbone.{names[id(conv)]}.weight"] = conv.weight * (hard + s - s.detach())
        weights[f"backbone.{names[id(bn)]}.bias"] = bn.bias + b
    head = nn.Linear(frozen.feature_dim, CLASSES).double()
    head.load_state_dict(model.head.state_dict())
    feats = torch.func.functional_call(_StockFeatures(frozen.stock), weights, (x,))
    F.cross_entropy(head(feats), y).backward()

    with torch.no_grad():
        assert rel_err(model.features(x), feats) < 1e-10
    zeros = sum(int((~m.mask()).sum()) for m in masked)
    assert zeros > 0.05 * sum(m.scores.numel() for m in masked)
    for i, (m, s) in enumerate(zip(masked, scores, strict=True)):
        assert float(s.grad.norm()) > 0, i
        # measured in float64: ~1e-14
        assert rel_err(m.scores.grad, s.grad) < 1e-9, (i, rel_err(m.scores.grad, s.grad))
    for i, (m, b) in enumerate(zip(masked, shifts, strict=True)):
        assert float(b.grad.norm()) > 0, i
        assert rel_err(m.shift.grad, b.grad) < 1e-9, (i, rel_err(m.shift.grad, b.grad))
    assert rel_err(model.head.weight.grad, head.weight.grad) < 1e-9


@pytest.mark.parametrize("size", [16, 15])
def test_piggyback_score_gradient_is_masked_weight_gradient_times_weight(size):
    """One TF-"same" strided convolution (asymmetric padding): the scores' gradient is the
    weight gradient of the same convolution at the masked weight, times the weight."""
    torch.manual_seed(0)
    stock = Conv2dSame(6, 8, 5, 2, bias=False).double()
    conv = MaskedConv2d(LeanConv2d.from_conv(stock), 1e-2, 5e-3)
    with torch.no_grad():
        conv.scores.copy_(torch.where(torch.rand(conv.scores.shape) < 0.3, 0.0, 1e-2))
    x = torch.randn(2, 6, size, size, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 8, math.ceil(size / 2), math.ceil(size / 2), dtype=torch.float64)
    conv(x).backward(grad_out)

    ref = Conv2dSame(6, 8, 5, 2, bias=False).double()
    with torch.no_grad():
        ref.weight.copy_(stock.weight * conv.mask())
    x_ref = x.detach().clone().requires_grad_(True)
    ref(x_ref).backward(grad_out)
    assert rel_err(conv.scores.grad, ref.weight.grad * stock.weight) < 1e-12
    assert rel_err(x.grad, x_ref.grad) < 1e-12


def _adapter_reference(frozen, model, x):
    """The adapted network written with the stock convolutions and batch norms, and plain
    ops; returns (features, [(gamma, beta, adapter weight or None)] as leaf tensors)."""
    wrapped = wrappers(model, AdaptedConv)
    pairs = stock_convs(frozen.stock)
    assert len(wrapped) == len(pairs)
    params, inputs, hooks = [], {}, []
    for w, (conv, bn) in zip(wrapped, pairs, strict=True):
        gamma = w.dbn.weight.detach().clone().requires_grad_(True)
        beta = w.dbn.bias.detach().clone().requires_grad_(True)
        a = None if w.adapter is None else w.adapter.weight.detach().clone().requires_grad_(True)
        params.append((gamma, beta, a))

        def pre(m, args, conv=conv):
            inputs[conv] = args[0]

        def post(m, args, z, conv=conv, kind=w.kind, gamma=gamma, beta=beta, a=a):
            if kind == "series":
                z = z + F.conv2d(z, a)
            elif kind == "parallel":
                kh, kw = conv.kernel_size  # the adapter is the kernel's centre tap
                centre = F.pad(a, (kw // 2, kw // 2, kh // 2, kh // 2))
                z = z + torch.func.functional_call(conv, {"weight": centre}, (inputs[conv],))
            return gamma.view(1, -1, 1, 1) * z + beta.view(1, -1, 1, 1)

        hooks += [conv.register_forward_pre_hook(pre), bn.register_forward_hook(post)]
    try:
        feats = frozen.stock.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    return feats, params


@pytest.mark.parametrize("method", ADAPTERS)
@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_adapter_gradients_equal_stock_reference(backbone, method):
    frozen, model, x, y = _grad_setup(backbone, method)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():  # away from the identity start, so that every path matters
        for w in wrappers(model, AdaptedConv):
            w.dbn.weight.copy_(1 + 0.1 * torch.randn(w.dbn.weight.shape, generator=g))
            w.dbn.bias.copy_(0.1 * torch.randn(w.dbn.bias.shape, generator=g))
            if w.adapter is not None:
                w.adapter.weight.copy_(0.05 * torch.randn(w.adapter.weight.shape, generator=g))
    F.cross_entropy(model(x), y).backward()
    feats, params = _adapter_reference(frozen, model, x)
    head = nn.Linear(frozen.feature_dim, CLASSES).double()
    head.load_state_dict(model.head.state_dict())
    F.cross_entropy(head(feats), y).backward()

    with torch.no_grad():
        assert rel_err(model.features(x), feats) < 1e-10
    wrapped = wrappers(model, AdaptedConv)
    assert sum(w.adapter is not None for w in wrapped) >= 8
    for i, (w, (gamma, beta, a)) in enumerate(zip(wrapped, params, strict=True)):
        mine = [w.dbn.weight, w.dbn.bias] + ([] if a is None else [w.adapter.weight])
        ref = [gamma, beta] + ([] if a is None else [a])
        for p, q in zip(mine, ref, strict=True):
            assert float(q.grad.norm()) > 0, i
            # measured in float64: ~1e-15
            assert rel_err(p.grad, q.grad) < 1e-9, (i, rel_err(p.grad, q.grad))
    assert rel_err(model.head.weight.grad, head.weight.grad) < 1e-9


@pytest.mark.parametrize("size", [32, 31, 30, 29])
def test_parallel_adapter_is_a_centre_tap_change(size):
    """Beside every spatial convolution (torchvision padding, TF "same" padding with stride
    2, depthwise), the parallel adapter adds exactly what adding its weight to the frozen
    kernel's centre tap adds, at even and odd sizes."""
    checked = 0
    for backbone in ["resnet18", "efficientnet_lite0"]:
        frozen = frozen_backbone(backbone)
        model = build_model("parallel_adapter", frozen, CLASSES)
        for w in wrappers(model, AdaptedConv):
            if w.kind != "parallel":
                continue
            conv = w.conv
            x = torch.randn(2, conv.in_channels, size, size)
            with torch.no_grad():
                w.adapter.weight.copy_(torch.randn(w.adapter.weight.shape))
                kh, kw = conv.weight.shape[-2:]
                merged = conv.weight.clone()
                merged[:, :, kh // 2, kw // 2] += w.adapter.weight[:, :, 0, 0]
                ref = LeanConv2d(
                    merged,
                    conv.bias,
                    conv.stride,
                    conv.padding,
                    conv.dilation,
                    conv.groups,
                    same_pad=conv.same_pad,
                )
                assert rel_err(w(x), ref(x)) < 1e-5
            checked += 1
    assert checked >= 16


# ---------------------------------------------------------------------------------------
# 3. piggyback's domain file and training


def random_masks(model, seed: int = 3, zeros: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in wrappers(model, MaskedConv2d):
            m.scores.copy_(torch.where(torch.rand(m.scores.shape, generator=g) < zeros, 0, 2e-2))
            if m.shift is not None:
                m.shift.copy_(torch.randn(m.shift.shape, generator=g) * 0.1)


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_piggyback_file_holds_one_bit_per_weight_and_reloads_bit_identically(backbone, tmp_path):
    frozen = frozen_backbone(backbone)
    torch.manual_seed(0)
    model = build_model("piggyback", frozen, CLASSES).eval()
    assert isinstance(model, PiggybackModel)
    random_masks(model)
    state = model.domain_state()
    masked = {n: m for n, m in model.named_modules() if isinstance(m, MaskedConv2d)}
    conv_weights = sum(c.weight.numel() for c, _ in stock_convs(frozen.stock))
    assert sum(m.weight.numel() for m in masked.values()) == conv_weights
    assert set(state) == {f"{n}.{k}" for n in masked for k in ("mask", "shift")} | {
        "head.weight",
        "head.bias",
    }
    for n, m in masked.items():
        assert state[f"{n}.mask"].dtype == torch.uint8
        assert state[f"{n}.mask"].numel() == math.ceil(m.weight.numel() / 8)
        assert state[f"{n}.shift"].shape == (m.weight.shape[0],)
    mask_bytes = sum(v.nbytes for k, v in state.items() if k.endswith(".mask"))
    assert mask_bytes < conv_weights / 8 + len(masked)  # 1 bit per weight, rounded per layer
    shift_bytes = sum(4 * m.weight.shape[0] for m in masked.values())  # one float per channel
    path = tmp_path / "d.safetensors"
    write_tensors(path, state)
    head_bytes = 4 * (frozen.feature_dim + 1) * CLASSES
    assert path.stat().st_size < mask_bytes + shift_bytes + head_bytes + 40_000

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    fresh = build_model("piggyback", frozen, CLASSES).eval()
    with torch.no_grad():
        expected = model(x)
        assert not torch.equal(fresh(x), expected)
        fresh.load_domain_state(read_tensors(path))
        assert torch.equal(fresh(x), expected)
    for a, b in zip(wrappers(fresh, MaskedConv2d), wrappers(model, MaskedConv2d), strict=True):
        assert torch.equal(a.mask(), b.mask())

    bad = dict(state)
    name = next(iter(masked))
    bad[f"{name}.mask"] = bad[f"{name}.mask"].float()
    with pytest.raises(Da3Error, match="uint8"):
        fresh.load_domain_state(bad)
    bad[f"{name}.mask"] = state[f"{name}.mask"][:-1]
    with pytest.raises(Da3Error, match="shape"):
        fresh.load_domain_state(bad)


def test_piggyback_checkpoint_keeps_the_scores(tmp_path):
    """A checkpoint must resume exactly: it holds the float scores, not the bits."""
    frozen = frozen_backbone("resnet18")
    torch.manual_seed(0)
    model = build_model("piggyback", frozen, CLASSES)
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (8, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.arange(8) % CLASSES
    cfg = make_config("piggyback")
    train = TrainConfig(epochs=1, batch_size=4, augment=False)
    fit(
        model,
        images,
        labels,
        images,
        labels,
        frozen.stock.preprocess,
        cfg,
        train,
        run_dir=tmp_path,
        progress=False,
    )
    tensors = read_tensors(tmp_path / "checkpoint.safetensors")
    best = read_tensors(tmp_path / read_json(tmp_path / "checkpoint.json")["best_file"])
    for n, m in model.named_modules():
        if isinstance(m, MaskedConv2d):
            assert torch.equal(tensors[f"model.{n}.scores"], m.scores.detach())
            assert f"model.{n}.mask" not in tensors
            assert f"{n}.mask" in best  # the best epoch's deployable state
    assert any(
        not torch.equal(m.scores, torch.full_like(m.scores, cfg.score_init))
        for m in wrappers(model, MaskedConv2d)
    )
    torch.manual_seed(1)
    again = build_model("piggyback", frozen, CLASSES)
    again.load_training_state(
        {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    )
    for a, b in zip(wrappers(again, MaskedConv2d), wrappers(model, MaskedConv2d), strict=True):
        assert torch.equal(a.scores, b.scores)


def test_piggyback_default_learning_rate_flips_bits_in_a_few_steps():
    frozen = frozen_backbone("efficientnet_lite0")
    torch.manual_seed(0)
    model = build_model("piggyback", frozen, CLASSES).train()
    optimizer = make_optimizer(model, make_config("piggyback"))
    g = torch.Generator().manual_seed(8)
    x = torch.randn(16, 3, 32, 32, generator=g)
    y = torch.randint(0, CLASSES, (16,), generator=g)
    # AdamW moves a score by about lr (2e-4) a step: a bit flips after 25 steps or more the
    # same way (measured: the first flips at ~30 steps, ~400 of 3.3 M bits off at 40)
    for _ in range(40):
        train_step(model, optimizer, x, y)
    masks = [m.mask() for m in wrappers(model, MaskedConv2d)]
    flipped = sum(int((~m).sum()) for m in masks)
    assert 0 < flipped < 0.01 * sum(m.numel() for m in masks)


def test_piggyback_config_is_checked():
    with pytest.raises(Da3Error, match="score_init"):
        make_config("piggyback", {"score_init": 1e-3, "threshold": 5e-3})
    with pytest.raises(Da3Error, match="shift_lr"):
        make_config("piggyback", {"shift_lr": -1e-3})


def test_piggyback_shift_learns_at_its_own_rate_and_can_be_off():
    frozen = frozen_backbone("resnet18")
    model = build_model("piggyback", frozen, CLASSES)
    cfg = make_config("piggyback")
    groups = make_optimizer(model, cfg).param_groups
    shifts = {id(m.shift) for m in wrappers(model, MaskedConv2d)}
    scores = {id(m.scores) for m in wrappers(model, MaskedConv2d)}
    assert [g["lr"] for g in groups] == [cfg.lr, cfg.shift_lr, cfg.head_lr]
    assert {id(p) for p in groups[0]["params"]} == scores
    assert {id(p) for p in groups[1]["params"]} == shifts
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in model.head.parameters()}
    # shift_lr=0: the masks alone, as before the shift existed (no shift in the domain state)
    off = build_model("piggyback", frozen, CLASSES, make_config("piggyback", {"shift_lr": 0}))
    assert all(m.shift is None for m in wrappers(off, MaskedConv2d))
    assert not any(k.endswith(".shift") for k in off.domain_state())
    assert len(make_optimizer(off, make_config("piggyback", {"shift_lr": 0})).param_groups) == 2


def test_piggyback_file_from_before_the_shift_loads_as_masks_alone(tmp_path):
    """A domain file written before ``shift_lr`` existed (its config has no such key, its
    state no shifts) loads as what it was: masks alone (PiggybackConfig.legacy)."""
    backbone = create_backbone("resnet18", "none")
    old = MultiDomainModel(backbone)
    cfg = asdict(make_config("piggyback", {"shift_lr": 0}))
    d = old.add_domain("old", ["a", "b", "c"], "piggyback", cfg, image_size=32)
    random_masks(d.model)
    store = DomainStore(tmp_path)
    old.save("old", store)
    meta = read_json(store.paths("old")[1])
    meta["config"].pop("shift_lr")  # as the file was written then
    write_json(store.paths("old")[1], meta)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    new = MultiDomainModel(backbone)
    loaded = new.load("old", store)
    assert loaded.config.shift_lr == 0
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(x), d.model.eval()(x))


# ---------------------------------------------------------------------------------------
# 4. the adapters start as the pretrained network


@pytest.mark.parametrize("method", ADAPTERS)
@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_adapters_start_as_the_pretrained_network(backbone, method):
    frozen = frozen_backbone(backbone)
    torch.manual_seed(0)
    model = build_model(method, frozen, CLASSES).eval()
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        feats = model.features(x)
        assert torch.equal(feats, frozen.lean.forward_features(x))  # exactly, in fact
        # the lean network folds batch norm: float32 rounding, measured ~3e-5 on lite0
        assert rel_err(feats, frozen.stock.forward_features(x)) < 1e-4
