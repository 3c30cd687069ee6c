"""Frozen weights stored in 16 and 8 bits (issue #17), end to end.

1. the storage: int8 symmetric per output channel (range, scale, rounding bound), float16;
2. every backbone's lean convolutions at 16 and 8 bits against a stock convolution with the
   dequantized weight (forward, input gradient, bias gradient), and whole backbones against
   the float32 lean backbone carrying the dequantized weights;
3. the bytes the frozen weights take per precision (exact, from the architecture), and the
   bytes autograd keeps (the same at every precision: the float copy is never kept);
4. every method trains at 8 bits; a domain trained at 8 bits saves, loads (at 8 bits the same
   logits, at 32 bits allowed and noted), evaluates and exports to ONNX with int8 weights;
5. bad values of ``--frozen-bits`` are one-line errors everywhere they are taken.
"""

from __future__ import annotations

import json

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import cli, one_error_line, randomise_bn
from da3.backbones import create_backbone, list_backbones
from da3.errors import Da3Error
from da3.lean import LeanConv2d, dequantize_weight, quantize_weight, to_lean
from da3.memory import saved_activation_bytes
from da3.methods import FrozenBackbone, build_model, list_methods, make_config
from da3.train import make_optimizer, train_step
from da3.training import TrainSettings

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

ALL = list_backbones()
TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------
# 1. storage


def test_int8_is_symmetric_per_output_channel_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = (
        torch.randn(6, 4, 3, 3, generator=g)
        * torch.tensor([1e-3, 0.1, 1, 10, 100, 0])[:, None, None, None]
    )
    q, scale = quantize_weight(w, 8)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (6,)
    assert scale.dtype == torch.float32
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    # each non-zero channel's largest |w| maps to exactly +-127; a zero channel gets scale 1
    assert (q[:5].abs().amax((1, 2, 3)) == 127).all() and float(scale[5]) == 1.0
    assert (q[5] == 0).all()
    back = dequantize_weight(q, scale)
    assert back.dtype == torch.float32
    err = (back - w).abs().amax((1, 2, 3))
    assert (err <= scale / 2 * (1 + 1e-6)).all()  # rounding to the nearest step


def test_float16_and_32_storage():
    w = torch.randn(3, 2, 1, 1)
    h, none = quantize_weight(w, 16)
    assert h.dtype == torch.float16 and none is None
    assert torch.equal(dequantize_weight(h, None), w.half().float())
    same, none = quantize_weight(w, 32)
    assert same is w and none is None and dequantize_weight(w, None) is w
    with pytest.raises(ValueError, match="float16"):
        quantize_weight(w * 1e6, 16)
    with pytest.raises(ValueError, match="32, 16 or 8"):
        quantize_weight(w, 4)


# ---------------------------------------------------------------------------------------
# 2. numerics against a stock convolution with the dequantized weight


def _conv_kinds(backbone) -> list[LeanConv2d]:
    """One lean convolution of each kind in ``backbone`` (kernel, stride, grouping, padding)."""
    kinds = {}
    for m in backbone.modules():
        if isinstance(m, LeanConv2d):
            key = (tuple(m.weight.shape[-2:]), m.stride, m.groups > 1, m.same_pad, m.padding)
            kinds.setdefault(key, m)
    return list(kinds.values())


@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("name", ALL)
def test_every_conv_kind_matches_stock_with_dequantized_weight(name, bits):
    lean = to_lean(randomise_bn(create_backbone(name, "none")))
    kinds = _conv_kinds(lean)
    assert len(kinds) >= 3
    g = torch.Generator().manual_seed(1)
    for conv in kinds:
        small = conv.stored_in(bits)
        assert small.bits == bits and small.weight.element_size() == bits // 8
        w = small.float_weight()
        stock = nn.Conv2d(
            conv.in_channels, conv.out_channels, tuple(w.shape[-2:]), conv.stride,
            conv.padding, conv.dilation, conv.groups,
        )  # fmt: skip
        with torch.no_grad():
            stock.weight.copy_(w)
            stock.bias.copy_(conv.bias)
        from da3.backbones.base import pad_same

        def ref(x, stock=stock, conv=conv):
            if conv.same_pad:
                x = pad_same(x, tuple(conv.weight.shape[-2:]), conv.stride)
            return stock(x)

        x = torch.randn(2, conv.in_channels, 11, 11, generator=g)
        up = None
        for fn in (ref, small):
            xi = x.clone().requires_grad_(True)
            y = fn(xi)
            up = (
                torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
                if up is None
                else up
            )
            (gx,) = torch.autograd.grad(y, xi, up)
            if fn is ref:
                y_ref, g_ref = y.detach(), gx
        assert rel(y, y_ref) < TOL and rel(gx, g_ref) < TOL
        with torch.no_grad():
            assert rel(small(x), y_ref) < TOL  # the no-gradient path
        # a trainable bias gets the same gradient whatever the weight's storage
        small.bias.requires_grad_(True)
        (gb,) = torch.autograd.grad(small(x), small.bias, up)
        (gb_ref,) = torch.autograd.grad(ref(x), stock.bias, up)
        assert rel(gb, gb_ref) < TOL
        small.bias.requires_grad_(False)


