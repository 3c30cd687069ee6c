"""Accuracy of each method on the benchmark domains, under one protocol.

The protocol (the same for every method): one pretrained backbone, frozen where the method
says so; each domain's fixed train/val/test split (:mod:`da3.data`) at ``image_size`` px;
``epochs`` epochs of ``batch_size``, AdamW at the method's default learning rates (its
config: ``lr`` for what the method trains, ``head_lr`` for the new head), cosine decay to
zero, random translations of up to 1/12 of the side; the epoch with the best validation
accuracy is evaluated on the test split.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from da3.backbones import create_backbone
from da3.bench.common import config_is_current
from da3.data import load_domain
from da3.io import read_json, write_tensors
from da3.methods import FrozenBackbone, build_model, make_config
from da3.train import TrainConfig, evaluate, fit_domain


def train_one(
    frozen: FrozenBackbone,
    method: str,
    overrides: dict,
    data,
    protocol: dict,
    *,
    seed: int | None = None,
    device: str = "cpu",
    progress: bool = False,
):
    """Train ``method`` on one domain under ``protocol``; return (record, trained model)."""
    seed = protocol["seed"] if seed is None else seed
    config = make_config(method, overrides)
    tc = TrainConfig(
        epochs=protocol["epochs"], batch_size=protocol["batch_size"], seed=seed, device=device
    )
    torch.manual_seed(seed)
    model = build_model(method, frozen, len(data.classes), config).to(device)
    t0 = time.perf_counter()
    result = fit_domain(model, data, frozen.preprocess, config, tc, progress=progress)
    seconds = time.perf_counter() - t0
    model.load_domain_state(result.best_state)
    test = evaluate(model, data.test.images, data.test.labels, frozen.preprocess, device=device)
    state_bytes = sum(t.numel() * t.element_size() for t in model.domain_state().values())
    return {
        "test_accuracy": test["accuracy"],
        "val_accuracy": result.best_val_accuracy,
        "best_epoch": result.best_epoch,
        "train_seconds": seconds,
        "trainable_parameters": sum(p.numel() for p in model.trainable_parameters()),
        "domain_state_bytes": state_bytes,
        "config": dataclasses.asdict(config),
        "history": result.history,
    }, model


def state_path(states: Path, tag: str, method: str, domain: str, seed: int) -> Path:
    # a folder domain is named by its path; its file is named by the folder's name
    return states / f"{tag}-{method}-{Path(domain).name}-s{seed}.safetensors"


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
    frozen = FrozenBackbone(create_backbone(protocol["backbone"], protocol["weights"]).to(device))
    loaded: dict[str, object] = {}
    for i, (d, m, s) in enumerate(todo, 1):
        if d not in loaded:
            loaded.clear()  # one domain's images in memory at a time
            loaded[d] = load_domain(d, protocol["image_size"])
        data = loaded[d]
        print(f"[{i}/{len(todo)}] {m} on {d}, seed {s} ...", end=" ", flush=True)
        t0 = time.perf_counter()
        rec, model = train_one(
            frozen,
            m,
            protocol["overrides"].get(m, {}),
            data,
            protocol,
            seed=s,
            device=device,
            progress=sys.stderr.isatty(),
        )
        if m in keep_states:
            # the state records the image size and data it was trained on, as a domain does
            meta = {"image_size": protocol["image_size"], "data": d, "method": m}
            write_tensors(state_path(states, tag, m, d, s), model.domain_state(), meta)
        # training + test evaluation + saving: what this record cost (summed in the report)
        rec["wall_seconds"] = round(time.perf_counter() - t0, 1)
        if commit:
            rec["commit"] = commit
        records.append({"method": m, "domain": d, "seed": s, **rec})
        print(f"test top-1 {rec['test_accuracy']:.4f} ({rec['train_seconds']:.0f} s)", flush=True)
        if on_record:
            on_record(records)
    return records
