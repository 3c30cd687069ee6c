"""The memory a device sees: real ``da3 train`` processes, one per method, side by side.

Each run is a fresh ``python -m da3.cli train`` process on a real folder of images (clip art
drawings written as PNG files, a few per class: memory does not grow with the number of
images, the data being read a batch at a time), one epoch at 224 px, batch 8. Its peak is
read two ways:

* ``VmHWM``: the kernel's high-water mark of the process's resident memory, read by the run
  itself at its end (``history.json``'s memory record), after its work and before the
  interpreter shuts down;
* ``wait4``: the peak resident size the kernel reports for the finished process (what
  ``/usr/bin/time -f %M`` prints), which also covers the interpreter's shutdown.

Each is reported above the floor of the runtime the run needs, measured the same way in the
same sitting: a fresh ``python -c "import torch"`` (plus ``torchvision`` for its backbones).
With the CUDA build of torch, shutting the interpreter down pages in ~120 MiB of the CUDA
libraries' code at exit, in every torch process alike (the floor's too); the ``VmHWM``
figures leave that out, the ``wait4`` ones include it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from da3.errors import Da3Error

MiB = 2**20
# what `da3 bench` measures (its presets' "memory" entry)
SPEC = {
    "backbones": [["efficientnet_lite0", "imagenet"], ["resnet50", "none"]],
    "image_size": 224,
    "batch_size": 8,
    "epochs": 1,
    "per_class": 8,  # images of each clip-art class in the folder (60/10/30: ~5 train each)
}


def runs_for(methods: list[str]) -> list[tuple[str, int]]:
    """(method, micro-batch) pairs: every method at the full batch, and fine-tuning and DA3
    also one image at a time (fine-tuning's lowest peak; DA3's exact micro-batch)."""
    runs = [(m, 0) for m in methods]
    runs += [(m, 1) for m in ("finetune", "da3") if m in methods]
    return runs


def make_folder(dest: Path, per_class: int, size: int = 256) -> Path:
    """A folder of class folders of PNG files: the first ``per_class`` drawings of each
    clip-art class (the drawings come rendered from the offline clip-art package)."""
    import numpy as np
    from PIL import Image

    from da3.data import load_domain

    if dest.is_dir() and any(dest.iterdir()):
        return dest
    domain = load_domain("clipart", size)
    counts: dict[int, int] = {}
    for split in (domain.train, domain.val, domain.test):
        for i in range(len(split)):
            label = int(split.labels[i])
            if counts.get(label, 0) >= per_class:
                continue
            counts[label] = counts.get(label, 0) + 1
            folder = dest / domain.classes[label].replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            image = np.ascontiguousarray(split.images[i].permute(1, 2, 0).numpy())
            Image.fromarray(image).save(folder / f"{counts[label]:03d}.png")
    return dest


def _run(argv: list[str], env: dict | None = None) -> tuple[int, str, str, float]:
    """Run ``argv`` to its end; (peak resident bytes from wait4, stdout, stderr, seconds).
    Output goes to files, not pipes; the process is started and reaped by a small launcher
    (:data:`LAUNCHER`), whose ``wait4`` returns its resource usage."""
    with (
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
        tempfile.NamedTemporaryFile("r", suffix=".maxrss") as peak,
    ):
        t0 = time.perf_counter()
        launch = [sys.executable, "-S", "-c", LAUNCHER, peak.name, *argv]
        proc = subprocess.Popen(launch, stdout=out, stderr=err, text=True, env=env)
        proc.wait()
        seconds = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
        maxrss = peak.read().strip()
    if proc.returncode != 0 or not maxrss:
        last = (stderr.strip().splitlines() or ["(no output)"])[-1]
        raise Da3Error(f"{' '.join(argv[2:6])} ...: exit {proc.returncode}: {last}")
    return int(maxrss) * 1024, stdout, stderr, seconds


# The measured process is started by a small launcher, not by this (large) process: Linux
# carries the peak resident size of the address space a process is exec'd from into the new
# program's own (``ru_maxrss``), so a child exec'd straight from a 1 GiB parent reports at
# least 1 GiB. The launcher (python -S, ~10 MiB) forks, execs the command, reaps it with
# wait4 and writes its peak, as ``/usr/bin/time -f %M`` does.
LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


FLOOR_CODE = (
    "import {mods}\nprint(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\n"
)


def measure_floor(modules: str, repeats: int = 3) -> dict:
    """The floor of a runtime: median VmHWM (in-process, at the end) and wait4 peak of
    fresh ``python -c "import <modules>"`` processes."""
    hwm, wait = [], []
    for _ in range(repeats):
        peak, out, _, _ = _run([sys.executable, "-c", FLOOR_CODE.format(mods=modules)])
        hwm.append(int(out.split()[-1]) * 1024)
        wait.append(peak)
    return {
        "modules": modules,
        "vmhwm_bytes": int(statistics.median(hwm)),
        "wait4_bytes": int(statistics.median(wait)),
        "repeats": repeats,
    }


def train_run(
    folder: Path,
    store: Path,
    spec: dict,
    backbone: str,
    weights: str,
    method: str,
    micro_batch: int,
    env: dict,
    python: list[str] | None = None,
    settings: list[str] | None = None,
) -> dict:
    """One real ``da3 train`` process; its peaks and its own memory record. ``python``:
    what runs the ``da3.cli`` module (default ``python -m da3.cli``); ``settings``:
    ``key=value`` settings of the run (e.g. ``optimizer=sgd``)."""
    settings = list(settings or [])
    name = f"{method}-mb{micro_batch}" + ("-set" if settings else "")
    argv = [
        *(python or [sys.executable, "-m", "da3.cli"]),
        "train",
        "--domain",
        name,
        "--data",
        str(folder),
        "--method",
        method,
        "--backbone",
        backbone,
        "--weights",
        weights,
        "--image-size",
        str(spec["image_size"]),
        "--batch-size",
        str(spec["batch_size"]),
        "--epochs",
        str(spec["epochs"]),
        "--store",
        str(store),
        "--quiet",
        "--overwrite",
    ]
    if micro_batch:
        argv += ["--micro-batch", str(micro_batch)]
    argv += settings
    from da3.methods.base import get_method

    bits = spec.get("frozen_bits", 32)
    if bits != 32 and get_method(method).frozen_form == "lean":
        argv += ["--frozen-bits", str(bits)]
    else:
        bits = 32
    wait4, _, _, seconds = _run(argv, env)
    history = json.loads((store / "runs" / name / "history.json").read_text())
    memory = history["memory"]
    return {
        "method": method,
        "frozen_bits": bits,
        "settings": settings,
        "micro_batch": micro_batch or spec["batch_size"],
        "vmhwm_bytes": memory["peak_bytes"],
        "wait4_bytes": wait4,
        "runtime_bytes": memory["runtime_bytes"],
        "peak_phase": memory["peak_phase"],
        "frozen_weights_bytes": memory["frozen_weights_bytes"],
        "trainable_state_bytes": memory["trainable_bytes"]
        + memory["gradient_bytes"]
        + memory["optimizer_bytes"],
        "phases": memory["phases"],
        "seconds": seconds,
        "train_seconds": history["metrics"]["train_seconds"],
        "test_accuracy": history["metrics"]["test_accuracy"],
    }


def above_floor(run: dict, floor: dict, backbone: str, weights: str) -> dict:
    """What a row adds to :func:`train_run`'s record: its backbone, the floor it is read
    against, and its two peaks above that floor."""
    return {
        "backbone": backbone,
        "weights": weights,
        "floor": floor["modules"],
        "vmhwm_above_floor_bytes": run["vmhwm_bytes"] - floor["vmhwm_bytes"],
        "wait4_above_floor_bytes": run["wait4_bytes"] - floor["wait4_bytes"],
    }


def compile_bytecode() -> bool:
    """Compile da3's modules into ``__pycache__``, as pip does when it installs a wheel, so
    each measured run loads them as an installed da3 does. Without it, an environment that
    sets ``PYTHONDONTWRITEBYTECODE`` (or a read-only source tree) has every run compile
    da3's source at its start, and the compiler's freed memory stays resident (later
    allocations reuse some of it): memory an installed package does not hold
    (``benchmarks/memory_parts.py`` reads the imports both ways). Returns whether every
    module compiled (False where the package folder is read-only: then the runs compile as
    they import)."""
    import compileall

    import da3

    return bool(compileall.compile_dir(Path(da3.__file__).parent, quiet=2))


def run_process_memory(
    methods: list[str],
    spec: dict = SPEC,
    *,
    work: Path | None = None,
    folder: Path | None = None,
    progress=print,
) -> dict:
    """Floors and one ``da3 train`` process per (backbone, method, micro-batch) of ``spec``;
    on ``folder``, or a folder of clip-art PNGs made in ``work``."""
    work = Path(work or tempfile.mkdtemp(prefix="da3-memory-"))
    env = {**os.environ, "DA3_CACHE_DIR": str(work / "cache")}
    if folder is None:
        folder = make_folder(work / "clipart-folder", spec["per_class"])
    # the folder's cache is prepared once, outside the measured runs
    size = spec["image_size"]
    _run(
        [
            sys.executable,
            "-c",
            f"from da3.data import load_domain; load_domain({str(folder)!r}, {size})",
        ],
        env,
    )
    compiled = compile_bytecode()
    floors = {
        "torch": measure_floor("torch"),
        "torch+torchvision": measure_floor("torch, torchvision"),
    }
    progress(
        f"floor: import torch {floors['torch']['vmhwm_bytes'] / MiB:.0f} MiB (VmHWM), "
        f"{floors['torch']['wait4_bytes'] / MiB:.0f} MiB (wait4)"
    )
    rows = []
    for backbone, weights in spec["backbones"]:
        floor = floors["torch+torchvision" if backbone != "efficientnet_lite0" else "torch"]
        for method, micro in runs_for(methods):
            r = train_run(
                folder, work / "store", spec, backbone, weights, method, micro, env,
                settings=spec.get("settings"),
            )  # fmt: skip
            r |= above_floor(r, floor, backbone, weights)
            rows.append(r)
            progress(
                f"{backbone} {method} micro-batch {r['micro_batch']}: "
                f"{r['vmhwm_above_floor_bytes'] / MiB:.1f} MiB above the floor (VmHWM), "
                f"{r['wait4_above_floor_bytes'] / MiB:.1f} (wait4), peak during "
                f"{r['peak_phase']}, {r['seconds']:.0f}s"
            )
    classes = [p for p in folder.iterdir() if p.is_dir()]
    images = sum(1 for c in classes for _ in c.iterdir())
    return {
        "spec": {**spec, "methods": methods},
        "folder": f"{len(classes)} class folders, {images} PNG files",
        "bytecode": "compiled" if compiled else "compiled by each run",
        "floors": floors,
        "rows": rows,
    }


def _floor_key(row: dict) -> str:
    """The key in a result's ``floors`` of the floor ``row`` was read against."""
    return "torch" if row["floor"] == "torch" else "torch+torchvision"


