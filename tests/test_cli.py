"""The ``da3`` command line: train / domains / eval / predict on a tiny image folder, settings
from YAML and ``key=value``, ``--resume``, and faults.

Every fault exits with status 2 and one stderr line ``da3: error: <what and where>``, without
a traceback, and leaves the domains already saved untouched. Most commands run in-process
through ``da3.cli.main``; two run as a real ``da3`` process. ``--weights none`` keeps them
fast; a domain trained on those random weights must reload in any other process, whatever
the state of torch's global generator there (``cli(seed=...)`` stands in for that).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import da3.train
from da3.cli import build_parser, main
from da3.commands import resolve_settings
from da3.domains import DomainStore

CLASSES = ["blue", "green", "red"]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
PNG = b"\x89PNG\r\n\x1a\n"
DA3 = Path(sys.executable).with_name("da3")


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def make_folder(root: Path, per_class: int = 12, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noise = rng.integers(-40, 40, (size, size, 3))
            pixels = np.clip(np.array(colour)[None, None] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A toy ImageFolder domain, a data cache, and a store with domain 'toy' trained once."""
    base = tmp_path_factory.mktemp("cli")
    data = make_folder(base / "toy-data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DA3_CACHE_DIR", str(base / "cache"))
        code = cli(*train_args("toy", data, base / "golden"))
    assert code == 0
    return {"data": data, "cache": base / "cache", "golden": base / "golden"}


@pytest.fixture
def env(shared, tmp_path, monkeypatch):
    """A test's own copy of the trained store (``env['store']``), the shared data cache."""
    monkeypatch.setenv("DA3_CACHE_DIR", str(shared["cache"]))
    monkeypatch.delenv("DA3_STORE", raising=False)
    store = tmp_path / "store"
    shutil.copytree(shared["golden"], store)
    return {**shared, "store": store, "tmp": tmp_path}


def cli(*args, seed: int = 0) -> int:
    torch.manual_seed(seed)  # each real process starts from its own random state
    return main([str(a) for a in args])


def train_args(name, data, store, *extra):
    return [
        "train",
        "--domain",
        name,
        "--data",
        data,
        "--backbone",
        "efficientnet_lite0",
        "--weights",
        "none",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--quiet",
        "--store",
        store,
        *extra,
    ]


def snapshot(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.glob("*")) if p.is_file()}


