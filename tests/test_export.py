"""Export of a domain to ONNX and TorchScript (``da3.export``, ``da3 export``, ``da3 bench-infer``).

Every registered method round-trips: the file, run by onnxruntime / ``torch.jit.load``, gives
PyTorch's logits within 1e-4 and the same top-1, at batch 1 and in a batch. DA3's gates stay
dynamic: a gate forced closed gives PyTorch's gated output and its branch is not computed (the
nodes onnxruntime executes, the convolutions torch's profiler sees). A file that does not match
is refused with a one-line error and nothing is written. Small random ResNet-18s at 32 px keep
it fast (a tiny classifier would not exercise the real graphs); one test is EfficientNet-Lite0.
"""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import da3.export.core as core
from conftest import calibrate_bn, cli, one_error_line, randomise_bn
from da3.backbones import create_backbone
from da3.errors import Da3Error
from da3.export import (
    FORMATS,
    compare,
    domain_metadata,
    export_model,
    open_runner,
    read_sidecar,
)
from da3.export.bench import format_bench, gate_statistics
from da3.export.core import SUFFIX
from da3.methods import AdaptedModel, FrozenBackbone, build_model, list_methods, make_config
from da3.methods.base import new_head

SIZE = 32
CLASSES = ["a", "b", "c", "d", "e"]
# Registered methods that cannot be exported, with what their error says. None today; a new
# method that cannot export is listed here and must fail with a clear message.
CANNOT_EXPORT: dict[str, str] = {}

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def frozen() -> FrozenBackbone:
    return FrozenBackbone(randomise_bn(create_backbone("resnet18", "none")))


def images(n: int, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def samples(frozen: FrozenBackbone, n: int = 5, size: int = SIZE) -> torch.Tensor:
    return frozen.stock.preprocess(images(n, size=size))


def trained_like(model: AdaptedModel, seed: int = 0) -> AdaptedModel:
    """Move every tensor of the domain away from its initial value (zero-initialised adaptors
    would make the adapted network the plain backbone; piggyback's masks start all ones), as
    training would."""
    g = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in model.domain_state().items()}
    for t in state.values():
        if t.is_floating_point():
            spread = float(t.std()) if t.numel() > 1 else 0.0
            scale = 0.1 * spread if spread > 0 else 0.01  # zero-initialised: a little
            t.add_(scale * torch.randn(t.shape, generator=g))
        elif t.dtype == torch.uint8:  # bits packed 8 per byte: clear about one in eight
            drop = torch.rand((*t.shape, 8), generator=g) < 0.125
            bits = (drop.to(torch.uint8) << torch.arange(8, dtype=torch.uint8)).sum(-1)
            t &= ~bits.to(torch.uint8)
    model.load_domain_state(state)
    return model.eval()


def metadata(model: AdaptedModel, frozen: FrozenBackbone, size: int = SIZE) -> dict:
    return domain_metadata(
        "test",
        model.method,
        CLASSES,
        size,
        frozen.stock.preprocess.to_dict(),
        {"name": frozen.name, "fingerprint": frozen.fingerprint},
    )


@torch.no_grad()
def assert_same_logits(model: AdaptedModel, run, x: torch.Tensor) -> None:
    """The deliverable's promise, checked here independently of the export's own check."""
    for batch in [x[i : i + 1] for i in range(len(x))] + [x]:
        ref, got = model(batch), run(batch)
        assert got.shape == ref.shape
        assert float((ref - got).abs().max()) < 1e-4
        assert torch.equal(ref.argmax(1), got.argmax(1))


def embedded_metadata(path: Path, fmt: str) -> dict:
    """The metadata inside the file: ONNX metadata_props (its main keys also one by one), a
    TorchScript extra file."""
    if fmt == "torchscript":
        extra = {core.TS_METADATA: ""}
        torch.jit.load(str(path), _extra_files=extra)
        return json.loads(extra[core.TS_METADATA])
    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    meta = json.loads(props["da3"])
    assert json.loads(props["classes"]) == meta["classes"] and props["method"] == meta["method"]
    assert props["image_size"] == str(meta["input"]["image_size"])
    assert json.loads(props["mean"]) == meta["input"]["mean"]
    assert props["backbone_fingerprint"] == meta["backbone"]["fingerprint"]
    (inp,) = proto.graph.input  # batch of any size, then 3 x S x S
    dims = inp.type.tensor_type.shape.dim
    assert (
        dims[0].dim_param
        and [d.dim_value for d in dims[1:]] == [3] + [meta["input"]["image_size"]] * 2
    )
    return meta