@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("name", ALL)
def test_whole_backbone_matches_float_lean_with_dequantized_weights(name, bits):
    stock = randomise_bn(create_backbone(name, "none")).eval()
    small = to_lean(stock, frozen_bits=bits)
    reference = to_lean(stock)  # float32, then given the dequantized weights
    convs = [m for m in small.modules() if isinstance(m, LeanConv2d)]
    refs = [m for m in reference.modules() if isinstance(m, LeanConv2d)]
    assert len(convs) == len(refs) and all(c.bits == bits for c in convs)
    for c, r in zip(convs, refs, strict=True):
        r.weight = c.float_weight()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    outs = []
    for net in (small, reference):
        xi = x.clone().requires_grad_(True)
        y = net.forward_features(xi)
        (gx,) = torch.autograd.grad(y, xi, torch.ones_like(y))
        outs.append((y.detach(), gx))
    assert rel(outs[0][0], outs[1][0]) < TOL and rel(outs[0][1], outs[1][1]) < TOL


# ---------------------------------------------------------------------------------------
# 3. bytes


@pytest.mark.parametrize("name", ALL)
def test_frozen_weight_bytes_per_precision(name):
    sizes = {}
    for bits in (32, 16, 8):
        frozen = FrozenBackbone(create_backbone(name, "none"), "lean", frozen_bits=bits)
        convs = [m for m in frozen.lean.modules() if isinstance(m, LeanConv2d)]
        sizes[bits] = frozen.weight_bytes()
        assert frozen.weight_bytes("lean") == sizes[bits] and frozen.weight_bytes("stock") == 0
        assert frozen.frozen_bits == bits and all(c.bits == bits for c in convs)
    weights = sum(c.weight.numel() for c in convs)
    channels = sum(c.out_channels for c in convs)  # one float32 scale each at 8 bits
    assert sizes[32] - sizes[16] == 2 * weights
    assert sizes[32] - sizes[8] == 3 * weights - 4 * channels
    # what remains float32: biases, standalone batch norms, scales
    assert sizes[16] / sizes[32] < 0.51 and sizes[8] / sizes[32] < 0.27


def test_fingerprint_is_the_float32_weights_whatever_the_bits():
    prints = {
        bits: FrozenBackbone(
            create_backbone("resnet18", "none"), "lean", frozen_bits=bits
        ).fingerprint
        for bits in (32, 16, 8)
    }
    assert len(set(prints.values())) == 1
    assert prints[32] == FrozenBackbone(create_backbone("resnet18", "none")).fingerprint


@pytest.mark.parametrize("method", ["da3", "bias"])
def test_bytes_kept_for_backward_do_not_depend_on_the_bits(method):
    """Autograd keeps the stored weight (a buffer, not counted), never its float copy."""
    kept = {}
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1])
    for bits in (32, 8):
        frozen = FrozenBackbone(create_backbone("resnet18", "none"), "lean", frozen_bits=bits)
        torch.manual_seed(0)
        model = build_model(method, frozen, 3).train()
        kept[bits] = saved_activation_bytes(
            model, lambda model=model: F.cross_entropy(model(x), y), exclude=frozen.lean
        )
    assert kept[8] == kept[32] > 0


# ---------------------------------------------------------------------------------------
# 4. methods and domains


@pytest.fixture(scope="module")
def frozen8() -> FrozenBackbone:
    return FrozenBackbone(randomise_bn(create_backbone("resnet18", "none")), frozen_bits=8)