def one_error_line(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("da3: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------
# the happy path


def test_train_list_show_eval_predict_delete(env, capsys):
    store, data = env["store"], env["data"]
    capsys.readouterr()
    assert cli(*train_args("colours", data, store, "reduction=2", "gates=true")) == 0
    out = capsys.readouterr().out
    assert "domain colours:" in out and "run folder" in out
    assert (store / "colours.safetensors").is_file() and (store / "colours.json").is_file()
    run = store / "runs" / "colours"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["reduction"] == 2 and resolved["gates"] is True
    assert resolved["method"] == "da3" and resolved["weights"] == "none"
    assert resolved["image_size"] == 32 and resolved["epochs"] == 1
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history["history"]] == [1]
    assert 0 <= history["metrics"]["test_accuracy"] <= 1
    png = (run / "curves.png").read_bytes()
    assert png.startswith(PNG) and len(png) > 1000
    meta = json.loads((store / "colours.json").read_text())
    assert meta["classes"] == CLASSES and meta["config"]["reduction"] == 2
    assert meta["source"] == str(data)

    assert cli("domains", "list", "--store", store) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(lines) == {"colours", "toy"}
    assert "da3" in lines["colours"] and "efficientnet_lite0" in lines["colours"]

    assert cli("domains", "show", "colours", "--store", store, "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == "colours" and shown["classes"] == CLASSES
    assert shown["tensors"]["head.weight"] == [3, 1280]
    assert any(".gate." in k for k in shown["tensors"])

    assert cli("eval", "--domain", "colours", "--store", store) == 0
    out = capsys.readouterr().out
    assert "colours" in out and "top-1" in out and "[test," in out

    image = data / "red" / "00.png"
    assert cli("predict", image, "--domain", "colours", "--store", store) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"{image}:")
    assert sorted(part.split()[0] for part in out[0].split(": ", 1)[1].split(", ")) == CLASSES

    assert cli("predict", data, "--domain", "colours", "--top-k", "1", "--store", store) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 3 * 12
    assert all(line.split(": ", 1)[1].split()[0] in CLASSES for line in out)

    assert cli("domains", "delete", "colours", "--store", store) == 0
    assert not (store / "colours.json").exists() and not (store / "colours.safetensors").exists()
    assert (store / "toy.json").exists()
    capsys.readouterr()
    assert cli("domains", "delete", "toy", "--store", store) == 0
    assert cli("domains", "list", "--store", store) == 0
    assert "no domains" in capsys.readouterr().out


def test_overwrite_replaces_the_domain(env, capsys):
    store = env["store"]
    before = snapshot(store)
    assert cli(*train_args("toy", env["data"], store, "--overwrite", "reduction=1")) == 0
    after = snapshot(store)
    assert after["toy.json"] != before["toy.json"]
    assert json.loads(after["toy.json"])["config"]["reduction"] == 1


# ---------------------------------------------------------------------------------------
# settings: defaults < YAML < flags < key=value


def test_config_file_and_overrides(env, capsys):
    cfg = env["tmp"] / "settings.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "epochs": 1,
                "batch-size": 4,
                "seed": 2,
                "reduction": 3,
                "hidden_ratio": 0.5,
                "image_size": 32,
                "weights": "none",
                "augment": False,
            }
        )
    )
    args = ["train", "--domain", "y", "--data", env["data"], "--quiet", "--store", env["store"]]
    assert cli(*args, "--config", cfg, "--batch-size", "6", "reduction=2") == 0
    resolved = yaml.safe_load((env["store"] / "runs" / "y" / "config.yaml").read_text())
    assert resolved["batch_size"] == 6  # flag over YAML
    assert resolved["seed"] == 2 and resolved["augment"] is False  # YAML over defaults
    assert resolved["reduction"] == 2  # key=value over YAML
    assert resolved["hidden_ratio"] == 0.5
    assert resolved["backbone"] == "efficientnet_lite0"  # default
    assert json.loads((env["store"] / "y.json").read_text())["train"]["batch_size"] == 6


def _settings(*argv):
    return resolve_settings(build_parser().parse_args(["train", *map(str, argv)]))


def test_resolve_settings_precedence(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("epochs: 3\nmethod: bias\nlr: 0.5\n")
    run = _settings("--domain", "d", "--data", "x", "--config", cfg)
    assert run.epochs == 3 and run.method == "bias" and run.method_config["lr"] == 0.5
    run = _settings(
        "--domain", "d", "--data", "x", "--config", cfg, "--epochs", "4", "epochs=5", "lr=0.1"
    )
    assert run.epochs == 5 and run.method_config["lr"] == 0.1
    run = _settings("--domain", "d", "--data", "x", "augment=no")
    assert run.augment is False and run.method == "da3" and run.weights == "imagenet"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("epochs: [1\n", "not valid YAML"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("bogus: 1\n", "unknown setting 'bogus'"),
        ("epochs: many\n", "'epochs' expects an integer"),
        ("epochs: 0\n", "'epochs' must be positive"),
        (None, "file not found"),
    ],
)
def test_bad_config_file(env, capsys, text, needle):
    cfg = env["tmp"] / "bad.yaml"
    if text is not None:
        cfg.write_text(text)
    argv = ["train", "--domain", "z", "--data", env["data"], "--weights", "none", "--quiet"]
    code = cli(*argv, "--store", env["store"], "--config", cfg)  # each fails before training
    assert code == 2
    one_error_line(capsys.readouterr().err, needle)
    assert not (env["store"] / "z.json").exists()


# ---------------------------------------------------------------------------------------
# faults


