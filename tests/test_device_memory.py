"""What a training process holds, as the device sees it: data read a batch at a time, folders
already split, micro-batches, the memory budget, what a run imports, the lean optimizer.

Memory figures here are deterministic (bytes of tensors, modules imported) or compare two real
processes against each other with a wide margin; timings are not tested.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from da3.backbones import create_backbone
from da3.cli import main
from da3.data import cache, load_domain
from da3.data.cache import CachedImages
from da3.domains import MultiDomainModel
from da3.errors import Da3Error
from da3.methods import FrozenBackbone, build_model, make_config
from da3.optim import SGD, AdamW, LambdaSchedule
from da3.train import micro_batch_coupling, train_step
from da3.training import MemoryPlan, TrainSettings, fit_budget, parse_bytes

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def write_images(folder: Path, n: int, colour: tuple[int, int, int], size: int = 16) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(sum(colour) + n)
    for i in range(n):
        noise = rng.integers(-30, 30, (size, size, 3))
        pixels = np.clip(np.array(colour)[None, None] + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")


COLOURS = {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


def class_folder(root: Path, per_class: int) -> Path:
    for name, colour in COLOURS.items():
        write_images(root / name, per_class, colour)
    return root


# ---------------------------------------------------------------------------------------
# data on disk


def test_cached_images_read_what_was_written(tmp_path, monkeypatch):
    monkeypatch.setenv("DA3_CACHE_DIR", str(tmp_path / "cache"))
    root = class_folder(tmp_path / "f", 10)
    domain = load_domain(root, 24)
    assert isinstance(domain.train.images, CachedImages)
    from da3.data import folder

    memory = folder.build(folder.scan(root.absolute()), 24)  # decoded into memory instead
    for name in ("train", "val", "test"):
        disk, mem = getattr(domain, name), getattr(memory, name)
        assert torch.equal(disk.images[:], mem.images) and torch.equal(disk.labels, mem.labels)
        idx = torch.tensor([len(disk) - 1, 0, 2, 1, 2])  # any order, repeats
        assert torch.equal(disk.images[idx], mem.images[idx])
        assert torch.equal(disk.images[len(disk) - 1], mem.images[-1])
    sub = domain.train.per_class(2)
    assert isinstance(sub.images, CachedImages) and len(sub) == 6
    assert torch.equal(sub.images[:], memory.train.per_class(2).images)
    assert domain.bytes_in_memory() == sum(s.labels.numel() * 8 for s in domain.splits().values())


def test_cache_file_is_plain_safetensors(tmp_path, monkeypatch):
    monkeypatch.setenv("DA3_CACHE_DIR", str(tmp_path / "cache"))
    domain = load_domain(class_folder(tmp_path / "f", 5), 16)
    from safetensors.torch import load_file

    tensors = load_file(str(domain.train.images.path))
    assert torch.equal(tensors["train_images"], domain.train.images[:])
    assert torch.equal(tensors["test_labels"], domain.test.labels)


PEAK_SCRIPT = """
import json, sys
from da3.cli import main
code = main(sys.argv[1:])
status = open('/proc/self/status').read()
print(json.dumps({'code': code, 'hwm': int(status.split('VmHWM:')[1].split()[0]) * 1024}))
"""


def _train_peak(folder: Path, store: Path, cache_dir: Path) -> int:
    env = {**os.environ, "DA3_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}
    argv = ["train", "--domain", "d", "--data", str(folder), "--method", "linear"]
    argv += ["--image-size", "64", "--batch-size", "64", "--epochs", "1", "--quiet"]
    argv += ["--store", str(store), "--weights", "none"]
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, *argv], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    memory = json.loads((store / "runs" / "d" / "history.json").read_text())["memory"]
    return result["hwm"] - memory["runtime_bytes"]


@pytest.mark.slow
def test_ten_times_the_images_costs_no_more_memory(tmp_path):
    """A real `da3 train` process on 2,100 images peaks within a few MiB of one on 210: the
    images (26 MB of them at 64 px) are never all in memory, neither while the folder is
    decoded into the cache nor while training and evaluating."""
    small = class_folder(tmp_path / "small", 70)
    big = class_folder(tmp_path / "big", 700)
    image_bytes = 2100 * 3 * 64 * 64
    a = _train_peak(small, tmp_path / "s1", tmp_path / "c1")
    b = _train_peak(big, tmp_path / "s2", tmp_path / "c2")
    assert b - a < 8 * 2**20, (a, b)  # holding the images would add 26 MB
    assert image_bytes > 3 * 8 * 2**20


# ---------------------------------------------------------------------------------------
# a folder already split


def test_split_folders_are_the_users_splits(tmp_path, monkeypatch):
    monkeypatch.setenv("DA3_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "photos"
    for name, colour in COLOURS.items():
        write_images(root / "train" / name, 6, colour)
        write_images(root / "val" / name, 2, colour)
        write_images(root / "test" / name, 3, colour)
    d = load_domain(root, 16)
    assert d.classes == sorted(COLOURS)  # not "train", "val", "test"
    assert d.counts() == {"train": 18, "val": 6, "test": 9}
    assert "split folders train/, val/, test/" in d.layout
    # no val folder: val is carved out of train/ by the rule, test/ kept
    (root / "val").rename(tmp_path / "val-elsewhere")
    d = load_domain(root, 16)
    assert d.counts()["test"] == 9 and d.counts()["val"] == 3 and d.counts()["train"] == 15
    assert "val 10% of train/" in d.layout


def test_split_folders_must_agree(tmp_path):
    root = tmp_path / "photos"
    write_images(root / "train" / "cat", 2, (1, 2, 3))
    write_images(root / "train" / "dog", 2, (1, 2, 3))
    write_images(root / "val" / "cat", 1, (1, 2, 3))
    write_images(root / "val" / "cow", 1, (1, 2, 3))
    with pytest.raises(Da3Error) as err:
        load_domain(root, 16)
    msg = str(err.value)
    assert "\n" not in msg and "val/ lacks dog" in msg and "cow" in msg and str(root) in msg
    mixed = tmp_path / "mixed"
    write_images(mixed / "train" / "cat", 1, (1, 2, 3))
    write_images(mixed / "dog", 1, (1, 2, 3))
    with pytest.raises(Da3Error, match=r"mixes split folders \(train\) with other folders \(dog\)"):
        load_domain(mixed, 16)


# ---------------------------------------------------------------------------------------
# micro-batches


@pytest.fixture(scope="module")
def frozen():
    from conftest import calibrate_bn

    torch.manual_seed(0)
    backbone = create_backbone("efficientnet_lite0", None)
    calibrate_bn(backbone, torch.randn(16, 3, 32, 32))
    return FrozenBackbone(backbone)


class _NoStep:
    """An optimizer that keeps the gradients it is given (to compare them)."""

    def __init__(self, model) -> None:
        self.model = model

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.model.parameters():
            p.grad = None

    def step(self) -> None:
        pass


EXACT = ["da3", "bias", "linear", "tinytl", "piggyback"]


@pytest.mark.parametrize("method", EXACT)
def test_micro_batches_give_the_batch_gradient(frozen, method):
    torch.manual_seed(1)
    model = build_model(method, frozen, 4, make_config(method)).train()
    assert micro_batch_coupling(model) is None
    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    opt = _NoStep(model)
    loss, logits = train_step(model, opt, x, y)
    whole = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loss3, logits3 = train_step(model, opt, lambda part: x[part], y, micro_batch=3)
    parts = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert whole.keys() == parts.keys() and whole
    for n in whole:  # float32 sums in another order: off by rounding, relative to the tensor
        scale = float(whole[n].abs().max())
        torch.testing.assert_close(
            parts[n], whole[n], rtol=1e-4, atol=1e-4 * scale, msg=lambda m, n=n: f"{n}: {m}"
        )
    torch.testing.assert_close(loss3, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits3, logits, rtol=1e-5, atol=1e-5)


def test_micro_batches_say_where_they_are_not_exact(frozen):
    finetune = build_model("finetune", frozen, 4, make_config("finetune"))
    assert "batch norms" in micro_batch_coupling(finetune)
    gated = build_model("da3", frozen, 4, make_config("da3", {"gates": True}))
    assert "budget" in micro_batch_coupling(gated)
    udta = build_model("udta", frozen, 4, make_config("udta"))  # its side network's norms
    assert "batch norms" in micro_batch_coupling(udta)


@pytest.mark.parametrize("micro_batch", [0, 2])
def test_a_run_in_micro_batches_slices_its_convolutions(tmp_path, monkeypatch, micro_batch):
    """Micro-batches put memory before speed: training and the test evaluation run with the
    widest convolutions in slices of channels (the same numbers) and without oneDNN (from
    the backbone's build on, see da3.lean.ops.native_kernels); a whole batch does not."""
    import da3.train
    from da3.lean import ops
    from da3.training import TrainSettings, train_domain

    monkeypatch.setenv("DA3_CACHE_DIR", str(tmp_path / "cache"))
    seen = []
    real_fit, real_eval = da3.train.fit_domain, da3.train.evaluate

    real_build = MultiDomainModel.add_domain

    def fit_domain(*args, **kwargs):
        seen.append(("fit", ops.SLICE_BYTES, ops.onednn_enabled()))
        return real_fit(*args, **kwargs)

    def evaluate(*args, **kwargs):
        seen.append(("evaluate", ops.SLICE_BYTES, ops.onednn_enabled()))
        return real_eval(*args, **kwargs)

    def add_domain(*args, **kwargs):
        seen.append(("build", ops.SLICE_BYTES, ops.onednn_enabled()))
        return real_build(*args, **kwargs)

    monkeypatch.setattr(da3.train, "fit_domain", fit_domain)
    monkeypatch.setattr(da3.train, "evaluate", evaluate)
    monkeypatch.setattr(MultiDomainModel, "add_domain", add_domain)
    onednn = ops.onednn_enabled()
    lines = []
    settings = TrainSettings(
        domain="d",
        data=str(class_folder(tmp_path / "f", 4)),
        weights="none",
        image_size=32,
        batch_size=4,
        epochs=1,
        micro_batch=micro_batch,
    )
    train_domain(settings, tmp_path / "s", echo=lines.append, plot=False)
    want = ops.DEFAULT_SLICE_BYTES if micro_batch else None
    expected = onednn and not micro_batch  # oneDNN on
    assert seen[0] == ("build", None, expected)
    assert seen[1] == ("fit", want, expected) and seen[-1] == ("evaluate", want, expected)
    assert ops.SLICE_BYTES is None and ops.onednn_enabled() == onednn  # and not after
    assert any("slices of channels" in line for line in lines) == bool(micro_batch)


# ---------------------------------------------------------------------------------------
# the memory budget


def test_parse_bytes():
    assert parse_bytes("48MB") == 48_000_000 and parse_bytes("48MiB") == 48 * 2**20
    assert parse_bytes("0.5GB") == 500_000_000 and parse_bytes("2000") == 2000
    with pytest.raises(Da3Error, match="not a size"):
        parse_bytes("lots")


def test_budget_plan_picks_the_largest_micro_batch_that_fits():
    plan = MemoryPlan(10, 20, 5, kept_per_image=3, transient_per_image=7, micro_batch=8)
    assert fit_budget(plan, 35 + 10 * 4, 8, 0).micro_batch == 4
    assert fit_budget(plan, 10**9, 8, 0).micro_batch == 8
    assert fit_budget(plan, 10**9, 8, 2).micro_batch == 2  # a requested micro-batch is a cap
    with pytest.raises(Da3Error) as err:
        fit_budget(plan, 40, 8, 0)
    assert "micro-batch 1" in str(err.value) and "frozen weights" in str(err.value)


def test_budget_refusal_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DA3_CACHE_DIR", str(tmp_path / "cache"))
    data = class_folder(tmp_path / "f", 4)
    store = tmp_path / "store"
    argv = ["train", "--domain", "d", "--data", str(data), "--weights", "none", "--quiet"]
    code = main([*argv, "--image-size", "32", "--store", str(store), "--memory-budget", "5MB"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("da3: error: --memory-budget 4.8 MiB is too small") and "frozen" in err
    written = [p for p in store.rglob("*") if ".locks" not in p.parts] if store.exists() else []
    assert written == []  # only the lock, which says who was writing


def test_budget_plans_the_micro_batch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DA3_CACHE_DIR", str(tmp_path / "cache"))
    data = class_folder(tmp_path / "f", 4)
    argv = ["train", "--domain", "d", "--data", str(data), "--weights", "none", "--quiet"]
    argv += ["--image-size", "32", "--batch-size", "8", "--epochs", "1"]
    assert main([*argv, "--store", str(tmp_path / "s"), "--memory-budget", "30MiB"]) == 0
    out = capsys.readouterr().out
    assert "memory plan: budget 30.0 MiB" in out
    memory = json.loads((tmp_path / "s" / "runs" / "d" / "history.json").read_text())["memory"]
    plan = memory["plan"]
    assert 1 <= plan["micro_batch"] <= 8 and plan["estimate_bytes"] <= 30 * 2**20
    assert memory["micro_batch"] == plan["micro_batch"]


# ---------------------------------------------------------------------------------------
# what a run imports


IMPORTS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import da3.plots
    seen = {}
    original = da3.plots.plot_curves
    def plot_curves(*args, **kwargs):
        seen['before_plot'] = sorted(sys.modules)
        return original(*args, **kwargs)
    da3.plots.plot_curves = plot_curves
    from da3.cli import main
    code = main(sys.argv[1:])
    seen['after'] = sorted(sys.modules)
    print(json.dumps({'code': code, **seen}))
    """
)


@pytest.mark.slow
def test_a_lite0_run_imports_only_what_it_needs(tmp_path):
    data = class_folder(tmp_path / "f", 4)
    env = {**os.environ, "DA3_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    argv = ["train", "--domain", "d", "--data", str(data), "--image-size", "32"]
    argv += ["--epochs", "1", "--quiet"]

    def tops(names):
        return {n.split(".")[0] for n in names} | {n for n in names if n.startswith("torch.")}

    for store in ("s", "t"):  # the first run decodes the images; the second reads the cache
        out = subprocess.run(
            [sys.executable, "-c", IMPORTS_SCRIPT, *argv, "--store", str(tmp_path / store)],
            env=env,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        seen = json.loads(out.stdout.strip().splitlines()[-1])
        assert seen["code"] == 0
        after = tops(seen["after"])
        assert "before_plot" in seen  # the curves were drawn ...
        never = {"torchvision", "onnx", "onnxscript", "onnxruntime", "sklearn", "scipy", "flwr"}
        never |= {"torch._dynamo", "torch.utils.flop_counter"}  # ~155 and ~80 MiB resident
        never |= {"matplotlib"}  # ... with Pillow: matplotlib costs ~30 MiB (da3.plots)
        assert not never & after, never & after
    # from the cache, Pillow (~2 MiB) is not loaded until the plot, after training's peak
    assert "PIL" not in tops(seen["before_plot"]) and "PIL" in after


WORKSPACE_SCRIPT = """
import ctypes, sys
if sys.argv[1] == "freed":
    from da3.commands import no_blas_buffers
    no_blas_buffers()
import torch
import torch.nn.functional as F

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "a b c d mapped f g h i j".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.mallopt(-3, 32 * 1024)  # blocks of 32 KiB and more mapped alone (as da3 train does)
torch.set_num_threads(2)
torch.backends.mkldnn.enabled = False  # PyTorch's own kernels: im2col and MKL's GEMM
x, w = torch.randn(1, 3, 225, 225), torch.randn(32, 3, 3, 3)
before = libc.mallinfo2().mapped
F.conv2d(x, w, None, 2)
print(libc.mallinfo2().mapped - before)
"""

TORCH_IMPORT_SCRIPT = """
import os, sys

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("MKL_DISABLE_FAST_MM", os.environ.get("MKL_DISABLE_FAST_MM"), flush=True)
            sys.meta_path.remove(self)

sys.meta_path.insert(0, Watch())
from da3.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(
    sys.platform != "linux" or "BLAS_INFO=mkl" not in torch.__config__.show(),
    reason="MKL's workspaces, measured through glibc's mallinfo2",
)
def test_da3_train_frees_mkl_workspaces(tmp_path):
    """MKL keeps each thread's GEMM workspace for its next call unless MKL_DISABLE_FAST_MM
    is set when torch loads: `da3 train` sets it before it first imports torch when the run
    puts memory first (micro-batches, a budget: from flags, a settings file or key=value),
    and a convolution on PyTorch's own kernels then leaves nothing mapped behind."""
    env = {k: v for k, v in os.environ.items() if k != "MKL_DISABLE_FAST_MM"}
    left = {}
    for how in ("kept", "freed"):
        run = [sys.executable, "-c", WORKSPACE_SCRIPT, how]
        out = subprocess.run(run, env=env, capture_output=True, text=True, check=True)
        left[how] = int(out.stdout.split()[-1])
    assert left["kept"] >= 2**20, left  # ~3 MiB per thread at this size
    assert left["freed"] < 2**18, left
    argv = ["train", "--domain", "d", "--data", str(tmp_path / "missing"), "--quiet"]
    argv += ["--store", str(tmp_path / "s"), "--batch-size", "8"]
    (tmp_path / "budget.yaml").write_text("memory_budget: 60MiB\n")
    for extra, freed in [
        ([], False),  # a whole batch's run keeps them (they cost time: memory_mkl.md)
        (["--micro-batch", "1"], True),
        (["micro_batch=2"], True),
        (["--micro-batch", "8"], False),  # the whole batch
        (["--config", str(tmp_path / "budget.yaml")], True),
    ]:
        out = subprocess.run(
            [sys.executable, "-c", TORCH_IMPORT_SCRIPT, *argv, *extra],
            env=env,
            capture_output=True,
            text=True,
        )
        assert out.returncode != 0 and "missing" in out.stderr  # the run fails, later
        seen = out.stdout.splitlines()[0]
        assert seen == ("MKL_DISABLE_FAST_MM 1" if freed else "MKL_DISABLE_FAST_MM None"), extra


# ---------------------------------------------------------------------------------------
# the optimizer


def test_adamw_is_torchs_bit_for_bit():
    import math

    def run(kind):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
        groups = [{"params": list(net[0].parameters())}, {"params": list(net[2].parameters())}]
        groups[1]["lr"] = 3e-3
        factors = [lambda s: 0.5 * (1 + math.cos(math.pi * min(s, 20) / 20)), lambda s: s > 2]
        if kind == "torch":
            opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.01)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, factors)
        else:
            opt = AdamW(groups, lr=1e-3, weight_decay=0.01)
            sched = LambdaSchedule(opt, factors)
        g = torch.Generator().manual_seed(1)
        for _ in range(25):
            loss = net(torch.randn(4, 5, generator=g)).pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        return [p.detach().clone() for p in net.parameters()], opt.state_dict()

    (theirs, tsd), (ours, osd) = run("torch"), run("da3")
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours, strict=True))
    assert tsd["state"].keys() == osd["state"].keys()
    for k in tsd["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(tsd["state"][k][key], osd["state"][k][key])


def test_adamw_state_round_trip():
    net = torch.nn.Linear(3, 2)
    opt = AdamW(net.parameters(), lr=0.1)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    copy = torch.nn.Linear(3, 2)
    copy.load_state_dict(net.state_dict())
    again = AdamW(copy.parameters(), lr=0.1)
    again.load_state_dict(opt.state_dict())
    for o in (opt, again):
        o.zero_grad()
    net(torch.ones(1, 3)).sum().backward()
    copy(torch.ones(1, 3)).sum().backward()
    opt.step(), again.step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), copy.parameters(), strict=True))


