"""DA3 trained with SGD with momentum against AdamW: test accuracy paired by seed.

    python benchmarks/optimizer.py --seeds 0-2 [--lr 0.005] [--domains digits,clipart]

``optimizer=sgd`` (:class:`da3.optim.SGD`) holds each trainable weight and one momentum
buffer, half of AdamW's trainable state (weights, gradients, two moments). Its learning
rate (``lr`` and ``head_lr``, the same) was chosen on clip art over 0.003-0.1
(``sweep.py --domain clipart``: optimizer_lr_clipart.md); clip art is therefore not a
held-out domain here. Protocol: ``da3 bench --quick``'s accuracy stage (EfficientNet-Lite0,
ImageNet weights, 64 px, 3 epochs, batch 32, cosine decay, best validation epoch on the test
split); both optimizers see the same data order and augmentation for a seed. Resumable per
(domain, seed, optimizer). Writes benchmarks/results/<out>.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from da3.backbones import create_backbone
from da3.bench.accuracy import train_one
from da3.bench.common import header, parse_seeds, run_info, save
from da3.bench.run import PRESETS
from da3.data import BENCHMARK_DOMAINS
from da3.io import read_json
from da3.methods import FrozenBackbone

RESULTS = Path(__file__).resolve().parent / "results"


def markdown(info: dict, payload: dict) -> str:
    records, lr = payload["records"], payload["sgd_lr"]
    by = {(r["domain"], r["seed"], r["optimizer"]): r["test_accuracy"] for r in records}
    out = header(info, "DA3 with SGD with momentum against AdamW")
    out += (
        "Protocol: " + ", ".join(f"{k}={v}" for k, v in payload["protocol"].items()) + ". "
        f"AdamW: DA3's defaults (lr 0.003, head_lr 0.003). SGD: momentum 0.9, lr = head_lr = "
        f"{lr} (chosen on clip art, optimizer_lr_clipart.md). Test top-1 (%); differences "
        "paired by seed (same data order and augmentation), their mean and standard error.\n\n"
        "| domain | seeds | AdamW | SGD | SGD - AdamW (points) | s.e. | SGD above / level / "
        "below |\n|---|---|---|---|---|---|---|\n"
    )
    means = []
    for d in BENCHMARK_DOMAINS:
        seeds = sorted(s for dd, s, o in by if dd == d and o == "adamw" and (d, s, "sgd") in by)
        if not seeds:
            continue
        a = [100 * by[(d, s, "adamw")] for s in seeds]
        b = [100 * by[(d, s, "sgd")] for s in seeds]
        diff = [y - x for x, y in zip(a, b, strict=True)]
        se = f"{statistics.stdev(diff) / len(diff) ** 0.5:.2f}" if len(diff) > 1 else "-"
        means.append(statistics.mean(diff))
        wins = (sum(x > 0 for x in diff), sum(x == 0 for x in diff), sum(x < 0 for x in diff))
        note = " (lr chosen here)" if d == "clipart" else ""
        out += (
            f"| {d}{note} | {','.join(map(str, seeds))} | {statistics.mean(a):.2f} | "
            f"{statistics.mean(b):.2f} | {means[-1]:+.2f} | {se} | "
            f"{wins[0]} / {wins[1]} / {wins[2]} |\n"
        )
    if means:
        out += f"| **mean of domains** | | | | **{statistics.mean(means):+.2f}** | | |\n"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0-2")
    ap.add_argument("--domains", default=",".join(BENCHMARK_DOMAINS))
    ap.add_argument("--lr", type=float, default=0.005, help="SGD's lr and head_lr")
    ap.add_argument("--out", default="optimizer")
    args = ap.parse_args()
    protocol = dict(PRESETS["quick"]["accuracy"])
    path = RESULTS / f"{args.out}.json"
    old = read_json(path) if path.is_file() else {}
    same = old.get("protocol") == protocol and old.get("sgd_lr") == args.lr
    records: list[dict] = old["records"] if same else []
    done = {(r["domain"], r["seed"], r["optimizer"]) for r in records}
    runs = {"adamw": {}, "sgd": {"optimizer": "sgd", "lr": args.lr, "head_lr": args.lr}}
    frozen = FrozenBackbone(create_backbone(protocol["backbone"], protocol["weights"]))
    info = run_info("cpu")
    if same and old.get("info"):
        info = old["info"]  # the sitting that ran the records, until a run is added
    t0 = time.perf_counter()
    for seed in parse_seeds(args.seeds):
        for domain in [d.strip() for d in args.domains.split(",") if d.strip()]:
            for optimizer, overrides in runs.items():
                if (domain, seed, optimizer) in done:
                    continue
                rec, _ = train_one(frozen, "da3", overrides, domain, protocol, seed=seed)
                rec.pop("history", None)
                records.append({"domain": domain, "seed": seed, "optimizer": optimizer, **rec})
                print(
                    f"{domain} seed {seed} {optimizer}: test {rec['test_accuracy']:.4f} "
                    f"({rec['train_seconds']:.0f} s)",
                    flush=True,
                )
                info = {**run_info("cpu"), "wall_seconds": round(time.perf_counter() - t0, 1)}
                payload = {"protocol": protocol, "sgd_lr": args.lr, "records": records}
                save(RESULTS, args.out, {"info": info, **payload}, markdown(info, payload))
    payload = {"protocol": protocol, "sgd_lr": args.lr, "records": records}
    save(RESULTS, args.out, {"info": info, **payload}, markdown(info, payload))


if __name__ == "__main__":
    main()