# ---------------------------------------------------------------------------------------
# every method


@pytest.mark.parametrize("method", list_methods())
def test_every_method_round_trips(frozen, method, tmp_path):
    torch.manual_seed(0)
    model = trained_like(build_model(method, frozen, len(CLASSES), make_config(method)))
    x = samples(frozen)
    with torch.no_grad():
        logits = model(x)
    assert float(logits.std(0).max()) > 1e-3, "the samples must get different logits"
    for fmt in FORMATS:
        path = tmp_path / f"{method}{SUFFIX[fmt]}"
        if method in CANNOT_EXPORT:
            with pytest.raises(Da3Error, match=CANNOT_EXPORT[method]):
                export_model(model, path, fmt, x, metadata(model, frozen))
            assert not path.exists()
            continue
        r = export_model(model, path, fmt, x, metadata(model, frozen))
        assert r.comparison.ok and r.comparison.top1_agree == len(x)
        assert_same_logits(model, open_runner(path, fmt), x)
        side = json.loads(r.sidecar.read_text())
        assert side["method"] == method and side["classes"] == CLASSES
        assert side["input"]["image_size"] == SIZE and side["backbone"]["name"] == "resnet18"
        assert side["input"]["mean"] == list(frozen.stock.preprocess.mean)
        assert side["verification"]["max_abs_diff"] < 1e-4
        side.pop("verification")  # the sidecar's own addition: the file exists before it
        assert embedded_metadata(path, fmt) == side
        assert not list(tmp_path.glob(".*.tmp"))
    with torch.no_grad():
        assert torch.equal(model(x), logits)  # exporting leaves the domain as it was


def test_piggyback_masks_are_folded_into_the_weights(frozen, tmp_path):
    """The ONNX file holds one masked weight per convolution, not the weight and the scores."""
    if "piggyback" not in list_methods():
        pytest.skip("no piggyback method")
    model = trained_like(build_model("piggyback", frozen, len(CLASSES)))
    r = export_model(model, tmp_path / "m.onnx", "onnx", samples(frozen), metadata(model, frozen))
    weights = sum(t.numel() * t.element_size() for t in frozen.lean.state_dict().values())
    assert r.bytes < 1.05 * weights  # the scores as well would double it


# ---------------------------------------------------------------------------------------
# a method that cannot be exported, a file that does not match