@pytest.mark.parametrize("decay", [0.0, 0.01])
@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_sgd_is_torchs_and_holds_one_buffer(decay, momentum):
    """SGD with momentum takes torch.optim.SGD's steps (to float rounding: each step's
    gradient is summed into the scaled buffer; two micro-batches' gradients add there too),
    with the same state; between steps a weight holds its buffer and no gradient, during
    the backward passes the buffer is the gradient autograd adds into: one tensor per
    weight. With momentum 0, plain gradients and no state."""
    import math

    def run(kind, micro):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
        groups = [{"params": list(net[0].parameters())}, {"params": list(net[2].parameters())}]
        groups[1]["lr"] = 0.03
        factors = [lambda s: 0.5 * (1 + math.cos(math.pi * min(s, 20) / 20)), lambda s: s > 2]
        opts = {"lr": 0.05, "momentum": momentum, "weight_decay": decay}
        opt = torch.optim.SGD(groups, **opts) if kind == "torch" else SGD(groups, **opts)
        sched = (
            torch.optim.lr_scheduler.LambdaLR(opt, factors)
            if kind == "torch"
            else LambdaSchedule(opt, factors)
        )
        g = torch.Generator().manual_seed(1)
        held = []
        for _ in range(25):
            x = torch.randn(4, 5, generator=g)
            opt.zero_grad(set_to_none=True)
            for part in (x[:2], x[2:]) if micro else (x,):
                net(part).pow(2).sum().backward()
            if kind == "da3" and momentum:
                state = [opt.state.get(p, {}).get("momentum_buffer") for p in net.parameters()]
                pairs = zip(net.parameters(), state, strict=True)
                held.append(all(b is None or p.grad is b for p, b in pairs))
            opt.step()
            sched.step()
        grads = [p.grad for p in net.parameters()]
        return [p.detach().clone() for p in net.parameters()], opt.state_dict(), held, grads

    theirs, tsd, _, _ = run("torch", micro=False)
    for micro in (False, True):
        ours, osd, held, grads = run("da3", micro)
        for a, b in zip(theirs, ours, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        for a, b in zip(tsd["param_groups"], osd["param_groups"], strict=True):
            assert {k: a[k] for k in b} == b  # torch's own options, and no others
        assert tsd["state"].keys() == osd["state"].keys()
        for k in tsd["state"]:
            want = tsd["state"][k]["momentum_buffer"]
            if momentum:
                torch.testing.assert_close(osd["state"][k]["momentum_buffer"], want)
            else:
                assert want is None
        if momentum:
            assert all(held) and all(g is None for g in grads)  # the buffer, and no gradient


def test_sgd_state_round_trip_and_a_step_without_zero_grad():
    net = torch.nn.Linear(3, 2)
    opt = SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        net(torch.ones(1, 3)).sum().backward()
        opt.step()
    copy = torch.nn.Linear(3, 2)
    copy.load_state_dict(net.state_dict())
    again = SGD(copy.parameters(), lr=0.1, momentum=0.9)
    again.load_state_dict(opt.state_dict())
    for o in (opt, again):
        o.zero_grad()
        o.zero_grad()  # twice: the buffer is scaled once
    net(torch.ones(1, 3)).sum().backward()
    copy(torch.ones(1, 3)).sum().backward()
    opt.step(), again.step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), copy.parameters(), strict=True))
    # a backward with no zero_grad before it: a gradient of its own, torch's update
    ref = torch.nn.Linear(3, 2)
    ref.load_state_dict(net.state_dict())
    theirs = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for mine, p in zip(net.parameters(), ref.parameters(), strict=True):
        theirs.state[p]["momentum_buffer"] = opt.state[mine]["momentum_buffer"].clone()
    for m in (net, ref):
        m(torch.ones(1, 3)).sum().backward()
    opt.step(), theirs.step()
    for a, b in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_sgd_halves_the_trainable_state_a_run_plans_and_holds(tmp_path, monkeypatch):
    """A DA3 domain trained with optimizer=sgd: its plan counts the weights twice (weights
    and buffers) where AdamW's counts them four times, and the run's record holds one
    buffer per weight and no gradient."""
    monkeypatch.setenv("DA3_CACHE_DIR", str(tmp_path / "cache"))
    from da3.training import plan_memory

    frozen = FrozenBackbone(create_backbone("efficientnet_lite0", None), forms="lean")
    model = build_model("da3", frozen, 3, make_config("da3", {"optimizer": "sgd"}))
    weights = sum(p.numel() * 4 for p in model.trainable_parameters())
    plans = {o: plan_memory(model, frozen, 64, 4, "cpu", o) for o in ("adamw", "sgd")}
    assert plans["adamw"].trainable_bytes == 4 * weights
    assert plans["sgd"].trainable_bytes == 2 * weights
    store = tmp_path / "store"
    folder = class_folder(tmp_path / "f", 3)
    args = ["train", "--domain", "d", "--data", str(folder), "--method", "da3"]
    args += ["--backbone", "efficientnet_lite0", "--weights", "none", "--image-size", "64"]
    args += ["--batch-size", "4", "--epochs", "1", "--store", str(store), "--quiet"]
    assert main(args + ["--micro-batch", "2", "optimizer=sgd", "lr=0.03"]) == 0
    memory = json.loads((store / "runs" / "d" / "history.json").read_text())["memory"]
    assert memory["gradient_bytes"] == 0
    assert memory["optimizer_bytes"] == memory["trainable_bytes"] > 0
    with pytest.raises(Da3Error, match="optimizer='adam'"):
        make_config("da3", {"optimizer": "adam"})
    with pytest.raises(Da3Error, match="momentum=1.0"):
        make_config("da3", {"optimizer": "sgd", "momentum": 1.0})


