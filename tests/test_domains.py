"""Many domains over one frozen backbone (DESIGN.md §5): ``MultiDomainModel``, ``DomainStore``,
and resuming / stopping ``da3.train.fit``.

Adding or training a domain never changes another domain's outputs (bit for bit); a saved
domain loads back to the same function; broken or foreign files are refused with a
``Da3Error`` naming the file; a crash while saving leaves the previous files intact; an
interrupted training resumed from its checkpoint ends bit for bit where an uninterrupted one
does.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open

import da3.io
import da3.train
from conftest import calibrate_bn
from da3.backbones import create_backbone
from da3.domains import DomainStore, MultiDomainModel, check_name
from da3.errors import Da3Error
from da3.io import read_json, read_tensors
from da3.methods import FrozenBackbone, build_model, make_config
from da3.train import TrainConfig, fit, make_optimizer, train_step

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def frozen() -> FrozenBackbone:
    """Random weights; batch-norm statistics measured on random images, so that (unlike with
    the default statistics) the features, hence the logits, depend on the image."""
    torch.manual_seed(1234)
    backbone = create_backbone("efficientnet_lite0", "none")
    return FrozenBackbone(calibrate_bn(backbone, backbone.preprocess(images(16, seed=99))))


def distinct_rows(logits: torch.Tensor) -> bool:
    """Whether every sample got its own logits (so that equalities are not vacuous)."""
    return all(
        not torch.allclose(logits[i], logits[j], rtol=0, atol=1e-4)
        for i in range(len(logits))
        for j in range(i)
    )


def images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)


def train_some(model: MultiDomainModel, name: str, steps: int = 2, seed: int = 1) -> None:
    d = model.get(name)
    d.model.train()
    opt = make_optimizer(d.model, d.config)
    x = model.preprocess(images(4, seed))
    y = torch.arange(4) % d.num_classes
    for _ in range(steps):
        train_step(d.model, opt, x, y)
    d.model.eval()


def two_domains(frozen) -> MultiDomainModel:
    """'a': da3 with 3 classes, 'b': bias with 4 classes; both trained a little."""
    m = MultiDomainModel(frozen)
    m.add_domain("a", ["x", "y", "z"], "da3", {"blocks": "all"}, image_size=SIZE, seed=0)
    m.add_domain("b", ["p", "q", "r", "s"], "bias", image_size=SIZE, seed=1)
    train_some(m, "a", seed=3)
    train_some(m, "b", seed=4)
    return m


@pytest.fixture
def store(tmp_path) -> DomainStore:
    return DomainStore(tmp_path / "store")


# ---------------------------------------------------------------------------------------
# isolation between domains


def test_training_one_domain_leaves_the_others_bit_identical(frozen, store):
    m = two_domains(frozen)
    m.add_domain("c", ["1", "2"], "linear", image_size=SIZE, seed=2)
    x = images(6, seed=10)
    before = {n: m.logits(x, n) for n in ("a", "c")}
    assert all(distinct_rows(v) for v in before.values())
    train_some(m, "b", steps=3, seed=5)
    m.add_domain("d", ["1", "2", "3"], "finetune", image_size=SIZE, seed=3)
    train_some(m, "d", steps=1, seed=6)
    for n, logits in before.items():
        assert torch.equal(m.logits(x, n), logits), n
    b_before = m.logits(x, "b")
    m.save("b", store)
    m.load("b", store)
    for n, logits in before.items():
        assert torch.equal(m.logits(x, n), logits), n
    assert torch.equal(m.logits(x, "b"), b_before)


# ---------------------------------------------------------------------------------------
# save / load


def test_save_load_round_trip_and_file_contents(frozen, store):
    m = two_domains(frozen)
    m.get("a").metrics = {"val_accuracy": 0.5}
    x = images(5, seed=11)
    expected = {n: m.logits(x, n) for n in ("a", "b")}
    assert distinct_rows(expected["a"]) and distinct_rows(expected["b"])
    for n in ("a", "b"):
        m.save(n, store)
    files = sorted(p.name for p in store.root.iterdir())
    assert files == ["a.json", "a.safetensors", "b.json", "b.safetensors"]
    assert store.names() == ["a", "b"]

    # a fresh model on a copy of the backbone (same weights, other tensors)
    fresh = MultiDomainModel(FrozenBackbone(copy.deepcopy(frozen.stock)))
    for n in ("b", "a"):
        fresh.load(n, store)
        assert torch.equal(fresh.logits(x, n), expected[n]), n

    meta = json.loads((store.root / "a.json").read_text())
    for key in ("method", "config", "classes", "preprocess", "metrics", "library_version"):
        assert key in meta, key
    assert meta["method"] == "da3" and meta["classes"] == ["x", "y", "z"]
    assert meta["config"]["blocks"] == "all"
    assert meta["metrics"] == {"val_accuracy": 0.5}
    assert meta["backbone"]["fingerprint"] == frozen.fingerprint
    assert meta["backbone"]["name"] == "efficientnet_lite0"
    assert meta["preprocess"] == frozen.stock.preprocess.to_dict()

    backbone_bytes = sum(t.numel() * 4 for t in frozen.stock.state_dict().values())
    for n, method in (("a", "da3"), ("b", "bias")):
        path = store.root / f"{n}.safetensors"
        assert path.stat().st_size < 0.1 * backbone_bytes, (n, path.stat().st_size)
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            assert (
                f.metadata()["build_id"]
                == json.loads((store.root / f"{n}.json").read_text())["build_id"]
            )
        assert keys == set(m.get(n).model.domain_state())
        for k in keys:
            ok = k.startswith("head.") or (
                ".adaptor." in k if method == "da3" else k.endswith(".bias")
            )
            assert ok, k


def test_load_refuses_another_backbone(frozen, store):
    m = two_domains(frozen)
    m.save("a", store)
    other = MultiDomainModel(create_backbone("efficientnet_lite0", "imagenet"))
    with pytest.raises(Da3Error, match="backbone") as err:
        other.load("a", store)
    assert "a.json" in str(err.value)
    assert frozen.fingerprint[:12] in str(err.value)
    assert "a" not in other.domains


def _save_a_b(frozen, store):
    m = two_domains(frozen)
    m.save("a", store)
    m.save("b", store)
    return m


def _corruptions(store: DomainStore):
    st, js = store.paths("a")

    def truncate_tensors():
        data = st.read_bytes()
        st.write_bytes(data[: len(data) // 2])
        return st

    def garbage_tensors():
        st.write_bytes(os.urandom(2000))
        return st

    def tiny_tensors():
        st.write_bytes(b"\x01")
        return st

    def truncate_json():
        text = js.read_text()
        js.write_text(text[: len(text) // 2])
        return js

    def garbage_json():
        js.write_bytes(b"\xff\xfe not json at all \x00")
        return js

    def json_list():
        js.write_text("[1, 2, 3]")
        return js

    def json_missing_key():
        meta = json.loads(js.read_text())
        del meta["classes"]
        js.write_text(json.dumps(meta))
        return js

    def json_wrong_classes():
        meta = json.loads(js.read_text())
        meta["classes"] = meta["classes"][:2]
        js.write_text(json.dumps(meta))
        return js

    def json_unknown_config_key():
        meta = json.loads(js.read_text())
        meta["config"]["bogus"] = 1
        js.write_text(json.dumps(meta))
        return js

    def missing_tensors():
        st.unlink()
        return st

    return {
        f.__name__: f
        for f in (
            truncate_tensors,
            garbage_tensors,
            tiny_tensors,
            truncate_json,
            garbage_json,
            json_list,
            json_missing_key,
            json_wrong_classes,
            json_unknown_config_key,
            missing_tensors,
        )
    }


CORRUPTIONS = list(_corruptions(DomainStore("unused")))


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_broken_domain_files_are_refused_naming_the_file(frozen, store, corruption):
    m = _save_a_b(frozen, store)
    x = images(3, seed=12)
    expected_b = m.logits(x, "b")
    path = _corruptions(store)[corruption]()
    fresh = MultiDomainModel(frozen)
    with pytest.raises(Da3Error) as err:
        fresh.load("a", store)
    assert path.name in str(err.value), str(err.value)
    assert "\n" not in str(err.value)
    assert "a" not in fresh.domains
    fresh.load("b", store)  # the store's other domains are fine
    assert torch.equal(fresh.logits(x, "b"), expected_b)


def test_pair_from_two_saves_is_refused(frozen, store):
    m = two_domains(frozen)
    m.save("a", store)
    st, js = store.paths("a")
    old_tensors = st.read_bytes()
    train_some(m, "a", steps=1, seed=9)
    m.save("a", store)
    st.write_bytes(old_tensors)  # tensors of the first save, JSON of the second
    with pytest.raises(Da3Error, match="different saves") as err:
        MultiDomainModel(frozen).load("a", store)
    assert "a.safetensors" in str(err.value)


def test_failed_reload_keeps_the_loaded_domain(frozen, store):
    m = _save_a_b(frozen, store)
    x = images(3, seed=13)
    before = m.logits(x, "a")
    _corruptions(store)["json_wrong_classes"]()  # valid JSON, unusable state
    with pytest.raises(Da3Error):
        m.load("a", store)
    assert "a" in m.domains
    assert torch.equal(m.logits(x, "a"), before)


# ---------------------------------------------------------------------------------------
# inference API


def test_mixed_batch_equals_per_domain_predictions(frozen):
    m = two_domains(frozen)
    x = images(7, seed=14)
    names = ["a", "b", "a", "a", "b", "b", "a"]
    rows = m.predict(x, names)
    assert len(rows) == len(x)
    full = {n: m.logits(x, n) for n in ("a", "b")}
    assert distinct_rows(full["a"]) and distinct_rows(full["b"])
    for n in ("a", "b"):
        # bit for bit: each domain's samples, run as that domain's own batch
        idx = [i for i, d in enumerate(names) if d == n]
        own = m.logits(x[idx], n)
        for row, i in zip(own, idx, strict=True):
            assert rows[i].shape == (m.get(n).num_classes,)
            assert torch.equal(rows[i], row), i
    for i, (row, n) in enumerate(zip(rows, names, strict=True)):
        # and, to rounding, whatever batch the sample is in
        torch.testing.assert_close(row, full[n][i], rtol=1e-4, atol=1e-5)
    assert torch.equal(m.predict(x, "b"), full["b"])
    m.switch("b")
    assert torch.equal(m.predict(x), full["b"])
    with pytest.raises(Da3Error, match="7 images but 6"):
        m.predict(x, names[:-1])
    with pytest.raises(Da3Error, match="unknown domain"):
        m.predict(x, ["a"] * 6 + ["nope"])
    top = m.top_k(x[:2], "b", k=10)
    assert len(top) == 2 and len(top[0]) == 4  # k capped at the number of classes
    assert {c for c, _ in top[0]} == {"p", "q", "r", "s"}
    assert abs(sum(p for _, p in top[0]) - 1) < 1e-5


def test_switch_remove_list_and_unknown(frozen):
    m = two_domains(frozen)
    assert m.list() == ["a", "b"]
    assert m.active == "a"
    assert m.switch("b").name == "b" and m.active == "b"
    with pytest.raises(Da3Error, match="unknown domain 'zz'"):
        m.switch("zz")
    with pytest.raises(Da3Error, match="unknown domain"):
        m.logits(images(1), "zz")
    with pytest.raises(Da3Error, match="exists already"):
        m.add_domain("a", ["1", "2"])
    with pytest.raises(Da3Error, match="2 classes"):
        m.add_domain("c", ["1"])
    m.remove("b")
    assert m.list() == ["a"] and m.active == "a"
    with pytest.raises(Da3Error, match="unknown domain"):
        m.remove("b")
    m.remove("a")
    assert m.list() == [] and m.active is None
    with pytest.raises(Da3Error, match="unknown domain"):
        m.logits(images(1))


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../x",
        "a/b",
        ".hidden",
        "-x",
        "x" * 65,
        "a b",
        "a\nb",
        "..",
        "é",
        "a\n",
    ],
)
def test_invalid_names_are_rejected(frozen, store, name):
    with pytest.raises(Da3Error, match="domain name"):
        check_name(name)
    with pytest.raises(Da3Error, match="domain name"):
        MultiDomainModel(frozen).add_domain(name, ["1", "2"], "linear")
    with pytest.raises(Da3Error, match="domain name"):
        store.paths(name)
    assert not store.root.exists()


def test_store_unknown_domain_and_delete(frozen, store):
    with pytest.raises(Da3Error, match="unknown domain 'a'"):
        store.read("a")
    assert store.names() == []
    m = _save_a_b(frozen, store)
    store.delete("a")
    assert store.names() == ["b"]
    assert not any(p.name.startswith("a.") for p in store.root.iterdir())
    with pytest.raises(Da3Error, match="unknown domain 'a'.*domains: b"):
        m.load("a", store)


# ---------------------------------------------------------------------------------------
# crash while saving


def _crash_on_replace(monkeypatch, nth: int):
    """``os.replace`` inside da3.io raises on its ``nth`` call (1-based), after the
    temporary file was written and flushed."""
    calls = {"n": 0}
    real = os.replace

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == nth:
            assert os.path.getsize(src) > 0
            raise OSError(28, "No space left on device (simulated)")
        return real(src, dst)

    monkeypatch.setattr(da3.io.os, "replace", replace)
    return calls


def _snapshot(store: DomainStore, name: str) -> tuple[bytes, bytes]:
    st, js = store.paths(name)
    return st.read_bytes(), js.read_bytes()


def test_crash_during_save_keeps_previous_files(frozen, store, monkeypatch):
    nth = 1  # the first rename: the tensors file
    m = two_domains(frozen)
    m.save("a", store)
    x = images(3, seed=15)
    expected = m.logits(x, "a")
    before = _snapshot(store, "a")
    train_some(m, "a", steps=1, seed=16)
    calls = _crash_on_replace(monkeypatch, nth)
    with pytest.raises((OSError, Da3Error)):
        m.save("a", store)
    assert calls["n"] == nth
    monkeypatch.undo()
    assert sorted(p.name for p in store.root.iterdir()) == ["a.json", "a.safetensors"]
    assert _snapshot(store, "a") == before
    fresh = MultiDomainModel(frozen)
    fresh.load("a", store)
    assert torch.equal(fresh.logits(x, "a"), expected)


def test_crash_between_the_two_renames_keeps_a_loadable_domain(frozen, store, monkeypatch):
    m = two_domains(frozen)
    m.save("a", store)
    x = images(3, seed=15)
    expected = m.logits(x, "a")
    train_some(m, "a", steps=1, seed=16)
    _crash_on_replace(monkeypatch, 2)
    with pytest.raises((OSError, Da3Error)):
        m.save("a", store)
    monkeypatch.undo()
    fresh = MultiDomainModel(frozen)
    fresh.load("a", store)  # the previous tensors were restored
    assert torch.equal(fresh.logits(x, "a"), expected)


def test_crash_in_serializer_leaves_nothing_behind(frozen, store, monkeypatch):
    m = two_domains(frozen)
    m.save("b", store)
    before = _snapshot(store, "b")

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("serializer crashed")

    real_atomic = da3.io._atomic
    monkeypatch.setattr(da3.io, "_atomic", lambda path, write: real_atomic(path, boom))
    with pytest.raises(RuntimeError, match="serializer crashed"):
        m.save("b", store)
    monkeypatch.undo()
    assert sorted(p.name for p in store.root.iterdir()) == ["b.json", "b.safetensors"]
    assert _snapshot(store, "b") == before
    MultiDomainModel(frozen).load("b", store)


# ---------------------------------------------------------------------------------------
# fit: resume and divergence


class _Data:
    def __init__(self):
        g = torch.Generator().manual_seed(21)
        self.train_x = torch.randint(0, 256, (20, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
        self.train_y = torch.arange(20) % 3
        self.val_x = torch.randint(0, 256, (6, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
        self.val_y = torch.arange(6) % 3


def _fit(frozen, run_dir, *, resume=False, epochs=3, batch_size=8, fingerprint=None, cfg=None):
    """da3 on a toy domain, from the same initial state each time."""
    data = _Data()
    cfg = cfg or make_config("da3", {"blocks": "all"})
    torch.manual_seed(0)
    model = build_model("da3", frozen, 3, cfg)
    result = fit(
        model,
        data.train_x,
        data.train_y,
        data.val_x,
        data.val_y,
        frozen.stock.preprocess,
        cfg,
        TrainConfig(epochs=epochs, batch_size=batch_size, seed=3, augment=True),
        run_dir=run_dir,
        resume=resume,
        progress=False,
        fingerprint={"data": "toy"} if fingerprint is None else fingerprint,
    )
    return model, result


def _stable(history):
    return [
        {k: v for k, v in h.items() if k not in ("seconds", "train_seconds", "images_per_second")}
        for h in history
    ]


def _interrupt_at(monkeypatch, call: int, exc=KeyboardInterrupt):
    calls = {"n": 0}
    real = da3.train.train_step

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise exc()
        return real(*args, **kwargs)

    monkeypatch.setattr(da3.train, "train_step", step)
    return calls


def test_fit_resume_is_bit_identical(frozen, tmp_path, monkeypatch):
    whole, result = _fit(frozen, tmp_path / "whole")
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.resumed_from is None

    run = tmp_path / "cut"
    _interrupt_at(monkeypatch, 3 + 2)  # 3 steps per epoch: dies in the middle of epoch 2
    with pytest.raises(KeyboardInterrupt):
        _fit(frozen, run)
    monkeypatch.undo()
    assert read_json(run / "checkpoint.json")["epoch"] == 0  # epoch 1 finished (0-based)

    resumed, again = _fit(frozen, run, resume=True)
    assert again.resumed_from == 0
    assert _stable(again.history) == _stable(result.history)
    assert again.best_epoch == result.best_epoch
    final, expected = resumed.domain_state(), whole.domain_state()
    assert final.keys() == expected.keys()
    for k in expected:
        assert torch.equal(final[k], expected[k]), k
    for k in result.best_state:
        assert torch.equal(again.best_state[k], result.best_state[k]), k

    # Without the checkpoint there is nothing to resume; another run's checkpoint is refused.
    with pytest.raises(Da3Error, match="no checkpoint"):
        _fit(frozen, tmp_path / "empty", resume=True)
    with pytest.raises(Da3Error, match="different run"):
        _fit(frozen, run, resume=True, batch_size=4)
    with pytest.raises(Da3Error, match="different run"):
        _fit(frozen, run, resume=True, fingerprint={"data": "other"})


def test_fit_resume_with_another_method_config_is_refused(frozen, tmp_path, monkeypatch):
    run = tmp_path / "cut"
    _interrupt_at(monkeypatch, 3 + 1)
    with pytest.raises(KeyboardInterrupt):
        _fit(frozen, run, epochs=2)
    monkeypatch.undo()
    other = make_config("da3", {"blocks": "all", "lr": 0.5})
    with pytest.raises(Da3Error):
        _fit(frozen, run, resume=True, epochs=2, cfg=other)


def test_fit_divergence_keeps_last_good_checkpoint(frozen, tmp_path, monkeypatch):
    run = tmp_path / "run"
    data = _Data()
    cfg = make_config("da3", {"blocks": "all"})
    torch.manual_seed(0)
    model = build_model("da3", frozen, 3, cfg)
    real_forward = model.forward
    calls = {"n": 0}

    def forward(x):
        out = real_forward(x)
        if model.training:
            calls["n"] += 1
            if calls["n"] > 3:  # epoch 2 onwards
                return out * float("nan")
        return out

    monkeypatch.setattr(model, "forward", forward)
    with pytest.raises(Da3Error, match="diverged") as err:
        fit(
            model,
            data.train_x,
            data.train_y,
            data.val_x,
            data.val_y,
            frozen.stock.preprocess,
            cfg,
            TrainConfig(epochs=3, batch_size=8, seed=3),
            run_dir=run,
            progress=False,
        )
    assert "epoch 2" in str(err.value)
    meta = read_json(run / "checkpoint.json")
    assert meta["epoch"] == 0 and len(meta["history"]) == 1
    tensors = read_tensors(run / "checkpoint.safetensors")
    assert tensors and all(
        torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()
    )
    # and the checkpoint still resumes (to a finite model)
    monkeypatch.undo()
    resumed, result = _fit(frozen, run, resume=True, fingerprint={})
    assert result.resumed_from == 0
    assert all(torch.isfinite(v).all() for v in resumed.domain_state().values())


def test_head_warmup_trains_the_head_alone_first(frozen):
    """DA3's ``head_warmup``: for that fraction of the steps only the head moves (the model is
    a linear probe of the pretrained network: its adaptors start as the identity); then the
    adaptors follow the cosine schedule from where it is."""
    before = build_model("da3", frozen, 3, make_config("da3", {"blocks": "all"})).domain_state()
    # 1 epoch of 3 steps; a warm-up of 0.9 covers all of them, one of 0.3 the first only
    for warmup, adaptors_move in ((0.9, False), (0.3, True), (0.0, True)):
        cfg = make_config("da3", {"blocks": "all", "head_warmup": warmup, "head_warmup_steps": 0})
        model, _ = _fit(frozen, None, epochs=1, cfg=cfg)
        after = model.domain_state()
        head = [k for k in after if k.startswith("head.")]
        assert head and all(not torch.equal(after[k], before[k]) for k in head)
        moved = [k for k in after if k not in head and not torch.equal(after[k], before[k])]
        assert bool(moved) == adaptors_move, (warmup, moved)
    # a warm-up given in steps trains the same as its fraction (1 of the 3 steps here), and
    # so does one of 16 steps (cut to a third of this run); the default has none
    runs = [
        {"head_warmup_steps": 1},
        {"head_warmup": 0.3, "head_warmup_steps": 0},
        {"head_warmup_steps": 16},
        {},
    ]
    cfgs = [make_config("da3", {"blocks": "all", **o}) for o in runs]
    states = [_fit(frozen, None, epochs=1, cfg=c)[0].domain_state() for c in cfgs]
    for other, same in ((1, True), (2, True), (3, False)):
        assert all(torch.equal(states[0][k], states[other][k]) for k in states[0]) == same


def test_lr_schedule_holds_all_but_the_head_during_the_warmup():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=1.0)
    body, head = da3.train.lr_schedule(opt, 10, 3)
    assert [body(s) for s in range(3)] == [0.0] * 3 and body(3) == head(3) > 0
    assert head(0) == 1.0 and head(10) == 0.0
    assert da3.train.lr_schedule(opt, 10, 0)[0](0) == 1.0


@pytest.mark.parametrize(
    ("fraction", "steps", "total", "wait"),
    [
        (0.0, 0, 100, 0),
        (0.3, 0, 10, 3),  # the fraction alone
        (0.0, 16, 51, 16),  # the steps alone
        (0.0, 16, 189, 16),  # ... the same count in a longer run
        (0.0, 16, 30, 10),  # ... but at most a third of the run
        (0.0, 16, 2, 0),
        (0.5, 16, 100, 50),  # the longer of the two
        (0.1, 16, 100, 16),
    ],
)
def test_head_only_steps(fraction, steps, total, wait):
    cfg = make_config("da3", {"head_warmup": fraction, "head_warmup_steps": steps})
    assert da3.train.head_only_steps(cfg, total) == wait
    # methods without the settings never wait
    assert da3.train.head_only_steps(make_config("finetune"), total) == 0


@pytest.mark.parametrize("bits", [32, 8])
def test_open_domain_can_hold_only_the_form_its_method_reads(store, bits):
    """forms="own" (what da3 eval and predict use): a da3 domain comes back on the lean
    form alone, read a layer at a time, and gives the same logits as on both forms."""
    from da3.domains import open_domain

    m = MultiDomainModel(create_backbone("resnet18", "none"), frozen_bits=bits)
    m.add_domain("r", ["x", "y", "z"], "da3", {"blocks": "all"}, image_size=SIZE, seed=0)
    train_some(m, "r", seed=5)
    m.save("r", store)
    x = images(4, seed=6)
    both, _ = open_domain(store, "r")
    own, _ = open_domain(store, "r", forms="own")
    assert both.frozen.forms == "both" and own.frozen.forms == "lean"
    assert len(own.frozen.held()) == 1 and own.frozen.fingerprint == m.frozen.fingerprint
    expected = m.logits(x, "r")
    assert distinct_rows(expected)
    assert torch.equal(own.logits(x, "r"), expected)
    assert torch.equal(both.logits(x, "r"), expected)
