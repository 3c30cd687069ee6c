"""``da3 bench``: every method on every benchmark domain under one written protocol, the
memory/time profile, DA3's gating curve, and the report (tables + plots).

Stages, each resumable (what is already in the results folder under the same protocol is not
redone): ``accuracy`` (method x domain x seed), ``profile`` (one table per setting, methods
interleaved), ``gating`` (per domain), ``memory`` (the peak of real ``da3 train`` processes,
:mod:`da3.bench.process_memory`), then ``report`` (``docs/benchmark.md`` and PNGs).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import torch

from da3.backbones import create_backbone
from da3.bench import gating as gating_mod
from da3.bench import process_memory
from da3.bench.accuracy import run_accuracy, state_name, train_one
from da3.bench.common import (
    commits_line,
    config_is_current,
    header,
    run_info,
    same_config,
    same_gating_protocol,
    save,
)
from da3.errors import Da3Error
from da3.io import read_json
from da3.methods import FrozenBackbone, build_model, list_methods, make_config
from da3.store import DomainStore

STAGES = ("accuracy", "profile", "gating", "memory", "report")

# The two written protocols. ``quick`` is sized for the 2-core CPU machine (under an hour for
# every method: 3 epochs; fine-tuning and piggyback cost ~10 min each there); ``full`` is the
# one to run on a GPU.
PRESETS: dict[str, dict] = {
    "quick": {
        "accuracy": {
            "backbone": "efficientnet_lite0",
            "weights": "imagenet",
            "image_size": 64,
            "epochs": 3,
            "batch_size": 32,
            "seed": 0,
            "augment": True,
        },
        "seeds": [0],
        "profiles": [
            {"backbone": "resnet50", "weights": "none", "image_size": 224, "batch_size": 8},
            {
                "backbone": "efficientnet_lite0",
                "weights": "imagenet",
                "image_size": 64,
                "batch_size": 32,
            },
        ],
        "profile_steps": 3,
        "gating": {"targets": [0.8, 0.65, 0.55], "gate_epochs": 2, "latency_images": 100},
        "memory": process_memory.SPEC,
    },
    "full": {
        "accuracy": {
            "backbone": "efficientnet_lite0",
            "weights": "imagenet",
            "image_size": 128,
            "epochs": 10,
            "batch_size": 32,
            "seed": 0,
            "augment": True,
        },
        "seeds": [0, 1, 2],
        "profiles": [
            {"backbone": "resnet50", "weights": "none", "image_size": 224, "batch_size": 8},
            {"backbone": "mobilenet_v2", "weights": "none", "image_size": 224, "batch_size": 8},
            {
                "backbone": "efficientnet_lite0",
                "weights": "imagenet",
                "image_size": 224,
                "batch_size": 8,
            },
            {
                "backbone": "efficientnet_lite0",
                "weights": "imagenet",
                "image_size": 128,
                "batch_size": 32,
            },
        ],
        "profile_steps": 10,
        "gating": {"targets": [0.8, 0.65, 0.55, 0.45], "gate_epochs": 3, "latency_images": 300},
        "memory": process_memory.SPEC,
    },
}


def profile_key(p: dict) -> str:
    """How ``da3 bench --profiles`` names a profile setting."""
    return f"{p['backbone']}-{p['image_size']}px-b{p['batch_size']}"


def profile_name(tag: str, p: dict) -> str:
    return f"bench_{tag}_profile_{p['backbone']}_{p['image_size']}px_b{p['batch_size']}"


def _timed(info: dict, stage: str, t0: float) -> None:
    info.setdefault("stage_seconds", {})[stage] = round(time.perf_counter() - t0, 1)


def run_bench(
    tag: str,
    preset: dict,
    *,
    methods: list[str] | None = None,
    domains: list[str] | None = None,
    stages: tuple[str, ...] = STAGES,
    device: str = "cpu",
    overrides: dict[str, dict] | None = None,
    results: Path = Path("benchmarks/results"),
    report: Path = Path("docs/benchmark.md"),
) -> None:
    """Run the stages of one benchmark preset; see the module docstring."""
    from da3.bench.report import write_report
    from da3.data import BENCHMARK_DOMAINS

    methods = methods or list_methods()
    domains = domains or list(BENCHMARK_DOMAINS)
    if device == "cuda" and not torch.cuda.is_available():
        raise Da3Error("--device cuda: no CUDA device is available")
    results, states = Path(results), Path(results) / ".states"
    protocol = {**preset["accuracy"], "overrides": overrides or {}, "device": device}
    info = run_info(device)
    info["threads"] = torch.get_num_threads()
    info["device"] = device

    if "accuracy" in stages:
        t0 = time.perf_counter()
        acc_path = results / f"bench_{tag}_accuracy.json"

        def write(records: list[dict]) -> None:
            _timed(info, "accuracy", t0)
            payload = {"info": info, "protocol": protocol, "records": records}
            save(results, f"bench_{tag}_accuracy", payload, _accuracy_md(info, protocol, records))

        records = run_accuracy(
            protocol,
            methods,
            domains,
            preset["seeds"],
            path=acc_path,
            states=states,
            tag=tag,
            device=device,
            on_record=write,
            commit=info["commit"],
        )
        if not records:
            raise Da3Error("bench: no accuracy records were produced")

    if "profile" in stages:
        from da3.profile import format_table, profile_methods

        for p in preset["profiles"]:
            name = profile_name(tag, p)
            spec = {**p, "steps": preset["profile_steps"], "device": device}
            path = results / f"{name}.json"
            if path.is_file():
                old = read_json(path)
                rows = {r["method"]: r for r in old.get("rows", [])}
                # a row from before rows held their config counts as legacy says
                current = all(
                    m in rows and config_is_current(rows[m].get("config", {}), m, protocol)
                    for m in methods
                )
                if old.get("spec") == spec and current:
                    continue
            print(f"profile: {p['backbone']} {p['image_size']} px batch {p['batch_size']}")
            t0 = time.perf_counter()
            rows = profile_methods(
                p["backbone"],
                methods,
                weights=p["weights"],
                image_size=p["image_size"],
                batch_size=p["batch_size"],
                steps=preset["profile_steps"],
                device=device,
                config_overrides=overrides,
                progress=lambda msg: print(f"  {msg}", flush=True),
                frozen_bits=protocol.get("frozen_bits", 32),
            )
            pinfo = {k: v for k, v in info.items() if k != "stage_seconds"}
            pinfo["stage_seconds"] = {"profile": round(time.perf_counter() - t0, 1)}
            table = format_table(rows)
            print(table, flush=True)
            md = header(pinfo, f"Training cost of one step: {p['backbone']}") + (
                f"```\n{table}\n```\n\nWall time: {pinfo['stage_seconds']['profile']} s.\n"
            )
            save(results, name, {"info": pinfo, "name": name, "spec": spec, "rows": rows}, md)

    if "gating" in stages and "da3" in methods:
        t0 = time.perf_counter()
        da3_overrides = protocol["overrides"].get("da3", {})
        da3_config = dataclasses.asdict(make_config("da3", da3_overrides))
        # DA3's whole config is part of the protocol: a changed default starts the curve over
        gprotocol = {**protocol, **preset["gating"], "da3_config": da3_config}
        path = results / f"bench_{tag}_gating.json"
        records = []
        if path.is_file() and same_gating_protocol(read_json(path).get("protocol"), gprotocol):
            records = read_json(path)["records"]
        frozen = FrozenBackbone(
            create_backbone(protocol["backbone"], protocol["weights"]).to(device),
            frozen_bits=protocol.get("frozen_bits", 32),
        )
        seed = preset["seeds"][0]

        def ungated(domain: str, data):
            acc = read_json(results / f"bench_{tag}_accuracy.json")
            rec = next(
                (
                    r
                    for r in acc["records"]
                    if (r["method"], r["domain"], r["seed"]) == ("da3", domain, seed)
                ),
                None,
            )
            store, name = DomainStore(states), state_name(tag, "da3", domain, seed)
            if (
                rec is not None
                and same_config(rec["config"], da3_config, "da3")
                and store.exists(name)
                and acc.get("protocol") == protocol
            ):
                config = make_config("da3", da3_overrides)
                model = build_model("da3", frozen, len(data.classes), config)
                model.load_domain_state(store.read(name)[1])
                return rec, model.to(device)
            return train_one(frozen, "da3", da3_overrides, domain, protocol, device=device)

        def write(records: list[dict]) -> None:
            _timed(info, "gating", t0)
            payload = {"info": info, "protocol": gprotocol, "records": records}
            md = header(info, "DA3 dynamic gating: FLOPs against accuracy") + (
                gating_mod.markdown_table(records)
            )
            save(results, f"bench_{tag}_gating", payload, md)
            gating_mod.plot(records, results / f"bench_{tag}_gating.png")

        gating_mod.run_gating(
            frozen, gprotocol, domains, ungated, records, device=device, on_domain=write
        )

    if "memory" in stages and "memory" in preset and device == "cpu":
        name = f"bench_{tag}_memory"
        path = results / f"{name}.json"
        mspec = dict(preset["memory"])
        if protocol.get("frozen_bits", 32) != 32:
            mspec["frozen_bits"] = protocol["frozen_bits"]
        spec = {**mspec, "methods": methods}
        if not (path.is_file() and read_json(path).get("spec") == spec):
            print("memory: real `da3 train` processes, one per method", flush=True)
            t0 = time.perf_counter()
            result = process_memory.run_process_memory(
                methods, mspec, progress=lambda m: print(f"  {m}", flush=True)
            )
            minfo = {k: v for k, v in info.items() if k != "stage_seconds"}
            minfo["stage_seconds"] = {"memory": round(time.perf_counter() - t0, 1)}
            md = header(minfo, "The memory a device sees: whole `da3 train` processes") + (
                process_memory.markdown_table(result)
            )
            save(results, name, {"info": minfo, **result}, md)

    if "report" in stages:
        write_report(report, results)


def _accuracy_md(info: dict, protocol: dict, records: list[dict]) -> str:
    from da3.bench.report import accuracy_table

    proto = ", ".join(f"{k}={v}" for k, v in protocol.items())
    title = "Accuracy on the benchmark domains (test top-1)"
    return (
        header(info, title, commits_line(info, records))
        + f"Protocol: {proto}.\n\n"
        + accuracy_table(records)
    )


def preset_with(name: str, **changes) -> dict:
    """A copy of preset ``name`` with accuracy-protocol fields changed (``None`` = keep)."""
    preset = copy.deepcopy(PRESETS[name])
    for k, v in changes.items():
        if v is not None:
            preset["accuracy"][k] = v
    return preset