class _ThroughPython(torch.nn.Module):
    """Features computed element by element in Python: no exporter can follow them."""

    def __init__(self, backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        f = self.backbone.forward_features(x)
        return torch.tensor([math.tanh(v) for v in f.flatten().tolist()]).view_as(f)


def test_a_method_that_cannot_export_fails_clearly(frozen, tmp_path):
    model = AdaptedModel(
        _ThroughPython(frozen.lean), new_head(frozen.feature_dim, 5), frozen, "pythonic"
    ).eval()
    x = samples(frozen)
    path = tmp_path / "m.onnx"
    with pytest.raises(Da3Error) as err:
        export_model(model, path, "onnx", x, metadata(model, frozen))
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "'pythonic' cannot be exported to onnx" in msg
    # Tracing records the Python result as a constant: the file is refused when run.
    path = tmp_path / "m.pt"
    with pytest.raises(Da3Error, match="does not (match PyTorch|run in torch.jit)") as err:
        export_model(model, path, "torchscript", x, metadata(model, frozen))
    assert str(err.value).startswith(f"{path}: ") and "nothing written" in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_mismatch_writes_nothing_and_keeps_the_old_file(frozen, tmp_path, monkeypatch, fmt):
    model = trained_like(build_model("linear", frozen, len(CLASSES)))
    path = tmp_path / f"m{SUFFIX[fmt]}"
    path.write_bytes(b"the previous export")
    real = core.open_runner

    def off_by_a_little(p, f, threads=0):
        run = real(p, f, threads)
        return lambda x: run(x) + 2e-4

    monkeypatch.setattr(core, "open_runner", off_by_a_little)
    with pytest.raises(Da3Error) as err:
        export_model(model, path, fmt, samples(frozen), metadata(model, frozen))
    msg = str(err.value)
    assert msg.startswith(f"{path}: exported {fmt} does not match PyTorch (max abs diff on logits")
    assert "nothing written" in msg and "\n" not in msg
    assert path.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    r = export_model(model, path, fmt, samples(frozen), metadata(model, frozen), tolerance=1e-3)
    assert 2e-4 <= r.comparison.max_abs_diff < 1e-3 and path.read_bytes() != b"the previous export"
    assert json.loads(r.sidecar.read_text())["verification"]["tolerance"] == 1e-3


def test_compare_counts_top1_and_difference(frozen):
    model = trained_like(build_model("linear", frozen, len(CLASSES)))
    x = samples(frozen)
    same = compare(model, model, x)
    assert same.ok and same.max_abs_diff == 0 and same.top1_agree == len(x)
    swapped = compare(model, lambda b: model(b).flip(1), x)
    assert not swapped.ok and swapped.max_abs_diff > 1e-3


def test_compare_accepts_a_difference_relative_to_the_logits(frozen):
    """Runtimes' float32 rounding grows with the logits: the accepted difference is
    ``tolerance + rtol * largest |logit|``, not an absolute figure alone."""
    model = trained_like(build_model("linear", frozen, len(CLASSES)))
    x = samples(frozen)
    model.eval()
    big = 1000.0 / float(model(x).abs().max())  # logits up to exactly 1000

    class Scaled(torch.nn.Module):
        def forward(self, b):
            return model(b) * big

    scaled = Scaled()

    def off(b):  # 5e-4 off: more than the absolute 1e-4, less than 1e-4 + 1e-5 * 1000
        return scaled(b) + 5e-4

    cmp = compare(scaled, off, x)
    assert abs(cmp.logit_scale - 1000.0) < 1e-2 and abs(cmp.allowed - 1.01e-2) < 1e-6
    assert cmp.ok and 4e-4 < cmp.max_abs_diff < 6e-4
    assert not compare(scaled, off, x, rtol=0.0).ok
    assert not compare(scaled, lambda b: scaled(b) + 0.02, x).ok


# ---------------------------------------------------------------------------------------
# DA3's gates


def gated_da3(frozen: FrozenBackbone, decisions: list[bool | None], x: torch.Tensor):
    """A da3 model whose gates are forced: True open, False closed, None: open for half of
    ``x`` (a threshold on one input of the gate, between the two middle values)."""
    torch.manual_seed(0)
    config = make_config("da3", {"gates": True})
    model = trained_like(build_model("da3", frozen, len(CLASSES), config))
    blocks = model.gated_blocks()
    assert len(blocks) == len(decisions)
    with torch.no_grad():
        for block, d in zip(blocks, decisions, strict=True):
            block.gate.weight.zero_()
            block.gate.bias.fill_(10.0 if d else -10.0)
            if d is None:
                seen = []
                h = block.gate.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0]))
                model(x)
                h.remove()
                c = int(seen[0].std(0).argmax())
                v = seen[0][:, c].sort().values
                k = len(v) // 2
                threshold, gap = float(v[k - 1] + v[k]) / 2, float(v[k] - v[k - 1])
                block.gate.weight[0, c] = 20.0 / gap  # logits of +-10 on either side
                block.gate.bias.fill_(-20.0 / gap * threshold)
    return model


def decisions_of(model: AdaptedModel, x: torch.Tensor) -> list[list[bool]]:
    with torch.no_grad():
        model(x)
    return [(b.last_gate > 0.5).tolist() for b in model.gated_blocks()]


