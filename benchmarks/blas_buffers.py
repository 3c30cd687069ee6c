"""MKL's GEMM workspaces, kept or freed: a whole `da3 train` process's peak and time.

MKL (torch's BLAS on x86) keeps each thread's GEMM workspace for its next call unless
``MKL_DISABLE_FAST_MM`` is set when torch loads; ``da3 train`` sets it before it imports
torch (``da3.commands.no_blas_buffers``). This runs the same ``da3 train`` processes both
ways, alternating: as ``da3 train`` runs (workspaces freed), and with torch imported before
``da3.cli`` starts (the variable then comes too late: workspaces kept). Peaks are VmHWM
above the floor of ``import torch`` (``import torch, torchvision`` for ResNet-50), as in
``process_memory.py``; times are the runs' own training seconds, medians of ``--repeats``.

    python benchmarks/blas_buffers.py            # Lite0 da3 and finetune, ResNet-50 da3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from da3.bench import process_memory as pm
from da3.bench.common import header, run_info, save

MiB = 2**20
KEPT = [
    sys.executable,
    "-c",
    "import torch, runpy; runpy.run_module('da3.cli', run_name='__main__')",
]
RUNS = [  # backbone, weights, method, micro-batch, frozen bits
    ("efficientnet_lite0", "imagenet", "da3", 1, 8),
    ("efficientnet_lite0", "imagenet", "finetune", 1, 32),
    ("resnet50", "none", "da3", 1, 8),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--backbones", default="efficientnet_lite0,resnet50")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp one)")
    p.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default="memory_mkl")
    args = p.parse_args()
    info = run_info("cpu")
    work = Path(args.work or tempfile.mkdtemp(prefix="da3-mkl-"))
    env = {k: v for k, v in os.environ.items() if k != "MKL_DISABLE_FAST_MM"}
    env["DA3_CACHE_DIR"] = str(work / "cache")
    spec = pm.SPEC
    folder = pm.make_folder(work / "clipart-folder", spec["per_class"])
    size = spec["image_size"]
    load = f"from da3.data import load_domain; load_domain({str(folder)!r}, {size})"
    pm._run([sys.executable, "-c", load], env)  # the data cache, outside the measured runs
    floors = {
        "torch": pm.measure_floor("torch"),
        "torchvision": pm.measure_floor("torch, torchvision"),
    }
    wanted = args.backbones.split(",")
    rows = []
    t0 = time.perf_counter()
    for backbone, weights, method, micro, bits in RUNS:
        if backbone not in wanted:
            continue
        floor = floors["torch" if backbone == "efficientnet_lite0" else "torchvision"]
        got: dict[str, list[dict]] = {"freed": [], "kept": []}
        for _ in range(args.repeats):
            for how, python in (("kept", KEPT), ("freed", None)):
                r = pm.train_run(
                    folder, work / "store", {**spec, "frozen_bits": bits}, backbone, weights,
                    method, micro, env, python,
                )  # fmt: skip
                got[how].append(r)
                print(
                    f"{backbone} {method} mb{micro} {bits}-bit, workspaces {how}: "
                    f"{(r['vmhwm_bytes'] - floor['vmhwm_bytes']) / MiB:.1f} MiB above the "
                    f"floor, {r['train_seconds']:.1f} s",
                    flush=True,
                )
        row = {"backbone": backbone, "method": method, "micro_batch": micro, "frozen_bits": bits}
        for how, runs in got.items():
            row[how] = {
                "vmhwm_above_floor_bytes": statistics.median(
                    r["vmhwm_bytes"] - floor["vmhwm_bytes"] for r in runs
                ),
                "train_seconds": statistics.median(r["train_seconds"] for r in runs),
                "test_accuracy": [r["test_accuracy"] for r in runs],
            }
        rows.append(row)
    info["stage_seconds"] = {"runs": round(time.perf_counter() - t0, 1)}
    lines = [
        "| backbone | method | micro-batch | frozen bits | peak, workspaces kept | peak, freed "
        "| saved | train s, kept | train s, freed | time freed / kept |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        k, f = r["kept"], r["freed"]
        lines.append(
            f"| {r['backbone']} | {r['method']} | {r['micro_batch']} | {r['frozen_bits']} "
            f"| {k['vmhwm_above_floor_bytes'] / MiB:.1f} MiB "
            f"| {f['vmhwm_above_floor_bytes'] / MiB:.1f} MiB "
            f"| {(k['vmhwm_above_floor_bytes'] - f['vmhwm_above_floor_bytes']) / MiB:.1f} MiB "
            f"| {k['train_seconds']:.1f} | {f['train_seconds']:.1f} "
            f"| {f['train_seconds'] / k['train_seconds']:.2f}x |"
        )
    note = (
        f"- peaks: VmHWM above the floor (import torch {floors['torch']['vmhwm_bytes'] / MiB:.0f}"
        f" MiB; with torchvision {floors['torchvision']['vmhwm_bytes'] / MiB:.0f} MiB), median "
        f"of {args.repeats} runs each, kept and freed alternating; 224 px, batch 8, one epoch\n"
    )
    md = header(info, "MKL's GEMM workspaces: kept or freed, whole `da3 train` processes", note)
    save(
        args.results,
        args.name,
        {"info": info, "floors": floors, "rows": rows},
        md + "\n".join(lines) + "\n",
    )


if __name__ == "__main__":
    main()
