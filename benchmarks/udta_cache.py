"""What caching the frozen features saves: epoch time of ``udta`` with and without the feature
cache, against ``finetune``'s, on one benchmark domain.

    python benchmarks/udta_cache.py [--domain digits] [--epochs 3] [--image-size 64]
                                    [--cache-dtype float32] [--threads 0]

Protocol: the ImageNet-pretrained efficientnet_lite0; the domain's train/val split at
``--image-size`` px; batch 32, no augmentation (the cache needs the same images every epoch),
AdamW at each method's default learning rates, cosine decay, seed 0. Three runs, one after
another in this process: ``finetune``, ``udta``, ``udta`` with ``cache_features=true``. Per
epoch the training loop records the whole epoch's wall time (training + validation) and the
training pass's own; the table gives the median over the epochs after the first (the first
epoch of the cached run computes and stores the features) and the size of the cache (the
taps of the train and validation images). Writes benchmarks/results/udta_cache.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from da3.backbones import create_backbone
from da3.bench.accuracy import train_one
from da3.bench.common import header, run_info, save
from da3.data import load_domain
from da3.methods import FrozenBackbone

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = [("finetune", False), ("udta", False), ("udta", True)]


def label(method: str, cache: bool) -> str:
    return f"{method} + cache" if cache else method


def run_one(frozen, method: str, cache: bool, protocol: dict) -> dict:
    """One run through the library's training call (da3.bench.accuracy.train_one)."""
    rec, _ = train_one(
        frozen,
        method,
        {},
        protocol["domain"],
        protocol,
        extra={"cache_features": cache, "cache_dtype": protocol["cache_dtype"]},
    )
    history = rec["history"]
    later = history[1:] or history
    return {
        "method": method,
        "cache_features": cache,
        "epoch_seconds": [h["seconds"] for h in history],
        "train_pass_seconds": [h["train_seconds"] for h in history],
        "median_epoch_seconds_after_first": statistics.median(h["seconds"] for h in later),
        "median_train_pass_seconds_after_first": statistics.median(
            h["train_seconds"] for h in later
        ),
        "cache_bytes": max(h.get("cache_bytes", 0) for h in history),
        "val_accuracy": [h["val_accuracy"] for h in history],
        "test_accuracy": rec["test_accuracy"],
        "trainable_parameters": rec["trainable_parameters"],
        "wall_seconds": rec["train_seconds"],
    }


def markdown(info: dict, protocol: dict, records: list[dict]) -> str:
    ref = next((r for r in records if r["method"] == "finetune"), None)
    lines = [
        "| run | epoch s (median after 1st) | train pass s | speed-up vs finetune "
        "| first epoch s "
        "| cache MiB | test top-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        epoch = r["median_epoch_seconds_after_first"]
        speed = f"{ref['median_epoch_seconds_after_first'] / epoch:.1f}x" if ref else "-"
        lines.append(
            f"| {label(r['method'], r['cache_features'])} | {epoch:.2f} "
            f"| {r['median_train_pass_seconds_after_first']:.2f} | {speed} "
            f"| {r['epoch_seconds'][0]:.2f} | {r['cache_bytes'] / 2**20:.1f} "
            f"| {r['test_accuracy']:.4f} |"
        )
    proto = ", ".join(f"{k}={v}" for k, v in protocol.items())
    return (
        header(info, "udta with cached features against finetune: epoch time")
        + f"Protocol: {proto}. See the docstring of benchmarks/udta_cache.py.\n\n"
        + "\n".join(lines)
        + "\n\nepoch s: training pass + validation (both use the cache); train pass s: the "
        "training pass alone. The speed-up compares epoch s. The runs follow one another in "
        "one process (not interleaved), so load from other work on the machine moves them "
        "differently.\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domain", default="digits")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--cache-dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--out", default="udta_cache")
    args = ap.parse_args()
    if args.epochs < 2:
        raise SystemExit("--epochs must be at least 2 (the first epoch fills the cache)")
    if args.threads:
        torch.set_num_threads(args.threads)
    protocol = {
        "backbone": "efficientnet_lite0",
        "weights": "imagenet",
        "domain": args.domain,
        "image_size": args.image_size,
        "epochs": args.epochs,
        "batch_size": 32,
        "augment": False,
        "cache_dtype": args.cache_dtype,
        "seed": 0,
    }
    info = run_info()
    info["threads"] = torch.get_num_threads()
    frozen = FrozenBackbone(create_backbone("efficientnet_lite0", "imagenet"))
    data = load_domain(args.domain, args.image_size)
    protocol["train_images"], protocol["val_images"] = len(data.train), len(data.val)
    records = []
    t0 = time.perf_counter()
    for method, cache in RUNS:
        rec = run_one(frozen, method, cache, protocol)
        records.append(rec)
        print(
            f"{label(method, cache):15s} epoch {rec['median_epoch_seconds_after_first']:.2f}s "
            f"(first {rec['epoch_seconds'][0]:.2f}s), cache {rec['cache_bytes'] / 2**20:.1f} MiB, "
            f"test {rec['test_accuracy']:.4f}",
            flush=True,
        )
    info["wall_seconds"] = round(time.perf_counter() - t0, 1)
    save(
        RESULTS,
        args.out,
        {"info": info, "protocol": protocol, "records": records},
        markdown(info, protocol, records),
    )


if __name__ == "__main__":
    main()
