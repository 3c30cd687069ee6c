"""Measure what one training step of each method costs: memory three ways, time, FLOPs.

* ``saved_activation_bytes``: bytes autograd keeps for backward (saved-tensor hooks,
  deduplicated by storage, model state excluded). Deterministic, any machine.
* ``peak_memory_bytes``: high-water mark of a real training step (forward, backward,
  optimizer step; the first step, so gradients and optimizer state are included), in a
  fresh process per method (after one warm-up step whose gradients and optimizer state
  are dropped), minus that process's memory before the step
  (``baseline_memory_bytes``: interpreter, torch, the model, the batch). On CPU the
  high-water mark is the kernel's VmHWM, reset just before the step through
  ``/proc/self/clear_refs``; on CUDA the allocator's peak.
* ``step_seconds``: median over ``steps`` timed steps after one warm-up, methods
  interleaved so that drift of the machine hits all alike.
* ``analytical_floor_bytes``: the lean floor (:func:`da3.memory.analytical_floor_bytes`).
* ``trainable_parameters`` and ``inference_flops`` (per image, ``torch.utils.flop_counter``).
* ``frozen_weight_bytes``: bytes of the frozen backbone form the method reads, in the
  precision of ``frozen_bits`` (32, 16, 8; the lean form's); 0 for ``finetune``, whose
  backbone trains (its weights count as trainable).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from da3.backbones import create_backbone
from da3.errors import Da3Error
from da3.memory import (
    analytical_floor_bytes,
    process_memory_bytes,
    reset_peak_memory,
    saved_activation_bytes,
)
from da3.methods import AdaptedModel, FrozenBackbone, build_model, get_method, make_config
from da3.train import make_optimizer, train_step


def machine_description(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _batch(batch_size: int, image_size: int, num_classes: int, device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=g)
    y = torch.randint(0, num_classes, (batch_size,), generator=g)
    return x.to(device), y.to(device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def inference_flops(model: AdaptedModel, image_size: int, device: str) -> int:
    """FLOPs of one image's forward pass in eval mode (a multiply-add counts 2)."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())


def measure_peak_in_this_process(
    backbone: str,
    method: str,
    weights: str | None,
    image_size: int,
    batch_size: int,
    device: str,
    num_classes: int,
    config_overrides: dict | None = None,
    frozen_bits: int = 32,
) -> dict:
    """Peak memory of the first training step, measured in the calling process."""
    torch.manual_seed(0)
    frozen = FrozenBackbone(create_backbone(backbone, weights).to(device), frozen_bits=frozen_bits)
    model = build_model(method, frozen, num_classes, make_config(method, config_overrides))
    model.to(device).train()
    config = make_config(method, config_overrides)
    x, y = _batch(batch_size, image_size, num_classes, device)
    # A warm-up step pages in the code it runs and sets up kernels' one-time state (the
    # CUDA build of libtorch is large: first use of a path adds tens of MiB of code pages).
    # Its gradients and optimizer state are then dropped, so the measured step allocates
    # them afresh, as a first training step does.
    train_step(model, make_optimizer(model, config), x, y)
    for p in model.parameters():
        p.grad = None
    gc.collect()
    optimizer = make_optimizer(model, config)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        train_step(model, optimizer, x, y)
        torch.cuda.synchronize()
        return {
            "baseline": baseline,
            "peak": torch.cuda.max_memory_allocated() - baseline,
            "how": "torch.cuda.max_memory_allocated",
        }
    if reset_peak_memory():
        baseline = process_memory_bytes("VmRSS")
        train_step(model, optimizer, x, y)
        return {
            "baseline": baseline,
            "peak": process_memory_bytes("VmHWM") - baseline,
            "how": "VmHWM after clear_refs",
        }
    import resource  # no resettable peak here: the peak since the process started

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    train_step(model, optimizer, x, y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"baseline": baseline, "peak": peak - baseline, "how": "ru_maxrss"}


