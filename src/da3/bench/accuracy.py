"""Accuracy of each method on the benchmark domains, under one protocol.

The protocol (the same for every method): one pretrained backbone, frozen where the method
says so; each domain's fixed train/val/test split (:mod:`da3.data`) at ``image_size`` px;
``epochs`` epochs of ``batch_size``, AdamW at the method's default learning rates (its
config: ``lr`` for what the method trains, ``head_lr`` for the new head), cosine decay to
zero, random translations of up to 1/12 of the side; the epoch with the best validation
accuracy is evaluated on the test split.
"""

from __future__ import annotations

import contextlib
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from da3.backbones import create_backbone
from da3.bench.common import config_is_current
from da3.domains import MultiDomainModel
from da3.io import read_json
from da3.methods import FrozenBackbone, get_method
from da3.store import DomainStore
from da3.training import TrainSettings, train_domain


def train_one(
    frozen: FrozenBackbone,
    method: str,
    overrides: dict,
    domain: str,
    protocol: dict,
    *,
    seed: int | None = None,
    device: str = "cpu",
    progress: bool = False,
    store: Path | None = None,
    name: str = "run",
    keep: bool = False,
    warm_start=None,
    extra: dict | None = None,
):
    """Train ``method`` on ``domain`` (a benchmark name or a folder) under ``protocol``,
    through the library's one training call (:func:`da3.training.train_domain`) on the
    shared ``frozen`` backbone; return (record, trained model). The domain is saved in
    ``store`` as ``name`` when ``keep`` (later stages start from it), else not kept.
    ``extra``: other :class:`~da3.training.TrainSettings` values (``cache_features``,
    ``micro_batch``, ...)."""
    seed = protocol["seed"] if seed is None else seed
    # frozen_bits: for what reads the lean form (finetune trains its float32 weights)
    lean = get_method(method).frozen_form == "lean"
    values = dict(
        domain=name,
        data=domain,
        method=method,
        backbone=protocol["backbone"],
        weights=protocol["weights"] or "none",
        image_size=protocol["image_size"],
        epochs=protocol["epochs"],
        batch_size=protocol["batch_size"],
        seed=seed,
        augment=protocol.get("augment", True),
        device=device,
        frozen_bits=frozen.frozen_bits if lean else 32,
        method_config=dict(overrides),
    )
    settings = TrainSettings(**{**values, **(extra or {})})
    with contextlib.ExitStack() as stack:
        if store is None:
            store = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="da3-bench-")))
        shared = MultiDomainModel(frozen, device)
        t0 = time.perf_counter()
        result = train_domain(
            settings,
            store,
            model=shared,
            overwrite=True,
            progress=progress,
            echo=lambda line: None,
            checkpoints=False,
            plot=False,
            warm_start=warm_start,
        )
        seconds = time.perf_counter() - t0
        model = shared.get(name).model
        if not keep:
            DomainStore(store).delete(name)
    state_bytes = sum(t.numel() * t.element_size() for t in model.domain_state().values())
    return {
        "test_accuracy": result.metrics["test_accuracy"],
        "val_accuracy": result.metrics["val_accuracy"],
        "best_epoch": result.metrics["best_epoch"],
        "train_seconds": seconds,
        "trainable_parameters": sum(p.numel() for p in model.trainable_parameters()),
        "domain_state_bytes": state_bytes,
        "config": settings.method_config,
        "history": result.history,
    }, model


def state_name(tag: str, method: str, domain: str, seed: int) -> str:
    """The name a kept run's domain has in the states store (a folder domain is named by
    its folder's name)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{tag}-{method}-{Path(domain).name}-s{seed}")[:64]


def run_accuracy(
    protocol: dict,
    methods: list[str],
    domains: list[str],
    seeds: list[int],
    *,
    path: Path,
    states: Path,
    tag: str,
    device: str = "cpu",
    keep_states: tuple[str, ...] = ("da3",),
    on_record: Callable[[list[dict]], None] | None = None,
    commit: str = "",
) -> list[dict]:
    """Every (method, domain, seed) not yet in ``path`` under the same protocol.

    Records are appended to ``path``'s list as each run ends (``on_record`` writes them), so
    an interrupted run resumes where it stopped. Trained tensors of ``keep_states`` methods
    are kept under ``states`` for later stages (the gating curve starts from them). Each new
    record names the ``commit`` that trained it, where given."""
    records: list[dict] = []
    if path.is_file():
        old = read_json(path)
        if old.get("protocol") == protocol:
            records = old["records"]
    # A record counts as done only if the method's config is still the one it ran with (a
    # changed default makes it stale; a setting added since keeps it, see same_config).
    records = [
        r
        for r in records
        if r["method"] not in methods or config_is_current(r["config"], r["method"], protocol)
    ]
    done = {(r["method"], r["domain"], r["seed"]) for r in records}
    todo = [(d, m, s) for d in domains for s in seeds for m in methods if (m, d, s) not in done]
    if not todo:
        return records
    frozen = FrozenBackbone(
        create_backbone(protocol["backbone"], protocol["weights"]).to(device),
        frozen_bits=protocol.get("frozen_bits", 32),
    )
    for i, (d, m, s) in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {m} on {d}, seed {s} ...", end=" ", flush=True)
        t0 = time.perf_counter()
        # a kept run is a domain of the states store (it records its image size and data)
        rec, _ = train_one(
            frozen,
            m,
            protocol["overrides"].get(m, {}),
            d,
            protocol,
            seed=s,
            device=device,
            progress=sys.stderr.isatty(),
            store=states,
            name=state_name(tag, m, d, s),
            keep=m in keep_states,
        )
        # training + test evaluation + saving: what this record cost (summed in the report)
        rec["wall_seconds"] = round(time.perf_counter() - t0, 1)
        if commit:
            rec["commit"] = commit
        records.append({"method": m, "domain": d, "seed": s, **rec})
        print(f"test top-1 {rec['test_accuracy']:.4f} ({rec['train_seconds']:.0f} s)", flush=True)
        if on_record:
            on_record(records)
    return records
