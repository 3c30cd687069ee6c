"""A user's first hour (issue #21): the command line and the Python API do what they say, on
the user's own folder. One test (or a few) per item of the issue, numbered as there.

Most run in-process through ``da3.cli.main`` on a toy folder with ``--weights none`` (fast);
the start-up checks run a real process, since what matters is what a fresh interpreter imports.
"""

from __future__ import annotations

import json
import logging
import os
import re
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
from da3.cli import main
from da3.data import load_domain
from da3.data.folder import layout_notes, scan
from da3.errors import Da3Error
from da3.store import DomainStore

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
PNG = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def make_folder(root: Path, counts: dict[str, int] | None = None, size: int = 32) -> Path:
    """root/<class>/NN.png: noisy solid colours (a class outside COLOURS is gray)."""
    rng = np.random.default_rng(0)
    for name, n in (counts or dict.fromkeys(COLOURS, 12)).items():
        (root / name).mkdir(parents=True)
        colour = np.array(COLOURS.get(name, (128, 128, 128)))
        for i in range(n):
            noise = rng.integers(-40, 40, (size, size, 3))
            pixels = np.clip(colour[None, None] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")
    return root


def cli(*args) -> int:
    torch.manual_seed(0)
    return main([str(a) for a in args])


def train_args(name, data, store, *extra):
    return [
        "train",
        "--domain",
        name,
        "--data",
        data,
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


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A toy folder, a data cache, and a store with 'toy' (plain) and 'gated' trained once."""
    base = tmp_path_factory.mktemp("hour")
    data = make_folder(base / "toy")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DA3_CACHE_DIR", str(base / "cache"))
        assert cli(*train_args("toy", data, base / "golden")) == 0
        assert cli(*train_args("gated", data, base / "golden", "gates=true")) == 0
    return {"data": data, "cache": base / "cache", "golden": base / "golden"}


@pytest.fixture
def env(shared, tmp_path, monkeypatch):
    monkeypatch.setenv("DA3_CACHE_DIR", str(shared["cache"]))
    monkeypatch.delenv("DA3_STORE", raising=False)
    store = tmp_path / "store"
    shutil.copytree(shared["golden"], store)
    return {**shared, "store": store, "tmp": tmp_path}


def one_error_line(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("da3: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def meta(store: Path, name: str) -> dict:
    return json.loads((store / f"{name}.json").read_text())


# ---------------------------------------------------------------------------------------
# 1. the README's Python example saves the domain it trained


def _readme_block(containing: str) -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    (block,) = [b for b in blocks if containing in b]
    return block


def test_1_readme_python_example_records_image_size_and_data(env, capsys):
    code = _readme_block("add_domain")
    assert 'load_domain("photos/flowers", image_size=64)' in code
    # the same code on the toy folder, with random weights and one epoch (fast)
    code = (
        code.replace('load_domain("photos/flowers"', f"load_domain({str(env['data'])!r}")
        .replace('"imagenet"', '"none"')
        .replace("epochs=4", "epochs=1, batch_size=8")
        .replace('DomainStore("da3-store")', f"DomainStore({str(env['store'])!r})")
    )
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own example
    saved = meta(env["store"], "flowers-by-hand")
    assert saved["image_size"] == 64  # the data's size, not add_domain's old default of 96
    assert saved["source"] == str(env["data"])  # so `da3 eval` needs no --data
    capsys.readouterr()
    assert cli("eval", "--domain", "flowers-by-hand", "--store", env["store"]) == 0
    assert "[test, 12 images]" in capsys.readouterr().out


def test_1_add_domain_takes_the_data_and_checks_image_sizes(env):
    from da3.backbones import create_backbone
    from da3.domains import MultiDomainModel

    data = load_domain(env["data"], 40)
    model = MultiDomainModel(create_backbone("efficientnet_lite0", None))
    d = model.add_domain("a", data, "linear")
    assert (d.classes, d.image_size, d.source) == (sorted(COLOURS), 40, str(env["data"]))
    with pytest.raises(Da3Error, match="loaded at 40 px"):
        model.add_domain("b", data, "linear", image_size=64)
    model.add_domain("c", data.classes, "linear")  # classes only: 96 px, as before
    with pytest.raises(Da3Error, match="takes 96 x 96 px images.*got 40 x 40"):
        model.predict(data.test.images[:2], "c")


def test_1_every_path_records_image_size_and_source(env):
    # the command line (and train_domain under it)
    toy = meta(env["store"], "toy")
    assert toy["image_size"] == 32 and toy["source"] == str(env["data"])
    assert toy["train"]["data"] == str(env["data"])


# ---------------------------------------------------------------------------------------
# 2. config.yaml is a valid --config


def test_2_run_config_repeats_the_run(env, capsys):
    store = env["store"]
    config = store / "runs" / "toy" / "config.yaml"
    argv = ["train", "--config", config, "--domain", "toy-repro", "--quiet", "--store", store]
    assert cli(*argv) == 0
    first, again = (
        yaml.safe_load((store / "runs" / n / "config.yaml").read_text())
        for n in ("toy", "toy-repro")
    )
    assert {**first, "domain": "toy-repro"} == again
    assert meta(store, "toy-repro")["config"] == meta(store, "toy")["config"]


def test_2_old_nested_config_still_reads(env, capsys):
    old = env["tmp"] / "old.yaml"
    old.write_text(
        yaml.safe_dump(
            {
                "domain": "x",
                "data": str(env["data"]),
                "epochs": 1,
                "image_size": 32,
                "weights": "none",
                "batch_size": 8,
                "config": {"reduction": 2},
            }
        )
    )
    assert cli("train", "--config", old, "--domain", "old", "--quiet", "--store", env["store"]) == 0
    assert meta(env["store"], "old")["config"]["reduction"] == 2


# ---------------------------------------------------------------------------------------
# 3. eval on any labelled folder: all of it, a subset of the classes, named in messages


def test_3_eval_scores_all_of_another_folder_with_a_subset_of_classes(env, capsys):
    sub = env["tmp"] / "sub"
    for c in ("red", "blue"):
        shutil.copytree(env["data"] / c, sub / c)
    capsys.readouterr()
    assert cli("eval", "--domain", "toy", "--data", sub, "--store", env["store"]) == 0
    out = capsys.readouterr().out
    assert "[all, 24 images, 2 of the domain's 3 classes]" in out
    for split, n in (("test", 8), ("val", 2), ("train", 14)):
        assert (
            cli("eval", "--domain", "toy", "--data", sub, "--split", split, "--store", env["store"])
            == 0
        )
        assert f"[{split}, {n} images" in capsys.readouterr().out
    # the domain's own data: its test split by default, all of it on request
    assert cli("eval", "--domain", "toy", "--store", env["store"]) == 0
    assert "[test, 12 images]" in capsys.readouterr().out
    assert cli("eval", "--domain", "toy", "--split", "all", "--store", env["store"]) == 0
    assert "[all, 36 images]" in capsys.readouterr().out


def test_3_one_class_folder_and_unknown_classes(env, capsys):
    one = env["tmp"] / "one"
    shutil.copytree(env["data"] / "green", one / "green")
    assert cli("eval", "--domain", "toy", "--data", one, "--store", env["store"]) == 0
    assert "[all, 12 images, 1 of the domain's 3 classes]" in capsys.readouterr().out
    shutil.copytree(env["data"] / "red", one / "pink")
    assert cli("eval", "--domain", "toy", "--data", one, "--store", env["store"]) == 2
    line = one_error_line(capsys.readouterr().err, "pink", "'toy'", "blue, green, red")
    assert "''" not in line


# ---------------------------------------------------------------------------------------
# 4. no silent surprises in the data


def test_4_training_summarises_and_warns_about_the_data(env, capsys):
    folder = make_folder(env["tmp"] / "uneven", {"red": 12, "green": 12, "blue": 3, "odd": 1})
    (folder / "red" / "notes.txt").write_text("taken in June")  # refused before: now skipped
    assert cli(*train_args("uneven", folder, env["store"])) == 0
    out = capsys.readouterr().out
    assert "data: " in out and "28 images" not in out
    assert "classes (train/val/test images): blue 2/0/1, green 7/1/4, odd 1/0/0, red 7/1/4" in out
    warnings = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert any(
        "2 of 4 classes have fewer than 5 images" in w and "odd 1/0/0" in w for w in warnings
    ), out
    assert any("notes.txt" in w for w in warnings), out


def test_4_a_folder_one_level_too_high_is_warned_about(env, capsys):
    photos = env["tmp"] / "photos"
    make_folder(photos / "2023", {"red": 3, "blue": 3})
    make_folder(photos / "2024", {"red": 3, "blue": 3})
    assert cli(*train_args("years", photos, env["store"])) == 0  # a warning, not a failure
    out = capsys.readouterr().out
    assert re.search(
        r"warning: the class folders are named like years.*2023, 2024.*one level "
        r"too high",
        out,
    ), out


def test_4_layout_notes(tmp_path):
    same = tmp_path / "same"
    for c in ("a", "b"):
        make_folder(same / c, {"summer": 1, "winter": 1})
    (note,) = layout_notes(scan(same))
    assert "same sub-folders (summer, winter)" in note and "one level too high" in note
    splits = make_folder(tmp_path / "splits", {"training": 1, "testing": 1})
    (note,) = layout_notes(scan(splits))
    assert "testing, training look like splits" in note
    assert layout_notes(scan(make_folder(tmp_path / "fine", {"cat": 2, "dog": 2}))) == []


# ---------------------------------------------------------------------------------------
# 5. fast where it should be: no torch to list or to ask for help; export shows progress


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["train", "--help"], ["domains", "list"], ["data", "list"], ["cache", "list"]],
    ids=" ".join,
)
def test_5_commands_that_do_not_train_do_not_import_torch(tmp_path, argv):
    code = (
        "import sys\nfrom da3.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'torchvision', 'safetensors') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        "DA3_CACHE_DIR": str(tmp_path / "cache"),
        "DA3_STORE": str(tmp_path / "store"),
    }
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def test_5_export_shows_its_steps(env, capsys):
    target = env["tmp"] / "toy.pt"
    argv = ["export", "--domain", "toy", "--format", "TorchScript", "--samples", "2"]
    assert cli(*argv, "--out", target, "--store", env["store"]) == 0
    out = capsys.readouterr().out
    steps = [line for line in out.splitlines() if re.match(r"\s+\[\s*\d+s\] ", line)]
    assert len(steps) >= 4, out
    assert "converting to TorchScript" in out and "checking it against PyTorch" in out
    assert out.splitlines()[-2].startswith("exported toy")


# ---------------------------------------------------------------------------------------
# 6. defaults and rules in the open; the cache can be listed and cleared


def test_6_help_shows_the_defaults(capsys):
    for argv, needles in (
        (
            ["train", "--help"],
            [
                "(default 5)",
                "(default 96)",
                "(default 32)",
                "(default da3)",
                "60/10/30",
                "da3 cache",
            ],
        ),
        (["eval", "--help"], ["default: test", "all for other data"]),
        (["predict", "--help"], ["(default 3)"]),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        text = " ".join(capsys.readouterr().out.split())
        for n in needles:
            assert n in text, (argv, n)


def test_6_help_defaults_are_train_settings_defaults():
    import dataclasses

    from da3.commands import TRAIN_DEFAULTS
    from da3.data import DEFAULT_IMAGE_SIZE
    from da3.training import TrainSettings

    fields = {f.name: f.default for f in dataclasses.fields(TrainSettings)}
    assert {k: fields[k] for k in TRAIN_DEFAULTS} == TRAIN_DEFAULTS
    assert TRAIN_DEFAULTS["image_size"] == DEFAULT_IMAGE_SIZE


def test_6_demo_help_defaults_are_the_demo_s(capsys):
    from da3.demo import DEMO_EPOCHS, DEMO_IMAGE_SIZE

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"epochs per domain (default {DEMO_EPOCHS})" in text
    assert f"--image-size IMAGE_SIZE (default {DEMO_IMAGE_SIZE})" in text


def test_6_cache_list_and_clear(env, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DA3_CACHE_DIR", str(tmp_path / "own-cache"))
    gone = make_folder(tmp_path / "gone", {"a": 2, "b": 2})
    load_domain(env["data"], 32)
    load_domain(env["data"], 40)
    load_domain(gone, 32)
    shutil.rmtree(gone)
    assert cli("cache", "list") == 0
    out = capsys.readouterr().out
    assert out.count(str(env["data"])) == 2 and "(gone)" in out and "3 entries" in out
    assert cli("cache", "clear", "--missing") == 0
    assert "removed 1 cache entries" in capsys.readouterr().out
    assert cli("cache", "clear", "nothing-like-this") == 2
    one_error_line(capsys.readouterr().err, "'nothing-like-this'", "da3 cache list")
    assert cli("cache", "clear", env["data"]) == 0
    assert "removed 2 cache entries" in capsys.readouterr().out
    assert cli("cache", "list") == 0
    assert "the cache is empty" in capsys.readouterr().out


def test_6_a_changed_folder_is_rebuilt_without_a_warning(tmp_path, caplog):
    folder = make_folder(tmp_path / "f", {"a": 3, "b": 3})
    load_domain(folder, 16, cache_dir=tmp_path / "c")
    Image.new("RGB", (8, 8)).save(folder / "a" / "new.png")
    with caplog.at_level(logging.INFO, logger="da3"):
        data = load_domain(folder, 16, cache_dir=tmp_path / "c")
    assert sum(data.counts().values()) == 7
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not re.search(r"[0-9a-f]{64}", caplog.text)  # no fingerprints in what is said


def test_6_docs_say_how_a_folder_is_split_and_where_the_cache_is():
    for doc in ("README.md", "docs/data.md"):
        text = " ".join((ROOT / doc).read_text().split())
        for needle in (
            "60/10/30",
            "~/.cache/da3",
            "DA3_CACHE_DIR",
            "da3 cache clear",
            "--image-size 96" if doc == "README.md" else "fewer than 5 images",
        ):
            assert needle in text, (doc, needle)


# ---------------------------------------------------------------------------------------
# 7. lifecycle: delete, show, list, Ctrl-C, --quiet


def test_7_delete_removes_runs_and_exports_and_says_so(env, capsys):
    store = env["store"]
    exports = store / "exports"
    exports.mkdir()
    for name, domain in (("toy.onnx", "toy"), ("toy.static.pt", "toy"), ("gated.onnx", "gated")):
        (exports / name).write_bytes(b"model")
        (exports / f"{name}.json").write_text(
            json.dumps({"format": "da3-export", "domain": domain})
        )
    assert (store / "runs" / "toy" / "history.json").is_file()
    capsys.readouterr()
    assert cli("domains", "delete", "toy", "--store", store) == 0
    out = capsys.readouterr().out
    assert f"run folder {store / 'runs' / 'toy'}" in out
    assert "exports/toy.onnx" in out and "exports/toy.static.pt" in out
    assert not (store / "runs" / "toy").exists()
    assert sorted(p.name for p in exports.iterdir()) == ["gated.onnx", "gated.onnx.json"]
    assert (store / "gated.json").is_file() and (store / "runs" / "gated").is_dir()


def test_7_show_is_a_summary_and_list_has_size_and_gates(env, capsys):
    assert cli("domains", "show", "gated", "--store", env["store"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) < 20 and "input_size" not in out
    assert re.search(r"image size\s+32 px", out) and str(env["data"]) in out
    assert re.search(r"gates\s+on; on test: \d+% of gated branches run", out), out
    assert cli("domains", "show", "gated", "--json", "--store", env["store"]) == 0
    assert json.loads(capsys.readouterr().out)["image_size"] == 32
    assert cli("domains", "list", "--store", env["store"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[:6] == ["domain", "method", "backbone", "classes", "px", "gates"]
    row = {r.split()[0]: r for r in rows}
    assert re.search(r" 32\s+on, \d+% FLOPs ", row["gated"]) and " off " in row["toy"]
    assert row["toy"].rstrip().endswith(str(env["data"]).replace(str(Path.home()), "~"))


def test_7_interrupt_says_how_to_resume_and_a_rerun_says_it_starts_over(env, capsys, monkeypatch):
    real, calls = da3.train.train_step, {"n": 0}

    def dies_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # 21 training images, batch 8: 3 steps per epoch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(da3.train, "train_step", dies_in_epoch_2)
    argv = train_args("long", env["data"], env["store"], "--epochs", "3")
    capsys.readouterr()
    assert cli(*argv) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "epochs 1-1 of 3 are saved" in err and "--resume" in err
    monkeypatch.setattr(da3.train, "train_step", real)
    assert cli(*argv, "--epochs", "1") == 0  # without --resume: starts over, and says so
    err = capsys.readouterr().err
    assert "stopped after epoch 1 of 3" in err and "starts over" in err and "--resume" in err


def test_7_quiet_keeps_the_epoch_lines(env, capsys):
    assert cli(*train_args("q", env["data"], env["store"])) == 0  # --quiet
    captured = capsys.readouterr()
    assert "  epoch 1/1: val accuracy" in captured.out
    assert "it/s" not in captured.err  # no progress bars


# ---------------------------------------------------------------------------------------
# 8. predict: many paths, JSON, CSV, unreadable images


def test_8_predict_many_paths_json_csv(env, capsys):
    data, store = env["data"], env["store"]
    paths = [data / "red" / "00.png", data / "blue" / "01.png", data / "green"]
    assert cli("predict", *paths, "--domain", "toy", "--store", store) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2 + 12
    assert (
        cli("predict", *paths[:2], "--domain", "toy", "--json", "--top-k", "2", "--store", store)
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in rows] == [str(p) for p in paths[:2]]
    assert all(
        len(r["predictions"]) == 2 and {"class", "probability"} <= set(r["predictions"][0])
        for r in rows
    )
    assert cli("predict", data / "red", "--domain", "toy", "--csv", "--store", store) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "path,class_1,probability_1,class_2,probability_2,class_3,probability_3"
    assert len(lines) == 13 and lines[1].startswith(str(data / "red" / "00.png") + ",")


def test_8_unreadable_image_stops_or_is_skipped(env, capsys):
    folder = env["tmp"] / "mixed"
    shutil.copytree(env["data"] / "red", folder)
    (folder / "00b.png").write_bytes(PNG + b"broken")
    (folder / "readme.txt").write_text("not an image: passed over")
    store = env["store"]
    assert cli("predict", folder, "--domain", "toy", "--store", store) == 2
    note, error = capsys.readouterr().err.strip().splitlines()
    assert note == "da3: passed over 1 file that is not an image (readme.txt)"
    one_error_line(error, "00b.png", "--skip-bad")
    assert cli("predict", folder, "--domain", "toy", "--skip-bad", "--json", "--store", store) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert len(rows) == 13 and rows[1] == {
        "path": str(folder / "00b.png"),
        "error": rows[1]["error"],
    }
    assert "skipped 1 of 13 images" in captured.err


# ---------------------------------------------------------------------------------------
# 9. gate usage in training output, history.json and eval


def test_9_gate_usage_is_reported(env, capsys):
    store = env["store"]
    assert cli(*train_args("g2", env["data"], store, "gates=true", "--epochs", "2")) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"epoch \d/2: .*; gates run \d+% of branches, \d+% of FLOPs", out)) == 2
    assert re.search(r"gates on test: \d+% of gated branches run, \d+% of the FLOPs kept", out)
    history = json.loads((store / "runs" / "g2" / "history.json").read_text())
    for record in history["history"]:
        assert 0 <= record["gate_branches_run"] <= 1 and 0 < record["gate_flops_kept"] <= 1
    assert 0 < history["metrics"]["gate_flops_kept"] <= 1
    assert "gate_flops_kept" in meta(store, "g2")["metrics"]
    assert cli("eval", "--domain", "g2", "--store", store) == 0
    assert re.search(r"gates on test: \d+% of gated branches run", capsys.readouterr().out)
    assert cli("eval", "--domain", "toy", "--store", store) == 0  # no gates: nothing said
    assert "gate" not in capsys.readouterr().out


def test_9_gate_usage_counts_what_runs():
    from da3.methods import GateUsage

    usage = GateUsage([0.2, 0.3])
    usage.add(0, 1, 4)  # branch 0 ran for 1 image of 4
    usage.add(1, 4, 4)
    assert usage.branches_run == 5 / 8
    assert usage.flops_kept == pytest.approx(1 - 0.2 * 0.75)


# ---------------------------------------------------------------------------------------
# 10. small things


def test_10_readme_does_not_promise_that_nothing_downloads():
    text = " ".join((ROOT / "README.md").read_text().split())
    assert "Nothing is downloaded at run time" not in text
    assert "torchvision downloads their weights" in text


def test_10_export_format_in_any_case(env, capsys):
    # the format is accepted whatever its case: what fails here is the domain, not "ONNX"
    assert cli("export", "--domain", "nope", "--format", "ONNX", "--store", env["store"]) == 2
    one_error_line(capsys.readouterr().err, "unknown domain 'nope'")


def test_10_domain_name_error_says_ascii(env, capsys):
    assert cli(*train_args("émoji", env["data"], env["store"])) == 2
    one_error_line(capsys.readouterr().err, "ASCII letters")


def test_10_unknown_domain_names_the_absolute_store_and_how_to_choose_one(env, capsys, monkeypatch):
    monkeypatch.chdir(env["tmp"])
    assert cli("eval", "--domain", "nope", "--store", "store") == 2
    one_error_line(capsys.readouterr().err, str(env["store"]), "--store", "DA3_STORE", "toy")
    assert cli("eval", "--domain", "nope", "--store", "elsewhere") == 2
    one_error_line(capsys.readouterr().err, str(env["tmp"] / "elsewhere"), "no such folder")
    assert DomainStore(env["store"]).names() == ["gated", "toy"]
