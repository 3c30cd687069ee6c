"""``da3 bench``: the stages run, write raw results, a report with plots, and resume.

A tiny preset (random resnet18, 32 px, one epoch, two small folder domains) exercises the
real code paths; the figures themselves come from the real presets, run by hand.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from da3.bench import run as bench_run
from da3.bench.report import BEGIN, END
from da3.cli import main
from da3.io import read_json, write_json
from da3.methods import make_config

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def make_domain(root, seed: int):
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(10):
            noise = rng.integers(-60, 60, (24, 24, 3))
            pixels = np.clip(np.array(colour)[None, None] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return str(root)


TINY = {
    "accuracy": {
        "backbone": "resnet18",
        "weights": "none",
        "image_size": 32,
        "epochs": 1,
        "batch_size": 8,
        "seed": 0,
        "augment": True,
    },
    "seeds": [0],
    "profiles": [{"backbone": "resnet18", "weights": "none", "image_size": 32, "batch_size": 8}],
    "profile_steps": 1,
    "gating": {"targets": [0.5], "gate_epochs": 1, "latency_images": 2},
}


@pytest.fixture(scope="module")
def bench(tmp_path_factory, monkeypatch_module):
    base = tmp_path_factory.mktemp("bench")
    monkeypatch_module.setenv("DA3_CACHE_DIR", str(base / "cache"))
    domains = [make_domain(base / "alpha", 0), make_domain(base / "beta", 1)]
    results, report = base / "results", base / "docs" / "benchmark.md"
    report.parent.mkdir()
    report.write_text(f"# Bench\n\nintro kept\n\n{BEGIN}\nold\n{END}\n\n## Discussion\n\nmine\n")
    bench_run.run_bench(
        "quick",
        TINY,
        methods=["linear", "da3"],
        domains=domains,
        results=results,
        report=report,
    )
    return base, domains, results, report


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_bench_writes_raw_results(bench):
    _, domains, results, _ = bench
    acc = read_json(results / "bench_quick_accuracy.json")
    assert {(r["method"], r["domain"]) for r in acc["records"]} == {
        (m, d) for m in ("linear", "da3") for d in domains
    }
    assert acc["protocol"]["epochs"] == 1 and acc["info"]["commit"]
    assert all(0 <= r["test_accuracy"] <= 1 for r in acc["records"])
    prof = read_json(results / "bench_quick_profile_resnet18_32px_b8.json")
    assert [r["method"] for r in prof["rows"]] == ["linear", "da3"]
    assert all(r["peak_memory_bytes"] > 0 for r in prof["rows"])
    gating = read_json(results / "bench_quick_gating.json")
    assert [r["gate_target"] for r in gating["records"]] == [None, 0.5] * 2
    assert "| da3 |" in (results / "bench_quick_methods.md").read_text()
    for png in ("accuracy_memory", "domains", "gating"):
        assert (results / f"bench_quick_{png}.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_states_record_image_size_and_data(bench):
    # a kept run is a domain of the states store: it records what it was trained on
    from da3.store import DomainStore

    _, domains, results, _ = bench
    store = DomainStore(results / ".states")
    assert store.names()
    for name in store.names():
        meta = store.read_meta(name)
        assert meta["image_size"] == 32 and meta["source"] in domains and meta["method"] == "da3"


def test_bench_report_has_the_tables_and_keeps_the_discussion(bench):
    _, _, _, report = bench
    text = report.read_text()
    assert text.startswith("# Bench\n\nintro kept\n\n" + BEGIN)
    assert text.endswith(END + "\n\n## Discussion\n\nmine\n")
    assert "\nold\n" not in text
    assert "| linear |" in text and "| da3 |" in text and "step ÷ da3" in text
    assert "](../results/bench_quick_accuracy_memory.png)" in text
    assert "### DA3 dynamic gating" in text


def test_bench_resumes_without_redoing_anything(bench, monkeypatch):
    _, domains, results, report = bench

    def fail(*args, **kwargs):
        raise AssertionError("work was redone")

    monkeypatch.setattr(bench_run, "train_one", fail)
    monkeypatch.setattr("da3.bench.accuracy.train_one", fail)
    monkeypatch.setattr("da3.profile.profile_methods", fail)
    monkeypatch.setattr("da3.bench.gating.train_one", fail)
    before = (results / "bench_quick_accuracy.json").read_bytes()
    bench_run.run_bench(
        "quick", TINY, methods=["linear", "da3"], domains=domains, results=results, report=report
    )
    assert (results / "bench_quick_accuracy.json").read_bytes() == before


def test_bench_changed_protocol_starts_over(bench, monkeypatch):
    _, domains, results, report = bench
    calls = []

    def fake(frozen, method, overrides, data, protocol, **kw):
        calls.append((method, protocol["epochs"]))
        raise RuntimeError("stop here")

    monkeypatch.setattr("da3.bench.accuracy.train_one", fake)
    other = copy.deepcopy(TINY)
    other["accuracy"]["epochs"] = 2
    with pytest.raises(RuntimeError, match="stop here"):
        bench_run.run_bench(
            "quick", other, methods=["linear"], domains=domains, results=results, report=report
        )
    assert calls == [("linear", 2)]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "nope"], "unknown method 'nope'"),
        (["--domains", "mars"], "unknown benchmark domain 'mars'"),
        (["--stages", "acc"], "unknown stage 'acc'"),
        (["--set", "da3.reduction"], "expected METHOD.key=value"),
        (["--set", "da3.nokey=1"], "unknown config key 'nokey'"),
        (["--set", "da3.reduction=x"], "expects an integer"),
        (["--profiles", "resnet50-96px-b8"], "unknown setting 'resnet50-96px-b8'"),
        (["--seeds", "1-x"], "seeds '1-x': expected A-B"),
        (["--seeds", "-1"], "seeds '-1': expected A-B"),
    ],
)
def test_bench_bad_arguments_fail_before_any_work(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(bench_run, "run_bench", lambda *a, **k: pytest.fail("ran"))
    code = main(["bench", "--results", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_bench_report_appends_to_a_page_without_markers(bench, tmp_path):
    from da3.bench.report import write_report

    _, _, results, _ = bench
    page = tmp_path / "b.md"
    page.write_text("# Mine\n\nhow to run it\n")
    write_report(page, results)
    text = page.read_text()
    assert text.startswith("# Mine\n\nhow to run it\n\n" + BEGIN) and text.endswith(END + "\n")
    write_report(page, results)  # again: the generated part is replaced, not repeated
    assert page.read_text() == text


def test_bench_redoes_a_record_whose_method_config_changed(bench, monkeypatch, tmp_path):
    import json
    import shutil

    _, domains, results, report = bench
    copy_dir = tmp_path / "results"
    shutil.copytree(results, copy_dir)
    path = copy_dir / "bench_quick_accuracy.json"
    acc = json.loads(path.read_text())
    stale = next(r for r in acc["records"] if r["method"] == "linear")
    stale["config"]["lr"] = 0.5  # as if it ran under another default
    da3_recs = [r for r in acc["records"] if r["method"] == "da3"]
    del da3_recs[0]["config"]["head_warmup_steps"]  # written before that setting existed
    da3_recs[1]["config"]["gone"] = 1  # a setting that no longer exists
    path.write_text(json.dumps(acc))
    calls = []

    class Trained:
        def domain_state(self):
            return {"w": torch.zeros(1)}

    def fake(frozen, method, overrides, domain, protocol, **kw):
        calls.append((method, Path(domain).name))
        return {"test_accuracy": 1.0, "train_seconds": 0.0}, Trained()

    monkeypatch.setattr("da3.bench.accuracy.train_one", fake)
    bench_run.run_bench(
        "quick",
        TINY,
        methods=["linear", "da3"],
        domains=domains,
        stages=("accuracy",),
        results=copy_dir,
        report=report,
    )
    assert sorted(calls) == sorted(
        [("linear", Path(stale["domain"]).name), ("da3", Path(da3_recs[1]["domain"]).name)]
    )


def test_bench_gating_follows_da3_config(bench, monkeypatch, tmp_path):
    """The gating curve starts over when DA3's config changed since it ran (a new default),
    and its gated runs take the ``--set da3.*`` overrides, with no head-only warm-up (the
    head is trained already)."""
    import json
    import shutil

    _, domains, results, report = bench
    copy_dir = tmp_path / "results"
    shutil.copytree(results, copy_dir)
    path = copy_dir / "bench_quick_gating.json"
    gating = json.loads(path.read_text())
    gating["protocol"]["da3_config"]["lr"] = 0.5  # as if it ran under another default
    path.write_text(json.dumps(gating))
    seen = []

    def fake_train(frozen, method, overrides, domain, protocol, **kw):
        seen.append(make_config(method, overrides))
        raise RuntimeError("stop here")

    monkeypatch.setattr("da3.bench.gating.train_one", fake_train)
    kw = dict(methods=["da3"], domains=domains, stages=("gating",), results=copy_dir)
    with pytest.raises(RuntimeError, match="stop here"):
        bench_run.run_bench("quick", TINY, report=report, **kw)
    assert seen[0].gates and seen[0].lr == make_config("da3").lr and seen[0].head_warmup == 0.0
    assert seen[0].head_warmup_steps == 0  # the head is trained already
    with pytest.raises(RuntimeError, match="stop here"):
        bench_run.run_bench("quick", TINY, report=report, overrides={"da3": {"lr": 0.01}}, **kw)
    assert seen[1].gates and seen[1].lr == 0.01 and seen[1].head_warmup == 0.0
    assert seen[1].head_warmup_steps == 0


def test_bench_jobs_merge_into_one_result(bench, tmp_path):
    """Jobs run apart (one per method) merge into one results folder, states included; the
    merged records are the jobs' own, and a second merge of the same jobs changes nothing."""
    from da3.bench.merge import merge_accuracy
    from da3.errors import Da3Error

    _, domains, _, _ = bench
    parts = []
    for method in ("linear", "da3"):
        part = tmp_path / method
        bench_run.run_bench(
            "quick",
            TINY,
            methods=[method],
            domains=domains[:1],
            stages=("accuracy",),
            results=part,
            report=part / "r.md",
        )
        parts.append(part)
    out = tmp_path / "merged"
    records = merge_accuracy(parts, out, "quick")
    own = [r for p in parts for r in read_json(p / "bench_quick_accuracy.json")["records"]]
    assert sorted(r["method"] for r in records) == ["da3", "linear"]
    assert {r["method"]: r["test_accuracy"] for r in records} == {
        r["method"]: r["test_accuracy"] for r in own
    }
    merged = read_json(out / "bench_quick_accuracy.json")
    assert merged["info"]["parallel_jobs"] == 2 and len(merged["info"]["command"]) == 2
    assert list((out / ".states").glob("quick-da3-*.safetensors"))
    assert "more jobs like it" in (out / "bench_quick_accuracy.md").read_text()
    assert merge_accuracy(parts, out, "quick") == records  # the merged file is a part too now

    changed = read_json(parts[0] / "bench_quick_accuracy.json")
    changed["protocol"]["epochs"] = 2
    from da3.io import write_json

    write_json(parts[0] / "bench_quick_accuracy.json", changed)
    with pytest.raises(Da3Error, match="protocol differs"):
        merge_accuracy(parts, tmp_path / "other", "quick")
    with pytest.raises(Da3Error, match="not found"):
        merge_accuracy([tmp_path / "missing"], tmp_path / "other", "quick")