def _corrupt_png(env) -> list:
    bad = env["tmp"] / "broken.png"
    bad.write_bytes(PNG + os.urandom(200))
    return ["predict", bad, "--domain", "toy", "--store", env["store"]], ["broken.png", "corrupt"]


def _truncated_tensors(env) -> list:
    path = env["store"] / "toy.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    return ["eval", "--domain", "toy", "--store", env["store"]], ["toy.safetensors"]


def _other_backbone(env) -> list:
    path = env["store"] / "toy.json"
    meta = json.loads(path.read_text())
    meta["backbone"]["fingerprint"] = "0" * 64
    path.write_text(json.dumps(meta))
    return ["eval", "--domain", "toy", "--store", env["store"]], ["toy.json", "backbone"]


def _garbage_json(env) -> list:
    (env["store"] / "toy.json").write_text("{not json")
    return ["predict", env["data"], "--domain", "toy", "--store", env["store"]], ["toy.json"]


def _unwritable_store(env) -> list:
    if os.geteuid() == 0:  # root writes through chmod: a path under a regular file instead
        (env["tmp"] / "afile").write_text("not a folder")
        store = env["tmp"] / "afile" / "store"
    else:
        store = env["tmp"] / "ro"
        store.mkdir()
        store.chmod(0o500)
    return train_args("new", env["data"], store), ["cannot write here"]