# ---------------------------------------------------------------------------------------
# the frozen backbone held once


def test_lean_only_backbone_holds_the_weights_once():
    both = FrozenBackbone(create_backbone("efficientnet_lite0", None))
    lean = FrozenBackbone(create_backbone("efficientnet_lite0", None), forms="lean")
    assert lean.fingerprint == both.fingerprint  # of the stock weights, taken before
    both.lean  # noqa: B018 - builds the lean form beside the stock one
    assert lean.weight_bytes() < 0.5 * both.weight_bytes()
    with pytest.raises(Da3Error, match="stock form"):
        lean.stock  # noqa: B018
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(
        lean.lean.forward_features(x), both.lean.forward_features(x), rtol=0, atol=0
    )


def test_finetune_trains_the_stock_network_without_a_copy():
    frozen = FrozenBackbone(create_backbone("efficientnet_lite0", None), forms="stock")
    stock = frozen.stock
    model = build_model("finetune", frozen, 3, make_config("finetune"))
    assert model.features.backbone is stock  # handed over, not copied
    state = model.domain_state()
    assert any(k.startswith("features.backbone.") for k in state)  # it is the domain's now


def test_train_settings_check_once():
    with pytest.raises(Da3Error, match="unknown backbone"):
        TrainSettings(domain="a", data="b", backbone="vgg")
    with pytest.raises(Da3Error, match="micro_batch"):
        TrainSettings(domain="a", data="b", micro_batch=-1)
    s = TrainSettings.from_values({"domain": "a", "data": "b", "epochs": "2", "reduction": "3"})
    assert s.epochs == 2 and s.method_config["reduction"] == 3
    assert TrainSettings.from_values(s.to_values()) == s  # config.yaml reads back as it was


