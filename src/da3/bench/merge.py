"""Merge ``da3 bench`` accuracy results run as separate jobs (one per method and domain, say,
in parallel on one GPU) into one results folder, as if one run had made them.

Every part must carry the same protocol; a (method, domain, seed) found twice must carry the
same result. A record whose method config is no longer the method's (a changed default, see
:func:`da3.bench.common.config_is_current`) is stale and left out, as ``da3 bench`` would retrain
it. Trained domain states (``.states/``) are copied alongside.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from da3.bench.common import config_is_current, save
from da3.errors import Da3Error
from da3.io import read_json


def merge_accuracy(parts: list[Path], results: Path, tag: str) -> list[dict]:
    """Merge ``bench_{tag}_accuracy.json`` of each folder in ``parts`` into ``results``.

    Records already in ``results`` are kept (they must agree too). Returns the merged records.
    """
    from da3.bench.run import _accuracy_md

    name = f"bench_{tag}_accuracy"
    target = Path(results) / f"{name}.json"
    sources = ([target] if target.is_file() else []) + [Path(p) / f"{name}.json" for p in parts]
    protocol, infos, by_key = None, [], {}
    for path in sources:
        if not path.is_file():
            raise Da3Error(f"{path}: not found; nothing to merge from {path.parent}")
        payload = read_json(path)
        if protocol is None:
            protocol = payload["protocol"]
        elif payload["protocol"] != protocol:
            raise Da3Error(f"{path}: its protocol differs from {sources[0]}'s; not merged")
        infos.append({"results": str(path.parent), **payload["info"]})
        for r in payload["records"]:
            if not config_is_current(r["config"], r["method"], protocol):
                continue
            key = (r["method"], r["domain"], r["seed"])
            old = by_key.get(key)
            if old is not None and old["test_accuracy"] != r["test_accuracy"]:
                raise Da3Error(f"{path}: {key} differs from an earlier part's result")
            by_key.setdefault(key, r)
    for part in parts:
        states = Path(part) / ".states"
        if states.is_dir():
            shutil.copytree(states, Path(results) / ".states", dirs_exist_ok=True)
    jobs: list[dict] = []
    for i in infos:  # the file of an earlier merge lists its jobs; a job is counted once
        for job in i.get("jobs", [i]):
            if job not in jobs:
                jobs.append(job)
    info = {k: v for k, v in infos[-1].items() if k not in ("jobs", "results")}
    info["command"] = [j["command"] for j in jobs]
    info["parallel_jobs"] = len(jobs)
    info["jobs"] = jobs
    info["stage_seconds"] = {"accuracy": max(j["stage_seconds"]["accuracy"] for j in jobs)}
    records = sorted(by_key.values(), key=lambda r: (r["method"], r["domain"], r["seed"]))
    payload = {"info": info, "protocol": protocol, "records": records}
    save(Path(results), name, payload, _accuracy_md(info, protocol, records))
    return records
