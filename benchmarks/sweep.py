"""Method settings side by side on one domain, over many seeds (test top-1 mean and spread).

    python benchmarks/sweep.py --domain clipart --epochs 3 --seeds 0-9 \\
        --runs linear da3 da3:head_warmup=0.34 [--image-size 64] [--out sweep_clipart]

A run is ``METHOD`` or ``METHOD:key=value,key=value`` (config overrides). Same protocol as
``da3 bench`` (the ImageNet-pretrained efficientnet_lite0, batch 32, AdamW, cosine decay,
random translations, best validation epoch on the test split), one record per run and seed.
On a small test split (clip art: 268 images, one image = 0.37 points) one seed cannot separate
settings a point apart; many seeds can. Resumable per (run, seed) under the same protocol.
Writes benchmarks/results/<out>.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from da3.backbones import create_backbone
from da3.bench.accuracy import train_one
from da3.bench.common import header, parse_seeds, run_info, save
from da3.io import read_json
from da3.methods import FrozenBackbone, parse_config

RESULTS = Path(__file__).resolve().parent / "results"


def parse_run(text: str) -> tuple[str, dict]:
    method, _, rest = text.partition(":")
    overrides = dict(item.split("=", 1) for item in rest.split(",") if item)
    parse_config(method, overrides)  # fails here, naming the key, before any work
    return method, overrides


def markdown(info: dict, protocol: dict, runs: list[str], records: list[dict]) -> str:
    lines = [
        "| run | seeds | mean test top-1 | min | max | vs first run (points) | per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    first = None
    for run in runs:
        accs = [r["test_accuracy"] for r in records if r["run"] == run]
        if not accs:
            continue
        mean = statistics.mean(accs)
        first = mean if first is None else first
        per = " ".join(f"{a:.3f}" for a in accs)
        lines.append(
            f"| `{run}` | {len(accs)} | {mean:.4f} | {min(accs):.3f} | {max(accs):.3f} | "
            f"{100 * (mean - first):+.1f} | {per} |"
        )
    proto = ", ".join(f"{k}={v}" for k, v in protocol.items())
    return (
        header(info, f"Settings side by side on {protocol['domain']}")
        + f"Protocol: {proto}. See the docstring of benchmarks/sweep.py.\n\n"
        + "\n".join(lines)
        + "\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domain", default="clipart")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--seeds", default="0-9")
    ap.add_argument("--runs", nargs="+", default=["linear", "da3"])
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    runs = {r: parse_run(r) for r in args.runs}
    seeds = parse_seeds(args.seeds)
    protocol = {
        "backbone": "efficientnet_lite0",
        "weights": "imagenet",
        "domain": args.domain,
        "image_size": args.image_size,
        "epochs": args.epochs,
        "batch_size": 32,
        "seed": seeds[0],
    }
    out = args.out or f"sweep_{args.domain}"
    path = RESULTS / f"{out}.json"
    records: list[dict] = []
    if path.is_file() and read_json(path).get("protocol") == protocol:
        records = read_json(path)["records"]
    info = run_info()
    frozen = FrozenBackbone(create_backbone("efficientnet_lite0", "imagenet"))
    t0 = time.perf_counter()
    for run, (method, overrides) in runs.items():
        for seed in seeds:
            if any(r["run"] == run and r["seed"] == seed for r in records):
                continue
            rec, _ = train_one(frozen, method, overrides, args.domain, protocol, seed=seed)
            records.append(
                {"run": run, "seed": seed, **{k: rec[k] for k in ("test_accuracy", "config")}}
            )
            print(f"{run:40s} seed {seed}: test {rec['test_accuracy']:.4f}", flush=True)
            info["wall_seconds"] = round(time.perf_counter() - t0, 1)
            save(
                RESULTS,
                out,
                {"info": info, "protocol": protocol, "records": records},
                markdown(info, protocol, list(runs), records),
            )


if __name__ == "__main__":
    main()