def test_cache_entry_written_in_chunks_reads_back(tmp_path):
    labels = {s: np.arange(n) % 3 for s, n in (("train", 7), ("val", 2), ("test", 3))}
    images = {
        s: np.random.default_rng(0).integers(0, 255, (len(v), 3, 9, 9), dtype=np.uint8)
        for s, v in labels.items()
    }
    root = tmp_path / "data"
    cache.write_entry(
        root,
        "k",
        name="k",
        image_size=9,
        classes=["a", "b", "c"],
        source="here",
        splits={s: (labels[s], iter(np.array_split(images[s], 3))) for s in labels},
    )
    d = cache.read(root, "k", "k", 9)
    for s in labels:
        assert np.array_equal(getattr(d, s).images[:].numpy(), images[s])


@pytest.mark.slow
def test_process_memory_stage_measures_real_runs(tmp_path):
    """The bench stage: floors and one real `da3 train` process per run, each peak read two
    ways, the table with the ratios to fine-tuning."""
    from da3.bench import process_memory as pm

    folder = class_folder(tmp_path / "f", 3)
    spec = {
        "backbones": [["efficientnet_lite0", "none"]],
        "image_size": 64,
        "batch_size": 4,
        "epochs": 1,
        "per_class": 3,
    }
    result = pm.run_process_memory(
        ["finetune", "da3"], spec, work=tmp_path / "w", folder=folder, progress=lambda m: None
    )
    runs = [(r["method"], r["micro_batch"]) for r in result["rows"]]
    assert runs == [("finetune", 4), ("da3", 4), ("finetune", 1), ("da3", 1)]
    floor = result["floors"]["torch"]
    for r in result["rows"]:
        assert r["vmhwm_bytes"] > floor["vmhwm_bytes"] > 100 * 2**20
        assert r["vmhwm_above_floor_bytes"] == r["vmhwm_bytes"] - floor["vmhwm_bytes"]
        assert r["wait4_bytes"] >= r["vmhwm_bytes"]  # the kernel's figure covers the shutdown
        assert (r["frozen_weights_bytes"] > 0) == (r["method"] == "da3")  # finetune trains all
        assert r["peak_phase"]
    ft, da3 = result["rows"][0], result["rows"][1]
    assert ft["trainable_state_bytes"] > 10 * da3["trainable_state_bytes"]
    table = pm.markdown_table(result)
    assert "| da3 | 1 |" in table and "finetune b8 / this" in table
    assert result["bytecode"] == "compiled"
    # a run with settings of its own: SGD holds half of AdamW's trainable state
    env = {**os.environ, "DA3_CACHE_DIR": str(tmp_path / "w" / "cache")}
    sgd = pm.train_run(
        folder, tmp_path / "w" / "store", spec, "efficientnet_lite0", "none", "da3", 1, env,
        settings=["optimizer=sgd", "lr=0.005"],
    )  # fmt: skip
    assert sgd["settings"] == ["optimizer=sgd", "lr=0.005"]
    adamw = result["rows"][3]["trainable_state_bytes"]  # + a 4-byte step count per tensor
    assert 0 < adamw - 2 * sgd["trainable_state_bytes"] < 4 * 1000