@pytest.mark.parametrize("method", list_methods())
def test_every_method_trains_at_8_bits(frozen8, method):
    torch.manual_seed(0)
    model = build_model(method, frozen8, 3, make_config(method)).train()
    state = model.domain_state()
    # nothing of the stored-small backbone is the domain's
    assert not any(t.dtype in (torch.int8, torch.float16) for t in state.values())
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0])
    F.cross_entropy(model(x), y).backward()
    # every trainable tensor gets its gradient through the stored-small weights
    assert all(p.grad is not None for p in model.trainable_parameters())
    model.zero_grad()
    loss, logits = train_step(model, make_optimizer(model, make_config(method)), x, y)
    assert torch.isfinite(loss) and torch.isfinite(logits).all()
    if frozen8.weight_bytes("lean") and method != "finetune":
        int8 = [m for m in model.modules() if isinstance(m, LeanConv2d)]
        assert all(c.weight.dtype == torch.int8 for c in int8)


def test_settings_take_frozen_bits_and_refuse_bad_values():
    s = TrainSettings.from_values({"domain": "d", "data": "digits", "frozen_bits": "8"})
    assert s.frozen_bits == 8 and s.to_values()["frozen_bits"] == 8
    assert TrainSettings(domain="d", data="digits").frozen_bits == 32
    for bad, needle in [("12", "32, 16 or 8"), ("abc", "expects an integer"), ("8.5", "integer")]:
        with pytest.raises(Da3Error, match=needle):
            TrainSettings.from_values({"domain": "d", "data": "digits", "frozen_bits": bad})
    with pytest.raises(Da3Error, match="finetune trains the backbone"):
        TrainSettings(domain="d", data="digits", method="finetune", frozen_bits=8)


