"""Batch-1 inference latency of one domain: PyTorch eager, TorchScript and onnxruntime, with
DA3's gates skipping branches (``dynamic``) and with every branch computed (``static``)."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from da3.export.core import (
    FORMATS,
    SUFFIX,
    export_model,
    gated_block_count,
    inference_module,
    open_runner,
    runtime_version,
)
from da3.methods import AdaptedModel

RUNTIME_NAMES = {"eager": "PyTorch eager", "torchscript": "TorchScript", "onnx": "onnxruntime"}


@torch.no_grad()
def gate_statistics(model: AdaptedModel, samples: torch.Tensor) -> dict:
    """Over ``samples`` one at a time: the fraction of gated branches that ran and the FLOPs
    per image executed with the gates and without them (every branch computed)."""
    model.eval()
    usage = model.count_gates()  # counts the branches the gates run, image by image
    flops = 0
    for i in range(len(samples)):
        counter = FlopCounterMode(display=False)
        with counter:
            model(samples[i : i + 1])
        flops += counter.get_total_flops()
    counted = usage.stop() if usage is not None else None
    blocks = len(usage.shares) if usage is not None else 0
    static = inference_module(model, "onnx", "static", samples[:2]) if blocks else model
    counter = FlopCounterMode(display=False)
    with counter:
        static(samples[:1])
    return {
        "gated_blocks": blocks,
        "branches_run": counted["gate_branches_run"] if counted else 1.0,
        "flops_per_image_gated": flops / len(samples),
        "flops_per_image_all": counter.get_total_flops(),
    }


def _median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def bench_infer(
    model: AdaptedModel,
    samples: torch.Tensor,
    metadata: dict,
    threads: int = 1,
    warmup: int = 5,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Median batch-1 latency of ``model`` over ``samples`` (normalised images) in each
    runtime, gated and ungated; the exported files are verified like any export. Runtimes
    take turns image by image, so that a load change on the machine hits all of them."""
    say = progress or (lambda msg: None)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model.eval()
        modes = ["dynamic", "static"] if gated_block_count(model) else ["none"]
        variants: list[tuple[str, str, Callable, int]] = []
        for mode in modes:
            eager = model
            if mode == "static":  # the same logits, every branch computed
                eager = inference_module(model, "onnx", mode, samples[:2])
            variants.append(("eager", mode, eager, 0))
        exports = {}
        with tempfile.TemporaryDirectory(prefix="da3-bench-") as tmp:
            for fmt in ("torchscript", "onnx"):
                for mode in modes:
                    say(f"exporting {fmt} ({mode} gates) and checking it")
                    path = Path(tmp) / f"{mode}{SUFFIX[fmt]}"
                    gates = "static" if mode == "none" else mode
                    r = export_model(model, path, fmt, samples, metadata, gates=gates)
                    exports[(fmt, mode)] = r
                    variants.append((fmt, mode, open_runner(path, fmt, threads), r.bytes))
            say(f"timing {len(variants)} variants on {len(samples)} images, batch 1")
            times: list[list[float]] = [[] for _ in variants]
            with torch.no_grad():
                for i in range(warmup + len(samples)):
                    x = samples[i % len(samples)][None].contiguous()
                    for k, (_, _, run, _) in enumerate(variants):
                        t0 = time.perf_counter()
                        run(x)
                        if i >= warmup:
                            times[k].append(time.perf_counter() - t0)
        rows = []
        for (fmt, mode, _, size), t in zip(variants, times, strict=True):
            r = exports.get((fmt, mode))
            rows.append(
                {
                    "runtime": RUNTIME_NAMES[fmt],
                    "gates": mode,
                    "median_ms": _median_ms(t),
                    "p10_ms": 1e3 * statistics.quantiles(t, n=10)[0] if len(t) > 1 else None,
                    "p90_ms": 1e3 * statistics.quantiles(t, n=10)[-1] if len(t) > 1 else None,
                    "file_bytes": size or None,
                    "max_abs_diff": None if r is None else r.comparison.max_abs_diff,
                    "version": (
                        f"torch {torch.__version__}" if fmt == "eager" else runtime_version(fmt)
                    ),
                }
            )
        stats = gate_statistics(model, samples)
    finally:
        torch.set_num_threads(old_threads)
    return {
        "domain": metadata["domain"],
        "method": metadata["method"],
        "backbone": metadata["backbone"].get("name"),
        "image_size": metadata["input"]["image_size"],
        "threads": threads,
        "images": len(samples),
        "warmup": warmup,
        **stats,
        "rows": rows,
    }


def format_bench(result: dict) -> str:
    """The latency table as text."""
    lines = [
        f"domain {result['domain']} ({result['method']} on {result['backbone']}, "
        f"{result['image_size']} px): batch 1, median over {result['images']} images, "
        f"{result['threads']} thread(s)"
    ]
    if result["gated_blocks"]:
        lines.append(
            f"gates: {result['gated_blocks']} gated blocks, {100 * result['branches_run']:.1f}% "
            f"of their branches run; FLOPs per image {result['flops_per_image_gated'] / 1e6:.1f} M "
            f"gated, {result['flops_per_image_all'] / 1e6:.1f} M with every branch"
        )
    header = ("runtime", "gates", "median ms", "p10 ms", "p90 ms", "max |diff|")
    rows = [header]
    for r in result["rows"]:
        rows.append(
            (
                r["runtime"],
                r["gates"],
                f"{r['median_ms']:.2f}",
                "-" if r["p10_ms"] is None else f"{r['p10_ms']:.2f}",
                "-" if r["p90_ms"] is None else f"{r['p90_ms']:.2f}",
                "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if j < 2 else c.rjust(w)
                for j, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


__all__ = ["FORMATS", "bench_infer", "format_bench", "gate_statistics"]