def test_best_epoch_waits_on_disk(tmp_path, monkeypatch):
    """With a run folder, the best epoch's state is a file named by the checkpoint, not a
    copy in memory; the file it replaces goes once the checkpoint names the new one."""
    monkeypatch.setenv("DA3_CACHE_DIR", str(tmp_path / "cache"))
    from da3.io import LazyTensors, read_json
    from da3.train import TrainConfig, fit_domain

    data = load_domain(class_folder(tmp_path / "f", 6), 32)
    frozen = FrozenBackbone(create_backbone("efficientnet_lite0", None))
    model = build_model("linear", frozen, 3, make_config("linear", {"lr": 0.05}))
    run = tmp_path / "run"
    run.mkdir()
    config = TrainConfig(epochs=3, batch_size=4, augment=False)
    result = fit_domain(model, data, frozen.preprocess, make_config("linear"), config, run_dir=run)
    assert isinstance(result.best_state, LazyTensors)
    files = sorted(p.name for p in run.glob("best-epoch*.safetensors"))
    assert files == [f"best-epoch{result.best_epoch}.safetensors"]
    assert read_json(run / "checkpoint.json")["best_file"] == files[0]
    assert set(result.best_state) == set(model.domain_state())


def test_a_measured_process_does_not_inherit_the_peak_of_the_one_that_starts_it():
    """Linux carries the peak of the address space a program is exec'd from into its own
    ru_maxrss: the memory stage starts each run through a small launcher, so a tiny process
    started from a large one reports its own peak."""
    from da3.bench.process_memory import _run

    ballast = torch.ones(256 * 2**20 // 4)  # this process: at least 256 MiB more
    ballast += 1  # touched, so resident
    peak, out, _, _ = _run([sys.executable, "-S", "-c", "print('ok')"])
    assert out.strip() == "ok"
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB: the parent's size leaked in"
    del ballast


def test_measured_runs_load_da3_from_bytecode():
    """The memory stage compiles da3's modules first: a run that may not write bytecode
    (``PYTHONDONTWRITEBYTECODE``) still loads every module it imports compiled, as from an
    installed package, rather than compiling each from source at its start."""
    from da3.bench.process_memory import compile_bytecode

    assert compile_bytecode()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    code = "import da3.commands, da3.training, da3.train, da3.domains"
    log = subprocess.run(
        [sys.executable, "-v", "-c", code], env=env, capture_output=True, text=True, check=True
    ).stderr
    loaded = re.findall(r"^# code object from '?(\S+?)'?$", log, re.M)
    ours = [p for p in loaded if "da3" in Path(p).parts]
    assert len(ours) > 20  # every da3 module those import
    assert all(p.endswith(".pyc") for p in ours), [p for p in ours if not p.endswith(".pyc")]


def test_memory_results_of_two_sittings_merge_side_by_side():
    from da3.bench.process_memory import markdown_table, merge_results

    def part(backbone, floor, rows):
        spec = {"image_size": 224, "batch_size": 8, "epochs": 1, "per_class": 8}
        return {
            "info": {"command": f"run {backbone}", "stage_seconds": {"memory": 10.0}},
            "spec": {**spec, "backbones": [[backbone, "x"]], "methods": [m for m, _ in rows]},
            "folder": "f",
            "floors": {floor: {"modules": floor, "vmhwm_bytes": 1, "wait4_bytes": 2}},
            "rows": [
                {"backbone": backbone, "method": m, "micro_batch": mb, "floor": floor,
                 "weights": "x", "vmhwm_above_floor_bytes": 2**20 * v,
                 "wait4_above_floor_bytes": 0, "frozen_weights_bytes": 0,
                 "trainable_state_bytes": 0, "peak_phase": "training", "test_accuracy": 0.5}
                for m, mb, v in [(m, mb, v) for (m, mb), v in zip(rows, (100, 10), strict=True)]
            ],
        }  # fmt: skip

    a = part("efficientnet_lite0", "torch", [("finetune", 8), ("da3", 1)])
    b = part("resnet50", "torch+torchvision", [("finetune", 8), ("da3", 1)])
    merged = merge_results([a, b])
    assert [r["backbone"] for r in merged["rows"]] == ["efficientnet_lite0"] * 2 + ["resnet50"] * 2
    assert set(merged["floors"]) == {"torch", "torch+torchvision"}
    a["floors"]["torch+torchvision"] = {"modules": "torch, torchvision", "vmhwm_bytes": 7}
    b["floors"]["torch"] = {"modules": "torch", "vmhwm_bytes": 9}
    again = merge_results([a, b])["floors"]  # each backbone's from its own sitting
    assert again["torch"]["vmhwm_bytes"] == 1 and again["torch+torchvision"]["vmhwm_bytes"] == 1
    assert merged["info"]["stage_seconds"]["memory"] == 20.0
    assert "bytecode" not in a and merged["bytecode"] == "not recorded"
    b["info"]["commit"] = "abc1234"
    a["info"]["commit"] = "def5678"
    assert merge_results([a, b])["info"]["commit"] == "def5678, abc1234"  # both sittings
    table = markdown_table(merged)
    assert "**efficientnet_lite0**" in table and "**resnet50**" in table and "10.0x" in table
    b["rows"][1] |= {"frozen_bits": 8, "settings": ["optimizer=sgd", "lr=0.005"]}
    assert "| da3 (8-bit frozen, optimizer=sgd, lr=0.005) | 1 |" in markdown_table(b)
    b["rows"] = b["rows"][1:]  # no fine-tuning row: no ratio to it
    assert "| 1 | 10.0 MiB | - | - |" in markdown_table(b)
    b["spec"]["image_size"] = 96
    with pytest.raises(Da3Error, match="differ"):
        merge_results([a, b])


@pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="Linux only")
def test_memory_parts_drops_and_counts_code_pages():
    """benchmarks/memory_parts.py counts the library code a build pages in and whether the
    steps page it in again: its page reader sees resident code, and a dropped page is gone
    from it until it runs again."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_parts.py"
    spec = importlib.util.spec_from_file_location("memory_parts", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.ones(8).add_(1).sum()  # code surely resident
    pages = mod.code_pages()
    assert len(pages) > 100 and all(p % mod.PAGE == 0 for p in pages)
    sample = set(sorted(pages)[:: max(1, len(pages) // 200)])
    mod.drop_pages(sample)
    # a few may run again at once (the interpreter's own loop): most stay out
    assert len(sample - mod.code_pages()) > len(sample) // 2
    assert torch.ones(8).add_(1).sum().item() == 16  # code read back in where it runs