def executed_onnx_nodes(path: Path, x: torch.Tensor, tmp_path: Path) -> list[tuple[str, str]]:
    """(node name, op type) of every node onnxruntime ran for ``x``, subgraphs included
    (graph optimisations off, so the names are the file's)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / "ort")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    sess.run(None, {"image": x.numpy()})
    events = json.loads(Path(sess.end_profiling()).read_text())
    suffix = "_kernel_time"
    return [
        (e["name"][: -len(suffix)], e["args"]["op_name"])
        for e in events
        if e.get("cat") == "Node" and e["name"].endswith(suffix)
    ]


def if_branches(path: Path) -> list[dict[str, set[str]]]:
    proto = onnx.load(str(path), load_external_data=False)
    return [
        {a.name: {n.name for n in a.g.node} for a in node.attribute}
        for node in proto.graph.node
        if node.op_type == "If"
    ]


def torch_convolutions(run, x: torch.Tensor) -> int:
    run(x)  # TorchScript optimises on the first calls
    run(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(x)
    return collections.Counter(e.name for e in prof.events())["aten::_convolution"]


def test_a_closed_gate_skips_its_branch_in_onnx(frozen, tmp_path):
    x = samples(frozen, 4)
    model = gated_da3(frozen, [False, True], x)
    assert decisions_of(model, x) == [[False] * 4, [True] * 4]
    gated, static = tmp_path / "gated.onnx", tmp_path / "static.onnx"
    export_model(model, gated, "onnx", x, metadata(model, frozen))
    export_model(model, static, "onnx", x, metadata(model, frozen), gates="static")
    assert_same_logits(model, open_runner(gated, "onnx"), x)
    branches = if_branches(gated)
    assert len(branches) == 2 and if_branches(static) == []
    ran = executed_onnx_nodes(gated, x[:1], tmp_path)
    names = {n for n, _ in ran}
    closed, open_ = branches
    assert not closed["then_branch"] & names  # the frozen branch of block 1: not run
    assert closed["else_branch"] <= names
    assert open_["then_branch"] <= names and not open_["else_branch"] & names
    convs = collections.Counter(op for _, op in ran)["Conv"]
    static_convs = collections.Counter(op for _, op in executed_onnx_nodes(static, x[:1], tmp_path))
    assert static_convs["Conv"] - convs == 2  # a basic block's branch: two convolutions


def test_a_closed_gate_skips_its_branch_in_torchscript(frozen, tmp_path):
    x = samples(frozen, 4)
    model = gated_da3(frozen, [False, True], x)
    gated, static = tmp_path / "gated.pt", tmp_path / "static.pt"
    export_model(model, gated, "torchscript", x, metadata(model, frozen))
    export_model(model, static, "torchscript", x, metadata(model, frozen), gates="static")
    run_gated, run_static = open_runner(gated, "torchscript"), open_runner(static, "torchscript")
    assert_same_logits(model, run_gated, x)
    assert torch_convolutions(run_static, x[:1]) - torch_convolutions(run_gated, x[:1]) == 2
    opened = gated_da3(frozen, [True, True], x)
    export_model(opened, gated, "torchscript", x, metadata(opened, frozen))
    assert torch_convolutions(open_runner(gated, "torchscript"), x[:1]) == torch_convolutions(
        run_static, x[:1]
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_gates_that_differ_across_a_batch(frozen, tmp_path, fmt):
    """Half the images close the first gate: each alone, and all in one batch, give PyTorch's
    logits (which runs the branch on the open images only)."""
    x = samples(frozen, 6)
    model = gated_da3(frozen, [None, True], x)
    first = decisions_of(model, x)[0]
    assert 0 < sum(first) < len(first)
    path = tmp_path / f"m{SUFFIX[fmt]}"
    r = export_model(model, path, fmt, x, metadata(model, frozen))
    assert r.gates == "dynamic" and r.comparison.ok
    assert_same_logits(model, open_runner(path, fmt), x)


def calibrated_lite0() -> FrozenBackbone:
    """Random EfficientNet-Lite0 whose batch-norm statistics come from random images, so that
    its features (hence the logits) depend on the image."""
    torch.manual_seed(1234)
    backbone = create_backbone("efficientnet_lite0", "none")
    x = backbone.preprocess(images(16, seed=99, size=64))
    return FrozenBackbone(calibrate_bn(backbone, x))


def test_efficientnet_lite0_da3_with_gates(tmp_path):
    frozen = calibrated_lite0()
    x = samples(frozen, 4, size=64)
    torch.manual_seed(0)
    config = make_config("da3", {"gates": True})
    model = trained_like(build_model("da3", frozen, len(CLASSES), config))
    blocks = model.gated_blocks()
    with torch.no_grad():
        blocks[0].gate.weight.zero_()
        blocks[0].gate.bias.fill_(-10.0)  # one closed gate, the others as trained
    # A forward with gradient, as at the end of training: what it leaves behind in the model
    # (the last gates, part of an autograd graph) must not stop the export.
    assert float(model(x).detach().std(0).max()) > 1e-3
    for fmt in FORMATS:
        path = tmp_path / f"m{SUFFIX[fmt]}"
        r = export_model(model, path, fmt, x, metadata(model, frozen, 64))
        assert r.gates == "dynamic" and r.comparison.ok
        assert_same_logits(model, open_runner(path, fmt), x)
    assert len(if_branches(tmp_path / "m.onnx")) == len(blocks)


# ---------------------------------------------------------------------------------------
# the command line


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with 'gated' (da3 with gates) and 'plain' (linear) trained on a toy folder."""
    from test_cli import make_folder

    base = tmp_path_factory.mktemp("export")
    data = make_folder(base / "data")
    common = ["--data", data, "--backbone", "resnet18", "--weights", "none", "--image-size", 32]
    common += ["--epochs", 1, "--batch-size", 8, "--quiet", "--store", base / "store"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DA3_CACHE_DIR", str(base / "cache"))
        assert cli("train", "--domain", "gated", *common, "gates=true") == 0
        assert cli("train", "--domain", "plain", "--method", "linear", *common) == 0
    return {"store": base / "store", "cache": base / "cache"}


@pytest.fixture
def env(store, monkeypatch):
    monkeypatch.setenv("DA3_CACHE_DIR", str(store["cache"]))
    monkeypatch.delenv("DA3_STORE", raising=False)
    return store


def domain_logits(store: Path, name: str, x: torch.Tensor) -> torch.Tensor:
    from da3.commands import _open_domain as _open

    model, _ = _open(str(store), name)
    with torch.no_grad():
        return model.get(name).model(x)


# Run in a fresh process where importing da3 fails: the files need only their runtime.
NO_DA3 = "import sys; sys.modules['da3'] = None\n"
RUN_ONNX = NO_DA3 + (
    "import numpy as np, onnxruntime as ort\n"
    "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
    "np.save(sys.argv[3], s.run(None, {'image': np.load(sys.argv[2])})[0])\n"
)
RUN_TS = NO_DA3 + (
    "import numpy as np, torch\n"
    "m = torch.jit.load(sys.argv[1])\n"
    "np.save(sys.argv[3], m(torch.from_numpy(np.load(sys.argv[2]))).detach().numpy())\n"
)


@pytest.mark.parametrize("fmt", FORMATS)
def test_cli_export_writes_file_and_sidecar(env, tmp_path, capsys, fmt):
    out = tmp_path / f"gated{SUFFIX[fmt]}"
    assert (
        cli("export", "--domain", "gated", "--format", fmt, "--store", env["store"], "--out", out)
        == 0
    )
    text = capsys.readouterr().out
    assert f"to {out}" in text and "gates dynamic" in text and "same top-1" in text
    side = json.loads((tmp_path / f"{out.name}.json").read_text())
    assert side["domain"] == "gated" and side["method"] == "da3" and side["gates"] == "dynamic"
    assert side["classes"] == ["blue", "green", "red"] and side["input"]["image_size"] == 32
    assert side["backbone"]["name"] == "resnet18" and len(side["backbone"]["fingerprint"]) == 64
    assert side["verification"]["samples"] >= 2 and side["verification"]["max_abs_diff"] < 1e-4
    assert read_sidecar(out) == side  # the checked reader takes a real sidecar as it is
    umask = os.umask(0)
    os.umask(umask)
    for written in (out, tmp_path / f"{out.name}.json"):  # not the temporary file's 0600
        assert written.stat().st_mode & 0o777 == 0o666 & ~umask
    meta = json.loads((env["store"] / "gated.json").read_text())
    assert side["source"]["build_id"] == meta["build_id"]
    # The file runs without da3 and gives the domain's logits.
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(3, 3, 32, 32, generator=g) - 0.5) * 4
    np.save(tmp_path / "x.npy", x.numpy())
    script = RUN_ONNX if fmt == "onnx" else RUN_TS
    args = [sys.executable, "-c", script, out, tmp_path / "x.npy", tmp_path / "y.npy"]
    subprocess.run([str(a) for a in args], check=True, capture_output=True, timeout=300)
    got = torch.from_numpy(np.load(tmp_path / "y.npy"))
    ref = domain_logits(env["store"], "gated", x)
    assert float((got - ref).abs().max()) < 1e-4 and torch.equal(got.argmax(1), ref.argmax(1))