def measure_peak_in_fresh_process(
    method: str,
    *,
    backbone: str,
    weights: str | None,
    image_size: int,
    batch_size: int,
    device: str,
    num_classes: int,
    config_overrides: dict | None,
    frozen_bits: int = 32,
) -> dict:
    spec = json.dumps(
        {
            "frozen_bits": frozen_bits,
            "backbone": backbone,
            "method": method,
            "weights": weights,
            "image_size": image_size,
            "batch_size": batch_size,
            "device": device,
            "num_classes": num_classes,
            "config_overrides": config_overrides or {},
        }
    )
    # A fixed mmap threshold makes glibc return every large freed block to the kernel at
    # once, so the resident set follows the live tensors instead of a cached heap.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    proc = subprocess.run(
        [sys.executable, "-m", "da3.profile", spec],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise Da3Error(f"peak-memory worker for {method} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def profile_methods(
    backbone: str,
    methods: list[str],
    *,
    weights: str | None = None,
    image_size: int = 224,
    batch_size: int = 8,
    steps: int = 5,
    device: str = "cpu",
    num_classes: int = 10,
    peak: bool = True,
    config_overrides: dict[str, dict] | None = None,
    progress=None,
    frozen_bits: int = 32,
) -> list[dict]:
    """Profile ``methods`` on one backbone, all in this one invocation; one dict per method.
    ``frozen_bits``: the lean form's weights in 32, 16 or 8 bits."""
    if device == "cuda" and not torch.cuda.is_available():
        raise Da3Error("--device cuda: no CUDA device is available")
    overrides = config_overrides or {}
    frozen = FrozenBackbone(create_backbone(backbone, weights).to(device), frozen_bits=frozen_bits)
    x, y = _batch(batch_size, image_size, num_classes, device)
    rows, models, optimizers = [], {}, {}
    for m in methods:
        torch.manual_seed(0)
        config = make_config(m, overrides.get(m))
        model = build_model(m, frozen, num_classes, config).to(device).train()
        models[m], optimizers[m] = model, make_optimizer(model, config)
        saved = saved_activation_bytes(
            model, lambda model=model: F.cross_entropy(model(x), y), exclude=frozen.stock
        )
        rows.append(
            {
                "backbone": backbone,
                "weights": frozen.weights,
                "method": m,
                "image_size": image_size,
                "batch_size": batch_size,
                "device": device,
                "config": dataclasses.asdict(config),
                "frozen_bits": frozen_bits,
                "frozen_weight_bytes": frozen.weight_bytes("lean")
                if get_method(m).frozen_form == "lean"
                else 0,
                "trainable_parameters": sum(p.numel() for p in model.trainable_parameters()),
                "saved_activation_bytes": saved,
                "analytical_floor_bytes": analytical_floor_bytes(model, x),
                "inference_flops": inference_flops(model, image_size, device),
            }
        )
    times: dict[str, list[float]] = {m: [] for m in methods}
    for i in range(steps + 1):  # the first round warms up
        for m in methods:
            _sync(device)
            t0 = time.perf_counter()
            train_step(models[m], optimizers[m], x, y)
            _sync(device)
            if i:
                times[m].append(time.perf_counter() - t0)
        if progress:
            progress(f"step round {i + 1}/{steps + 1}")
    del models, optimizers
    for row in rows:
        m = row["method"]
        row["step_seconds"] = statistics.median(times[m]) if times[m] else None
        row["step_seconds_all"] = times[m]
        if peak:
            if progress:
                progress(f"peak memory of {m} (fresh process)")
            p = measure_peak_in_fresh_process(
                m,
                backbone=backbone,
                weights=weights,
                image_size=image_size,
                batch_size=batch_size,
                device=device,
                num_classes=num_classes,
                config_overrides=overrides.get(m),
                frozen_bits=frozen_bits,
            )
            row["peak_memory_bytes"], row["baseline_memory_bytes"] = p["peak"], p["baseline"]
            row["peak_memory_measure"] = p["how"]
        row["machine"] = machine_description(device)
        row["torch"] = torch.__version__
    return rows


def format_table(rows: list[dict]) -> str:
    """A readable table; ratios are against ``finetune`` when it was profiled."""
    ref = next((r for r in rows if r["method"] == "finetune"), None)
    mib = 2**20
    head = ["method", "trainable", "frozen MiB", "saved MiB", "floor MiB", "peak MiB"]
    head += ["step s", "GFLOPs"]
    if ref:
        head += ["saved ÷", "peak ÷", "step ÷"]
    lines = [head]
    for r in rows:
        peak = r.get("peak_memory_bytes")
        line = [
            r["method"],
            f"{r['trainable_parameters']:,}",
            f"{r.get('frozen_weight_bytes', 0) / mib:.1f}",
            f"{r['saved_activation_bytes'] / mib:.2f}",
            f"{r['analytical_floor_bytes'] / mib:.2f}",
            "-" if peak is None else f"{peak / mib:.1f}",
            f"{r['step_seconds']:.3f}",
            f"{r['inference_flops'] / 1e9:.3f}",
        ]
        if ref:

            def ratio(key, r=r):
                a, b = ref.get(key), r.get(key)
                return f"{a / b:.1f}x" if a and b else "-"

            line += [
                ratio("saved_activation_bytes"),
                ratio("peak_memory_bytes"),
                ratio("step_seconds"),
            ]
        lines.append(line)
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    out = [
        "  ".join(
            str(c).rjust(w) if j else str(c).ljust(w)
            for j, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in lines
    ]
    r0 = rows[0]
    title = (
        f"{r0['backbone']} ({r0['weights']}), {r0['image_size']} px, batch {r0['batch_size']}, "
        f"{r0.get('frozen_bits', 32)}-bit frozen weights, "
        f"{r0['device']}: {r0['machine']}, torch {r0['torch']}"
    )
    return "\n".join([title, *out])


def _worker(spec_json: str) -> None:
    spec = json.loads(spec_json)
    result = measure_peak_in_this_process(
        spec["backbone"],
        spec["method"],
        spec["weights"],
        spec["image_size"],
        spec["batch_size"],
        spec["device"],
        spec["num_classes"],
        spec["config_overrides"],
        spec.get("frozen_bits", 32),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    _worker(sys.argv[1])