def test_bench_seeds_option_replaces_the_presets_seeds(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(bench_run, "run_bench", lambda tag, preset, **k: seen.update(preset))
    assert main(["bench", "--full", "--seeds", "3-5", "--results", str(tmp_path)]) == 0
    assert seen["seeds"] == [3, 4, 5]
    assert main(["bench", "--quick", "--seeds", "0,7", "--results", str(tmp_path)]) == 0
    assert seen["seeds"] == [0, 7]


def _linear_job(bench, part: Path) -> Path:
    """One bench job: ``linear`` on the first test domain, accuracy only, in ``part``."""
    _, domains, _, _ = bench
    bench_run.run_bench(
        "quick",
        TINY,
        methods=["linear"],
        domains=domains[:1],
        stages=("accuracy",),
        results=part,
        report=part / "r.md",
    )
    return part


def test_merge_script_never_rewrites_the_project_report_from_a_side_folder(bench, tmp_path):
    import subprocess
    import sys

    part = _linear_job(bench, tmp_path / "job")
    (tmp_path / "docs").mkdir()
    sentinel = tmp_path / "docs" / "benchmark.md"
    sentinel.write_text("mine\n")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "merge_bench.py"
    side = tmp_path / "side"
    run = [sys.executable, str(script), "--tag", "quick", "--results", str(side), str(part)]
    done = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sentinel.read_text() == "mine\n"
    text = (side / "benchmark.md").read_text()
    assert "| linear |" in text and "min of job time" in text  # not sold as wall time
    bad = subprocess.run(
        [*run[:-1], str(tmp_path / "nowhere")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and "nowhere" in bad.stderr and "not found" in bad.stderr


def test_paired_seeds_compares_seed_by_seed():
    """benchmarks/paired_seeds.py: per-seed differences, only over the seeds both ran."""
    import importlib.util
    import statistics

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    spec = importlib.util.spec_from_file_location("paired_seeds", bench_dir / "paired_seeds.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # a script imports the library, never a sibling script

    def rec(method, seed, acc, domain="d"):
        return {"method": method, "domain": domain, "seed": seed, "test_accuracy": acc}

    records = [
        rec("linear", 0, 0.50), rec("da3", 0, 0.52),
        rec("linear", 1, 0.60), rec("da3", 1, 0.59),
        rec("linear", 2, 0.40), rec("da3", 2, 0.40),
        rec("linear", 3, 0.90),  # da3 did not run seed 3: left out
        rec("da3", 0, 0.7, domain="only_da3"),
    ]  # fmt: skip
    (row,) = mod.compare(records, "linear", "da3")
    assert row["domain"] == "d" and row["seeds"] == [0, 1, 2]
    assert row["base_mean"] == pytest.approx(0.5) and row["other_mean"] == pytest.approx(1.51 / 3)
    assert row["diff_points"] == pytest.approx((2 - 1 + 0) / 3)
    assert (row["above"], row["level"], row["below"]) == (1, 1, 1)
    assert row["diff_stderr"] == pytest.approx(statistics.stdev([2, -1, 0]) / 3**0.5)
    # a sweep's records: runs for methods, the domain from its protocol
    sweep = [{"run": r["method"], **r} for r in records if r["domain"] == "d"]
    for r in sweep:
        del r["method"], r["domain"]
    (srow,) = mod.compare(sweep, "linear", "da3", domain="clipart")
    assert srow["domain"] == "clipart" and srow["diff_points"] == row["diff_points"]


def test_bench_gating_keeps_results_from_before_a_new_setting(bench, monkeypatch, tmp_path):
    """A DA3 setting added since the gating curve ran (its default keeps the old behaviour)
    does not start the curve over; da3.bench.common.same_config."""
    import json
    import shutil

    from da3.bench.common import same_config

    _, domains, results, report = bench
    copy_dir = tmp_path / "results"
    shutil.copytree(results, copy_dir)
    for name, drop in (("gating", "protocol"), ("accuracy", "records")):
        path = copy_dir / f"bench_quick_{name}.json"
        payload = json.loads(path.read_text())
        if drop == "protocol":
            del payload["protocol"]["da3_config"]["head_warmup_steps"]
        else:
            for r in payload["records"]:
                r["config"].pop("head_warmup_steps", None)
        path.write_text(json.dumps(payload))
    before = (copy_dir / "bench_quick_gating.json").read_text()

    def no_fit(*a, **k):
        raise AssertionError("retrained")

    monkeypatch.setattr("da3.bench.gating.train_one", no_fit)
    monkeypatch.setattr("da3.bench.accuracy.train_one", no_fit)
    kw = dict(methods=["da3"], domains=domains, results=copy_dir, report=report)
    bench_run.run_bench("quick", TINY, stages=("accuracy", "gating"), **kw)
    after = json.loads((copy_dir / "bench_quick_gating.json").read_text())
    assert after["records"] == json.loads(before)["records"]
    # the rule itself
    cur = {"a": 1, "new": 0}
    assert same_config({"a": 1}, cur, "da3") and same_config(cur, cur, "da3")
    assert not same_config({"a": 2}, cur, "da3")
    assert not same_config({"a": 1, "gone": 0}, cur, "da3")


def test_a_setting_whose_default_changed_behaviour_makes_old_records_stale():
    """piggyback's shift_lr came with a default that changes the method; records from before
    it (no such key) stand for shift_lr=0 (PiggybackConfig.legacy), not for the default."""
    import dataclasses

    from da3.bench.common import same_config

    now = dataclasses.asdict(make_config("piggyback"))
    before = {k: v for k, v in now.items() if k != "shift_lr"}
    assert not same_config(before, now, "piggyback")
    masks_alone = dataclasses.asdict(make_config("piggyback", {"shift_lr": 0}))
    assert same_config(before, masks_alone, "piggyback")
    assert same_config(now, now, "piggyback")
    # a method without legacy values: a new key counts as its default, as before
    da3 = dataclasses.asdict(make_config("da3"))
    assert same_config({k: v for k, v in da3.items() if k != "head_warmup_steps"}, da3, "da3")


def test_merge_leaves_out_stale_records(bench, tmp_path):
    """A record in the results folder whose config is no longer the method's is replaced by
    a job's new one instead of stopping the merge as a conflict."""
    from da3.bench.merge import merge_accuracy

    part = _linear_job(bench, tmp_path / "job")
    fresh = read_json(part / "bench_quick_accuracy.json")
    old = copy.deepcopy(fresh)
    for r in old["records"]:
        r["config"]["lr"] = 123.0  # trained under a default that has changed since
        r["test_accuracy"] = -1.0
    out = tmp_path / "results"
    out.mkdir()
    write_json(out / "bench_quick_accuracy.json", old)
    records = merge_accuracy([part], out, "quick")
    assert [r["test_accuracy"] for r in records] == [r["test_accuracy"] for r in fresh["records"]]


def test_records_name_the_commit_that_trained_them(bench, tmp_path):
    """A partly re-run accuracy stage keeps the commit of every record, and the result's
    header says which commit trained what when they differ."""
    from da3.bench.common import commits_line
    from da3.bench.run import _accuracy_md

    part = _linear_job(bench, tmp_path / "job")
    data = read_json(part / "bench_quick_accuracy.json")
    commit = data["info"]["commit"]
    assert commit and all(r["commit"] == commit for r in data["records"])
    assert commits_line(data["info"], data["records"]) == ""
    mixed = copy.deepcopy(data["records"])
    mixed[0]["commit"] = "abc1234"
    mixed.append({**mixed[0], "method": "da3"})
    del mixed[-1]["commit"]
    line = commits_line(data["info"], mixed)
    assert line.startswith("- records by commit: ") and "abc1234: 1 (linear)" in line
    assert "not recorded: 1 (da3)" in line
    md = _accuracy_md(data["info"], data["protocol"], mixed)
    assert f"- date: {data['info']['date']}\n{line}\nProtocol:" in md


def test_profile_rows_of_a_changed_method_config_are_redone(bench, monkeypatch, tmp_path):
    """A profile setting is kept while its rows' configs are current (a row from before
    rows held their config counts as the method's legacy values say), and profiled again,
    every method of it, once one row's config is stale."""
    import json
    import shutil

    _, _, results, report = bench
    copy_dir = tmp_path / "results"
    shutil.copytree(results, copy_dir)
    path = copy_dir / "bench_quick_profile_resnet18_32px_b8.json"
    payload = json.loads(path.read_text())
    assert all(r["config"]["lr"] > 0 for r in payload["rows"])
    calls = []

    def fake_profile(backbone, methods, **kw):
        calls.append(list(methods))
        return payload["rows"]

    monkeypatch.setattr("da3.profile.profile_methods", fake_profile)
    kw = dict(methods=["linear", "da3"], results=copy_dir, report=report, stages=("profile",))
    for r in payload["rows"]:
        del r["config"]  # as written before rows held their config
    path.write_text(json.dumps(payload))
    bench_run.run_bench("quick", TINY, **kw)
    assert calls == []
    payload["rows"][1]["config"] = {**dataclasses.asdict(make_config("da3")), "lr": 0.5}
    path.write_text(json.dumps(payload))
    bench_run.run_bench("quick", TINY, **kw)
    assert calls == [["linear", "da3"]]