FAULTS = {
    "unknown method": lambda env: (
        train_args("x", env["data"], env["store"], "--method", "nope"),
        ["unknown method 'nope'"],
    ),
    "unknown backbone": lambda env: (
        [*train_args("x", env["data"], env["store"]), "--backbone", "vgg"],
        ["unknown backbone 'vgg'"],
    ),
    "eval unknown domain": lambda env: (
        ["eval", "--domain", "nope", "--store", env["store"]],
        ["unknown domain 'nope'", "toy"],
    ),
    "predict unknown domain": lambda env: (
        ["predict", env["data"], "--domain", "nope", "--store", env["store"]],
        ["unknown domain 'nope'"],
    ),
    "predict missing path": lambda env: (
        ["predict", env["tmp"] / "nothing.png", "--domain", "toy", "--store", env["store"]],
        ["nothing.png", "no such file"],
    ),
    "unknown config key": lambda env: (
        train_args("x", env["data"], env["store"], "bogus=1"),
        ["unknown setting 'bogus'"],
    ),
    "wrong type": lambda env: (
        train_args("x", env["data"], env["store"], "reduction=abc"),
        ["'reduction'", "abc"],
    ),
    "not key=value": lambda env: (
        train_args("x", env["data"], env["store"], "reduction"),
        ["key=value"],
    ),
    "bad domain name": lambda env: (train_args("../x", env["data"], env["store"]), ["name"]),
    "data folder missing": lambda env: (
        train_args("x", env["tmp"] / "nowhere", env["store"]),
        ["nowhere"],
    ),
    "corrupt image": _corrupt_png,
    "truncated safetensors": _truncated_tensors,
    "other backbone": _other_backbone,
    "garbage json": _garbage_json,
    "exists without --overwrite": lambda env: (
        train_args("toy", env["data"], env["store"]),
        ["'toy' exists", "--overwrite"],
    ),
    "resume without checkpoint": lambda env: (
        train_args("fresh", env["data"], env["store"], "--resume"),
        ["no checkpoint"],
    ),
    "unwritable store": _unwritable_store,
    "profile unknown method": lambda env: (
        ["profile", "--method", "linear,nope", "--backbone", "resnet18", "--no-peak"],
        ["unknown method 'nope'"],
    ),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_is_one_clean_error(env, capsys, fault):
    argv, needles = FAULTS[fault](env)
    # what must survive: every file of the store other than the one broken on purpose
    broken = {"truncated safetensors": "toy.safetensors", "other backbone": "toy.json"}
    broken["garbage json"] = "toy.json"
    before = snapshot(env["store"])
    capsys.readouterr()
    assert cli(*argv) == 2
    one_error_line(capsys.readouterr().err, *needles)
    after = snapshot(env["store"])
    assert after == before, fault
    if fault not in broken:
        assert cli("domains", "show", "toy", "--store", env["store"], "--json") == 0
        assert json.loads(capsys.readouterr().out)["name"] == "toy"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--domain", "x", "--data", "y", "--method", "nope"], "unknown method 'nope'"),
        (["eval", "--domain", "nope"], "unknown domain 'nope'"),
    ],
    ids=["train-unknown-method", "eval-unknown-domain"],
)
def test_real_process_exits_2_with_one_line(tmp_path, argv, needle):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DA3_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [str(DA3), *argv, "--store", str(tmp_path / "store")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    one_error_line(proc.stderr, needle)
    assert proc.stdout == ""


# ---------------------------------------------------------------------------------------
# --resume after a killed run


def test_resume_after_interrupt(env, capsys, monkeypatch):
    store, data = env["store"], env["data"]
    real = da3.train.train_step
    calls = {"n": 0}

    def dies_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # 21 training images, batch 8: 3 steps per epoch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(da3.train, "train_step", dies_in_epoch_2)
    argv = train_args("long", data, store, "--epochs", "2")
    capsys.readouterr()
    assert cli(*argv) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not (store / "long.json").exists()  # nothing saved for an unfinished run
    (folder,) = DomainStore(store).checkpoint_dirs("long")  # the run's own checkpoint folder
    assert folder.parent == store / "runs" / "long" / "checkpoints"
    ckpt = json.loads((folder / "checkpoint.json").read_text())
    assert ckpt["epoch"] == 0 and len(ckpt["history"]) == 1
    monkeypatch.setattr(da3.train, "train_step", real)

    # a resume with other settings is refused; the same settings continue
    assert cli(*argv, "--resume", "reduction=1") == 2
    one_error_line(capsys.readouterr().err, "different run")
    assert cli(*argv, "--resume") == 0
    history = json.loads((store / "runs" / "long" / "history.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0] == ckpt["history"][0]  # epoch 1 comes from the checkpoint, not redone
    assert (store / "long.json").exists() and (store / "long.safetensors").exists()
    assert DomainStore(store).checkpoint_dirs("long") == [folder]  # continued in its folder
    assert cli("eval", "--domain", "long", "--store", store) == 0


def test_random_weights_domain_is_usable_from_another_process(env, capsys):
    # Every process starts torch's generator from its own random seed: 0, 1, 2 here.
    assert cli(*train_args("r", env["data"], env["store"]), seed=0) == 0
    capsys.readouterr()
    assert cli("eval", "--domain", "r", "--store", env["store"], seed=1) == 0
    image = env["data"] / "blue" / "03.png"
    assert cli("predict", image, "--domain", "r", "--store", env["store"], seed=2) == 0
    assert capsys.readouterr().out.count("03.png") == 1


def _no_cuda(argv):
    return pytest.param(
        argv,
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here"),
    )


@pytest.mark.parametrize(
    "extra",
    [
        ["reduction=0"],  # ZeroDivisionError in DA3Block
        ["lr=-1"],  # ValueError from torch.optim.AdamW
        ["hidden_ratio=nan"],  # ValueError: cannot convert float NaN to integer
        ["device=gpu"],  # key=value bypasses --device's choices: RuntimeError from torch
        ["augment=maybe"],  # silently False: trains and exits 0
        _no_cuda(["--device", "cuda"]),  # RuntimeError: no NVIDIA driver
    ],
    ids=lambda extra: " ".join(extra),
)
def test_out_of_range_setting_is_one_clean_error(env, capsys, extra):
    before = snapshot(env["store"])
    assert cli(*train_args("bad", env["data"], env["store"], *extra)) == 2
    one_error_line(capsys.readouterr().err)
    assert snapshot(env["store"]) == before


def test_predict_negative_top_k_is_one_clean_error(env, capsys):
    image = env["data"] / "red" / "00.png"
    assert cli("predict", image, "--domain", "toy", "--top-k", "-1", "--store", env["store"]) == 2
    one_error_line(capsys.readouterr().err, "top-k")