def merge_results(parts: list[dict]) -> dict:
    """One result from runs of this stage on different backbones (or methods), each read
    against the floors measured in its own sitting: the rows side by side, the spec's
    backbones and methods joined, the stage times added."""
    if not parts:
        raise Da3Error("nothing to merge")
    keys = ("image_size", "batch_size", "epochs", "per_class")
    for p in parts[1:]:
        if any(p["spec"][k] != parts[0]["spec"][k] for k in keys):
            raise Da3Error("memory results to merge differ in their settings: " + ", ".join(keys))
    spec = {k: parts[0]["spec"][k] for k in keys}
    spec["backbones"] = [b for p in parts for b in p["spec"]["backbones"]]
    spec["methods"] = list(dict.fromkeys(m for p in parts for m in p["spec"]["methods"]))
    info = {**parts[0]["info"]}
    for key in ("commit", "date"):  # sittings at other commits or days say so
        info[key] = ", ".join(dict.fromkeys(str(p["info"].get(key, "?")) for p in parts))
    info["stage_seconds"] = {
        "memory": round(sum(p["info"]["stage_seconds"]["memory"] for p in parts), 1)
    }
    info["command"] = " ; ".join(str(p["info"].get("command", "")) for p in parts)
    floors: dict = {}
    for p in parts:  # each backbone's rows with the floor they were read against
        for r in p["rows"]:
            floors[_floor_key(r)] = p["floors"][_floor_key(r)]
    for p in parts:
        for k, v in p["floors"].items():
            floors.setdefault(k, v)
    return {
        "info": info,
        "spec": spec,
        "folder": parts[0]["folder"],
        "bytecode": " / ".join(dict.fromkeys(p.get("bytecode", "not recorded") for p in parts)),
        "floors": floors,
        "rows": [r for p in parts for r in p["rows"]],
    }