def test_cli_export_default_paths_and_gates_off(env, capsys):
    store = env["store"]
    assert cli("export", "--domain", "plain", "--format", "torchscript", "--store", store) == 0
    assert (store / "exports" / "plain.pt").is_file()
    assert json.loads((store / "exports" / "plain.pt.json").read_text())["gates"] == "none"
    assert cli("export", "--domain", "gated", "--format", "torchscript", "--gates", "off",
               "--store", store) == 0  # fmt: skip
    assert json.loads((store / "exports" / "gated.static.pt.json").read_text())["gates"] == "static"


def test_cli_export_refuses_bad_requests(env, tmp_path, capsys):
    store = env["store"]
    before = sorted(p.name for p in store.iterdir())
    cases = [
        (["--domain", "nope", "--format", "onnx"], ["unknown domain 'nope'", "gated, plain"]),
        (["--domain", "gated", "--format", "tflite"], ["unknown export format 'tflite'", "onnx"]),
        (["--domain", "gated", "--format", "onnx", "--gates", "maybe"], ["--gates", "on or off"]),
        (["--domain", "plain", "--format", "onnx", "--gates", "on"], ["'plain' has no gates"]),
        (["--domain", "gated", "--format", "onnx", "--samples", "1"], ["--samples", "at least 2"]),
        (["--domain", "gated", "--format", "onnx", "--tolerance", "0"], ["--tolerance"]),
        (["--domain", "gated", "--format", "onnx", "--rtol", "-1"], ["--rtol"]),
        (["--domain", "gated", "--format", "onnx", "--out", tmp_path], ["is a folder"]),
    ]
    capsys.readouterr()
    for args, needles in cases:
        assert cli("export", *args, "--store", store) == 2
        one_error_line(capsys.readouterr().err, *needles)
    assert sorted(p.name for p in store.iterdir()) == before