@pytest.fixture(scope="module")
def store8(tmp_path_factory):
    """A da3 domain trained with 8-bit frozen weights on a toy folder (ResNet-18, 32 px)."""
    from test_cli import make_folder

    base = tmp_path_factory.mktemp("bits")
    data = make_folder(base / "data")
    args = ["train", "--domain", "d8", "--data", data, "--backbone", "resnet18"]
    args += ["--weights", "none", "--image-size", 32, "--epochs", 1, "--batch-size", 8]
    args += ["--frozen-bits", 8, "--quiet", "--store", base / "store"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DA3_CACHE_DIR", str(base / "cache"))
        assert cli(*args) == 0
    return {"store": base / "store", "cache": base / "cache", "data": data}


@pytest.fixture
def env8(store8, monkeypatch):
    monkeypatch.setenv("DA3_CACHE_DIR", str(store8["cache"]))
    monkeypatch.delenv("DA3_STORE", raising=False)
    return store8


def test_domain_file_records_the_precision(env8):
    store = env8["store"]
    meta = json.loads((store / "d8.json").read_text())
    assert meta["backbone"]["frozen_bits"] == 8
    ref = FrozenBackbone(create_backbone("resnet18", "none"))
    assert meta["backbone"]["fingerprint"] == ref.fingerprint  # the float32 weights
    config = (store / "runs" / "d8" / "config.yaml").read_text()
    assert "frozen_bits: 8" in config
    history = json.loads((store / "runs" / "d8" / "history.json").read_text())
    frozen32 = FrozenBackbone(create_backbone("resnet18", "none"), "lean")
    assert history["memory"]["frozen_weights_bytes"] < 0.27 * frozen32.weight_bytes()


def test_load_at_the_same_and_another_precision(env8, capsys):
    from da3.commands import _open_domain as _open
    from da3.domains import DomainStore, MultiDomainModel

    store = env8["store"]
    model8, _ = _open(str(store), "d8")
    assert model8.frozen_bits == 8 and capsys.readouterr().err == ""
    model32, _ = _open(str(store), "d8", frozen_bits=32)
    assert "trained with 8-bit frozen weights" in capsys.readouterr().err
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y8, y32 = model8.get("d8").model(x), model32.get("d8").model(x)
    assert not torch.equal(y8, y32) and rel(y32, y8) < 0.2  # close, not the same
    # the domain's tensors are the same file whatever the precision it is loaded at
    s8, s32 = model8.get("d8").model.domain_state(), model32.get("d8").model.domain_state()
    assert s8.keys() == s32.keys() and all(torch.equal(s8[k], s32[k]) for k in s8)
    # in Python: a model at any precision loads it, and says so
    other = MultiDomainModel(create_backbone("resnet18", "none"), frozen_bits=16)
    other.load("d8", DomainStore(store))
    assert "16 bits" in other.precision_note("d8")
    # the same model, saved and loaded again at 8 bits: bit for bit
    model8.save("d8", DomainStore(store))
    again, _ = _open(str(store), "d8")
    with torch.no_grad():
        assert torch.equal(again.get("d8").model(x), y8)


def test_eval_shows_the_precision_and_the_difference(env8, capsys):
    store = env8["store"]
    assert cli("eval", "--domain", "d8", "--store", store) == 0
    out = capsys.readouterr().out
    assert "(8-bit frozen weights)" in out
    assert cli("eval", "--domain", "d8", "--store", store, "--frozen-bits", 32) == 0
    cap = capsys.readouterr()
    assert "trained with 8-bit frozen weights" in cap.err
    assert "trained with 8-bit frozen weights: test top-1" in cap.out and "points" in cap.out


def test_export_at_8_bits_writes_int8_weights_checked_against_pytorch(env8, tmp_path, capsys):
    import onnxruntime as ort

    from da3.commands import _open_domain as _open

    store = env8["store"]
    out = tmp_path / "d8.onnx"
    assert cli("export", "--domain", "d8", "--format", "onnx", "--store", store, "--out", out) == 0
    assert "8-bit frozen weights" in capsys.readouterr().out
    side = json.loads((tmp_path / "d8.onnx.json").read_text())
    assert side["frozen_bits"] == 8 and side["backbone"]["frozen_bits"] == 8
    assert side["verification"]["max_abs_diff"] < 1e-4
    proto = onnx.load(str(out))
    init = {t.name: t for t in proto.graph.initializer}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    dq = {n.output[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    frozen = [c for c in convs if c.input[1] in dq]
    assert len(frozen) == 20  # ResNet-18's convolutions (incl. 3 shortcut), all int8
    for c in frozen:
        q = init[dq[c.input[1]].input[0]]
        assert q.data_type == onnx.TensorProto.INT8
    # the file runs and gives PyTorch's 8-bit logits
    model, _ = _open(str(store), "d8")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"image": x.numpy()})[0])
    with torch.no_grad():
        ref = model.get("d8").model(x)
    assert float((got - ref).abs().max()) < 1e-4
    # float32 export of the same domain: float weights, a larger file
    out32 = tmp_path / "d8-32.onnx"
    assert cli("export", "--domain", "d8", "--format", "onnx", "--store", store,
               "--out", out32, "--frozen-bits", 32) == 0  # fmt: skip
    assert not any(n.op_type == "DequantizeLinear" for n in onnx.load(str(out32)).graph.node)
    assert out.stat().st_size < 0.3 * out32.stat().st_size


def test_bad_frozen_bits_are_one_line_errors(env8, capsys, tmp_path):
    store, data = env8["store"], env8["data"]
    train = ["train", "--domain", "x", "--data", data, "--store", store, "--backbone", "resnet18"]
    cases = [
        ([*train, "--frozen-bits", 12], ["'frozen_bits' must be 32, 16 or 8", "12"]),
        ([*train, "--frozen-bits", "eight"], ["frozen_bits", "integer", "eight"]),
        ([*train, "frozen_bits=4"], ["'frozen_bits' must be 32, 16 or 8"]),
        ([*train, "--method", "finetune", "--frozen-bits", 8], ["finetune", "float32"]),
        (["eval", "--domain", "d8", "--store", store, "--frozen-bits", 7], ["--frozen-bits", "7"]),
        (
            [
                "export",
                "--domain",
                "d8",
                "--format",
                "onnx",
                "--store",
                store,
                "--frozen-bits",
                "x",
            ],
            ["--frozen-bits", "32, 16 or 8"],
        ),  # fmt: skip
        (["profile", "--frozen-bits", 4], ["--frozen-bits", "4"]),
        (["bench", "--set", "frozen_bits=2", "--results", tmp_path], ["--frozen-bits", "2"]),
    ]
    capsys.readouterr()
    for args, needles in cases:
        assert cli(*args) == 2, args
        one_error_line(capsys.readouterr().err, *needles)
    assert not (store / "x.json").exists()