_BYTECODE = {
    "compiled": "da3's modules were compiled to bytecode before the runs, as a pip-installed "
    "package has them (`compile_bytecode`).",
    "compiled by each run": "da3's modules were compiled from source by each run (the package "
    "folder was read-only), which holds more than an installed package does.",
}


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if a > 0 and b > 0 else "-"


def markdown_table(result: dict) -> str:
    """Per backbone: each run's peak above the floor, both ways, and the ratios to
    fine-tuning at batch 8 and at micro-batch 1."""
    lines = []
    if "bytecode" in result:
        code = result["bytecode"]
        lines += [_BYTECODE.get(code, f"da3's modules, by sitting: {code}."), ""]
    for backbone, _ in result["spec"]["backbones"]:
        rows = [r for r in result["rows"] if r["backbone"] == backbone]
        if not rows:
            continue
        ft = {r["micro_batch"]: r for r in rows if r["method"] == "finetune"}
        ft8 = ft.get(result["spec"]["batch_size"], {}).get("vmhwm_above_floor_bytes", 0)
        ft1 = ft.get(1, {}).get("vmhwm_above_floor_bytes", 0)
        floor = result["floors"][_floor_key(rows[0])]
        lines += [
            f"**{backbone}** ({rows[0]['weights']} weights), floor `import {floor['modules']}`: "
            f"{floor['vmhwm_bytes'] / MiB:.0f} MiB (VmHWM), {floor['wait4_bytes'] / MiB:.0f} MiB "
            "(wait4)",
            "",
            "| method | micro-batch | peak above floor (VmHWM) | finetune b8 / this | "
            "finetune mb1 / this | above floor (wait4) | frozen weights | trainable state | "
            "peak during | test top-1 |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            above = r["vmhwm_above_floor_bytes"]
            bits = r.get("frozen_bits", 32)
            notes = ([f"{bits}-bit frozen"] if bits != 32 else []) + r.get("settings", [])
            label = r["method"] + (f" ({', '.join(notes)})" if notes else "")
            lines.append(
                f"| {label} | {r['micro_batch']} | {above / MiB:.1f} MiB | "
                f"{_ratio(ft8, above)} | {_ratio(ft1, above)} | "
                f"{r['wait4_above_floor_bytes'] / MiB:.1f} MiB | "
                f"{r['frozen_weights_bytes'] / MiB:.1f} MiB | "
                f"{r['trainable_state_bytes'] / MiB:.1f} MiB | {r['peak_phase']} | "
                f"{r['test_accuracy']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)