def test_cli_export_failure_keeps_an_existing_out(env, tmp_path, capsys, monkeypatch):
    """(TorchScript, the faster to export; both formats share this path, see above.)"""
    out = tmp_path / "gated.pt"
    out.write_bytes(b"a model that works")
    real = core.open_runner

    def off(p, f, threads=0):
        run = real(p, f, threads)
        return lambda x: run(x) + 1e-3

    monkeypatch.setattr(core, "open_runner", off)
    capsys.readouterr()
    assert cli("export", "--domain", "gated", "--format", "torchscript", "--store", env["store"],
               "--out", out) == 2  # fmt: skip
    one_error_line(capsys.readouterr().err, str(out), "does not match PyTorch", "max abs diff")
    assert out.read_bytes() == b"a model that works"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gated.pt"]


def test_cli_bench_infer_runs(env, capsys):
    assert cli("bench-infer", "--domain", "gated", "--samples", 3, "--json",
               "--store", env["store"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    got = {(r["runtime"], r["gates"]) for r in result["rows"]}
    runtimes = ("PyTorch eager", "TorchScript", "onnxruntime")
    assert got == {(rt, g) for rt in runtimes for g in ("dynamic", "static")}
    assert all(r["median_ms"] > 0 for r in result["rows"])
    assert result["gated_blocks"] == 2 and 0 <= result["branches_run"] <= 1
    assert result["flops_per_image_gated"] <= result["flops_per_image_all"]
    assert "onnxruntime" in format_bench(result)
    capsys.readouterr()
    assert cli("bench-infer", "--domain", "gated", "--threads", 0, "--store", env["store"]) == 2
    one_error_line(capsys.readouterr().err, "--threads")


def test_gate_statistics_count_skipped_branches_and_flops(frozen):
    x = samples(frozen, 3)
    model = gated_da3(frozen, [False, True], x)
    closed = gate_statistics(model, x)
    assert closed["gated_blocks"] == 2 and closed["branches_run"] == 0.5
    opened = gate_statistics(gated_da3(frozen, [True, True], x), x)
    assert opened["branches_run"] == 1.0
    assert opened["flops_per_image_gated"] == opened["flops_per_image_all"]
    assert closed["flops_per_image_all"] == opened["flops_per_image_all"]
    # A basic block's branch: two 3x3 convolutions at the block's resolution.
    block = model.gated_blocks()[0]
    seen = []
    h = block.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(x[:1])
    h.remove()
    c, hw = block.block.out_channels, seen[0].shape[-1] * seen[0].shape[-2]
    branch = 2 * (2 * c * c * 9 * hw)
    assert closed["flops_per_image_all"] - closed["flops_per_image_gated"] == branch
