"""Batch-1 inference latency of a gated DA3 domain: PyTorch eager, TorchScript, onnxruntime.

    python benchmarks/infer_latency.py [--store DIR] [--domain digits-gated] [--images 100]
        [--threads 1] [--train]

The domain is exported (``da3.export``) to TorchScript and ONNX twice: with its gates as
conditionals (a closed gate skips its frozen branch; "dynamic") and with every branch computed
(the same logits; "static"); each file is checked against PyTorch first. Then every variant
classifies the first ``--images`` test images one at a time, the variants taking turns image by
image; the table gives the median, 10th and 90th percentile. ``--train`` first trains the
domain if the store lacks it: ``da3 train --domain digits-gated --data digits --method da3
--epochs 3 --image-size 64 gates=true gate_target=0.6`` (a short run: the point is the
runtimes, not the accuracy).

Writes benchmarks/results/<out>.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
import time
from pathlib import Path

import torch

from da3.bench.common import header, run_info, save
from da3.domains import DomainStore
from da3.export.bench import bench_infer, format_bench
from da3.export.cli import load_for_export

RESULTS = Path(__file__).resolve().parent / "results"

TRAIN = [
    "--data",
    "digits",
    "--method",
    "da3",
    "--epochs",
    "3",
    "--image-size",
    "64",
    "--quiet",
    "gates=true",
    "gate_target=0.6",
]


def markdown(info: dict, result: dict, domain: dict) -> str:
    rows = [
        "| runtime | gates | median ms | p10 ms | p90 ms | file MiB | max abs diff vs PyTorch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        size = "-" if r["file_bytes"] is None else f"{r['file_bytes'] / 2**20:.1f}"
        diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
        rows.append(
            f"| {r['runtime']} | {r['gates']} | {r['median_ms']:.2f} | "
            f"{r['p10_ms']:.2f} | {r['p90_ms']:.2f} | {size} | {diff} |"
        )
    m = domain.get("metrics", {})
    return (
        header(info, "Batch-1 inference latency: PyTorch, TorchScript, onnxruntime")
        + f"Runtimes: {', '.join(info['runtimes'])}.\n\n"
        + f"Domain `{result['domain']}`: {result['method']} on {result['backbone']}, "
        f"{result['image_size']} px, test top-1 {m.get('test_accuracy', float('nan')):.4f}; "
        f"{result['images']} test images one at a time after {result['warmup']} warm-up "
        f"rounds, {result['threads']} thread(s) in every runtime, the variants taking turns "
        "image by image.\n\n"
        f"Gates: {result['gated_blocks']} gated blocks; on these images "
        f"{100 * result['branches_run']:.1f}% of their branches ran, "
        f"{result['flops_per_image_gated'] / 1e6:.1f} M FLOPs per image against "
        f"{result['flops_per_image_all'] / 1e6:.1f} M with every branch "
        f"({100 * result['flops_per_image_gated'] / result['flops_per_image_all']:.1f}%).\n\n"
        '"dynamic": each gated block is a conditional (ONNX `If`, TorchScript `if`, PyTorch\'s '
        'own skip) and a closed gate skips its frozen branch; "static": every branch runs and '
        "is multiplied by the gate (the same logits).\n\n" + "\n".join(rows) + "\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=Path("da3-store"))
    ap.add_argument("--domain", default="digits-gated")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train", action="store_true", help="train the domain if it is missing")
    ap.add_argument("--out", default="infer_latency")
    args = ap.parse_args()
    store = DomainStore(args.store)
    if not store.exists(args.domain):
        if not args.train:
            sys.exit(f"no domain {args.domain!r} in {args.store}; pass --train to train it")
        da3 = Path(sys.executable).with_name("da3")
        cmd = [str(da3), "train", "--domain", args.domain, "--store", str(args.store), *TRAIN]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    t0 = time.perf_counter()
    model, d, metadata, samples = load_for_export(args.store, args.domain, args.images, noise=0)
    result = bench_infer(
        d.model, samples, metadata, threads=args.threads, progress=lambda m: print(f"  {m}")
    )
    print(format_bench(result))
    torch.set_num_threads(args.threads)  # the machine line records the threads used
    info = run_info()
    info["wall_seconds"] = round(time.perf_counter() - t0, 1)
    info["runtimes"] = [f"torch {torch.__version__}"] + [
        f"{name} {importlib.metadata.version(name)}"
        for name in ("onnxruntime", "onnx", "onnxscript")
    ]
    domain = store.read_meta(args.domain)
    save(
        RESULTS,
        args.out,
        {"info": info, "domain": domain, "result": result},
        markdown(info, result, domain),
    )


if __name__ == "__main__":
    main()
