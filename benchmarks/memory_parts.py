"""What a lean training process holds above `import torch`, part by part (issues #16, #17).

    python benchmarks/memory_parts.py [--bits 8] [--backbones efficientnet_lite0,resnet50]

The whole-process figures (benchmarks/process_memory.py) give one number per run; this
script explains it. One fresh process per backbone builds what a `da3 train --method da3
--micro-batch 1` run builds (the lean backbone read a layer at a time, the domain, AdamW)
and reads its own memory between the steps a run takes:

* the resident size (``VmRSS``) after `import torch` (and torchvision for its backbones),
  after da3's modules, after the backbone and the domain;
* the first training step (224 px, a batch of 8 in micro-batches of 1): its peak above the
  size before it, and what it leaves behind, split by kind from ``/proc/self/smaps``: code
  and data of shared libraries paged in (file-backed), heap (small allocations), other
  anonymous memory (the gradients, AdamW's moments, large blocks);
* a later step and an evaluation pass (8 images, one at a time), each with the high-water
  mark reset before it (``/proc/self/clear_refs``), so its own transient peak is read; steps
  and evaluation run as ``da3 train --micro-batch 1`` runs them (from the build on: blocks
  of 32 KiB and more mapped alone, ``da3.memory.MEMORY_FIRST_MMAP_THRESHOLD``; PyTorch's own
  CPU kernels, not oneDNN's, ``da3.lean.ops.native_kernels``; the widest convolutions in
  slices of channels, ``da3.lean.ops.sliced_convolutions``), and what that costs in time is
  read last (steps as a whole batch's run takes them, oneDNN and whole convolutions, and as
  a micro-batch run does, interleaved);
* the run's environment is a memory-first run's (MKL's matrix-product workspaces freed
  after each call, ``da3.commands.no_blas_buffers``), and each micro-batch's images are
  turned into its input when it runs (a run reads them from the cache file then);
* da3's modules are compiled to bytecode first, as a pip-installed package has them; what
  `da3 train` imports is also read in a fresh process that compiles them from source;
* the training-curves plot (`da3.plots.plot_curves`: Pillow, imported here, and drawing);
* what the build adds and what the process holds between two steps, by the same kinds;
* in one more fresh process per backbone, whether the library code the build pages in is
  the steps' own: the code pages the build paged in are taken out of the resident set
  (``madvise``), two steps run, and the pages they bring back are counted.

Linux only. Writes benchmarks/results/memory_parts.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

MiB = 2**20
RESULTS = Path(__file__).resolve().parent / "results"


def status(key: str) -> int:
    # not da3.memory.process_memory_bytes: that module imports da3.lean, and the floor is
    # read before any da3 module is imported
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def smaps_by_kind() -> dict[str, int]:
    """Resident bytes by kind of mapping: file-backed (shared libraries' code and data),
    heap, other anonymous."""
    kinds = {"file": 0, "heap": 0, "anon": 0}
    kind = "anon"
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            parts = line.split()
            name = parts[5] if len(parts) > 5 else ""
            kind = "heap" if name == "[heap]" else "file" if name.startswith("/") else "anon"
        elif line.startswith("Rss:"):
            kinds[kind] += int(line.split()[1]) * 1024
    return kinds


def memory_first_env() -> dict[str, str]:
    """The environment a memory-first `da3 train` gives itself before torch loads
    (``da3.commands.no_blas_buffers``: MKL frees its workspaces after each call)."""
    from da3.commands import no_blas_buffers

    no_blas_buffers()
    return dict(os.environ)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (this process only)


def import_da3() -> None:
    """What ``da3 train`` imports before it starts."""
    import da3.commands  # noqa: F401
    import da3.training  # noqa: F401
    from da3.backbones import create_backbone  # noqa: F401
    from da3.domains import MultiDomainModel  # noqa: F401
    from da3.train import train_step  # noqa: F401


def imports_only() -> dict:
    """The resident size after `import torch` and after da3's imports, in this process."""
    import torch  # noqa: F401

    floor = status("VmRSS")
    import_da3()
    return {"imports_above_floor": status("VmRSS") - floor}


def build(backbone: str, bits: int, out: dict, before_build=None) -> SimpleNamespace:
    """In this (fresh) process: the floor, da3's imports, the lean backbone and a DA3 domain,
    as `da3 train --micro-batch 1` builds them; readings into ``out``. ``before_build`` is
    called just before the backbone is built. Returns what the steps need."""
    import torch

    if backbone != "efficientnet_lite0":
        import torchvision  # noqa: F401 - the floor a torchvision backbone needs
    out["floor"] = status("VmRSS")
    floor_kinds = smaps_by_kind()
    from da3.memory import MEMORY_FIRST_MMAP_THRESHOLD, lean_allocator, release_memory

    lean_allocator(MEMORY_FIRST_MMAP_THRESHOLD)  # as da3 train --micro-batch does
    import_da3()
    from da3.backbones import create_backbone
    from da3.domains import MultiDomainModel
    from da3.lean.ops import native_kernels, sliced_convolutions
    from da3.train import make_optimizer, train_step

    native = native_kernels()  # from the build on, as da3 train --micro-batch runs
    native.__enter__()

    out["imports"] = status("VmRSS")
    imports_kinds = smaps_by_kind()
    if before_build is not None:
        before_build()
    weights = "imagenet" if backbone == "efficientnet_lite0" else "none"
    model = MultiDomainModel(
        create_backbone(backbone, weights, lazy=True), "cpu", forms="lean", frozen_bits=bits
    )
    domain = model.add_domain("d", [f"c{i}" for i in range(15)], "da3", None, 224, seed=0)
    release_memory()
    out["built"] = status("VmRSS")
    built_kinds = smaps_by_kind()
    out["built_by_kind"] = {k: built_kinds[k] - imports_kinds[k] for k in built_kinds}
    out["frozen_weight_bytes"] = model.frozen.weight_bytes("lean")
    net = domain.model
    net.train()
    optimizer = make_optimizer(net, domain.config)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 224, 224), dtype=torch.uint8, generator=g)
    y = torch.arange(8) % 15

    def x(part: slice, model=model, images=images) -> torch.Tensor:
        return model.preprocess(images[part])  # as a run reads each micro-batch's images

    def step(net=net, optimizer=optimizer, x=x) -> None:
        with sliced_convolutions():  # as da3 train runs micro-batches
            train_step(net, optimizer, x, y, micro_batch=1)

    return SimpleNamespace(
        model=model,
        domain=domain,
        net=net,
        optimizer=optimizer,
        images=images,
        y=y,
        x=x,
        step=step,
        native=native,
        floor_kinds=floor_kinds,
    )


def one(backbone: str, bits: int) -> dict:
    """The measurements, in this (fresh) process."""
    out: dict = {"backbone": backbone, "frozen_bits": bits}
    run = build(backbone, bits, out)
    from da3.lean.ops import native_kernels, sliced_convolutions
    from da3.memory import release_memory
    from da3.train import evaluate, train_step

    model, domain, net, optimizer = run.model, run.domain, run.net, run.optimizer
    images, y, x, step, native = run.images, run.y, run.x, run.step, run.native
    release_memory()
    before, kinds = status("VmRSS"), smaps_by_kind()
    reset_peak()
    step()
    release_memory()
    after = smaps_by_kind()
    out["first_step"] = {
        "peak_above": status("VmHWM") - before,
        "left": status("VmRSS") - before,
        "left_by_kind": {k: after[k] - kinds[k] for k in kinds},
    }
    # what a run holds between steps (after the first), above the floor, by kind
    out["between_steps"] = status("VmRSS") - out["floor"]
    out["between_steps_by_kind"] = {k: after[k] - run.floor_kinds[k] for k in after}
    later = []
    for _ in range(3):
        release_memory()
        before = status("VmRSS")
        reset_peak()
        step()
        later.append(status("VmHWM") - before)
    out["later_step_peak_above"] = sorted(later)[1]  # the median of 3
    net.eval()
    release_memory()
    before = status("VmRSS")
    reset_peak()
    with sliced_convolutions():
        evaluate(net, images, y, model.preprocess, 1, "cpu")
    out["eval_peak_above"] = status("VmHWM") - before
    net.train()
    # what the memory-first kernels cost in time (last: oneDNN, once used, stays paged in):
    # steps as a whole batch's run takes them (whole convolutions, oneDNN) and as a
    # micro-batch run does (sliced, PyTorch's own kernels), interleaved, the median of 3
    native.__exit__(None, None, None)
    times: dict[str, list[float]] = {"whole": [], "sliced": []}
    for _ in range(3):
        for kind in times:
            t0 = time.perf_counter()
            if kind == "sliced":
                with native_kernels():
                    step()
            else:
                train_step(net, optimizer, x, y, micro_batch=1)
            times[kind].append(time.perf_counter() - t0)
    out["step_seconds"] = {k: sorted(v)[1] for k, v in times.items()}
    trainable = [p for p in net.parameters() if p.requires_grad]
    out["trainable_bytes"] = sum(p.numel() * p.element_size() for p in trainable)
    del net, domain, model, optimizer, x, step, run
    release_memory()
    from da3.plots import plot_curves

    history = [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1 / e}
        | {"train_accuracy": 0.5, "val_accuracy": 0.5}
        for e in (1, 2)
    ]
    before = status("VmRSS")
    reset_peak()
    with tempfile.TemporaryDirectory() as tmp:
        plot_curves(history, Path(tmp) / "curves.png", "d (da3)", 2, 0.5)
    out["plot_peak_above"] = status("VmHWM") - before
    return out


PAGE = os.sysconf("SC_PAGE_SIZE")  # /proc/self/pagemap has one 8-byte entry per page


def code_pages() -> set[int]:
    """Addresses of the resident pages of every file-backed executable mapping (shared
    libraries' machine code), from ``/proc/self/pagemap``'s present bit. Read with plain
    Python, so that reading it pages in no library code of its own."""
    pages: set[int] = set()
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and "x" in parts[1] and parts[5].startswith("/"):
            spans.append(tuple(int(v, 16) for v in parts[0].split("-")))
    with open("/proc/self/pagemap", "rb") as f:
        for start, end in spans:
            f.seek(start // PAGE * 8)
            high = f.read((end - start) // PAGE * 8)[7::8]  # each entry's top byte
            pages.update(start + i * PAGE for i, b in enumerate(high) if b & 0x80)
    return pages


def drop_pages(pages: set[int]) -> None:
    """Take ``pages`` (clean pages of file-backed mappings) out of the process's resident
    set (``madvise(MADV_DONTNEED)``): touched again, each is read back from the page cache."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    run_start = previous = None
    for page in sorted(pages) + [None]:
        if page is not None and previous is not None and page == previous + PAGE:
            previous = page
            continue
        if run_start is not None and libc.madvise(run_start, previous + PAGE - run_start, 4):
            raise OSError(ctypes.get_errno(), "madvise failed")
        run_start = previous = page


def code_again(backbone: str, bits: int) -> dict:
    """Whether the library code a build pages in is the training's own: build as a run
    does, drop the code pages the build paged in, take two steps, and count how many of the
    dropped pages the steps paged in again (in this fresh process)."""
    out: dict = {"backbone": backbone, "frozen_bits": bits}
    before: set[int] = set()
    run = build(backbone, bits, out, before_build=lambda: before.update(code_pages()))
    built = code_pages() - before
    drop_pages(built)
    out["build_code"] = len(built) * PAGE
    out["still_resident"] = len(built & code_pages()) * PAGE  # the drop took
    for _ in range(2):
        run.step()
    again = built & code_pages()
    out["paged_in_again"] = len(again) * PAGE
    out["steps_code"] = len(code_pages() - before) * PAGE  # all code the steps hold
    return out


def markdown(info: dict, rows: list[dict], imports: dict, code: list[dict] = ()) -> str:
    from da3.bench.common import header

    out = header(info, "What a lean training process holds, part by part")
    out += (
        "One fresh process per backbone: da3 (micro-batch 1 of a batch of 8, 224 px, AdamW), "
        "frozen weights in {bits} bits, built a layer at a time; run as `da3 train "
        "--micro-batch 1` runs (blocks of 32 KiB and more mapped alone, PyTorch's own CPU "
        "kernels, not oneDNN's, MKL's workspaces freed after each call, each micro-batch's "
        'input made when it runs). MiB; "above" = above the resident size just before the '
        "step.\n\n".format(bits=rows[0]["frozen_bits"])
    )
    out += (
        "| backbone | floor (import) | + da3 imports | + backbone, domain (frozen weights) | "
        "first step: peak above | first step leaves: code/data of libraries, heap, other | "
        "later step: peak above | eval, 1 image at a time: peak above | plot: peak above |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    for r in rows:
        f = r["first_step"]
        k = f["left_by_kind"]
        out += (
            f"| {r['backbone']} | {r['floor'] / MiB:.1f} | {(r['imports'] - r['floor']) / MiB:.1f} "
            f"| {(r['built'] - r['imports']) / MiB:.1f} ({r['frozen_weight_bytes'] / MiB:.1f}) | "
            f"{f['peak_above'] / MiB:.1f} | {k['file'] / MiB:.1f}, {k['heap'] / MiB:.1f}, "
            f"{k['anon'] / MiB:.1f} | {r['later_step_peak_above'] / MiB:.1f} | "
            f"{r['eval_peak_above'] / MiB:.1f} | {r['plot_peak_above'] / MiB:.1f} |\n"
        )
    out += (
        "\nA later step's time (median of 3, interleaved), as a whole batch's run takes it "
        "(oneDNN, whole convolutions) / as a micro-batch run does (PyTorch's kernels, sliced), "
        "both with MKL's workspaces freed: "
    ) + (
        ", ".join(
            f"{r['backbone']} {r['step_seconds']['whole']:.2f} s / "
            f"{r['step_seconds']['sliced']:.2f} s "
            f"({r['step_seconds']['sliced'] / r['step_seconds']['whole']:.2f}x)"
            for r in rows
        )
        + ".\n"
    )
    out += (
        f"\nda3's modules: {info['bytecode']} before the runs, as a pip-installed package has "
        "them. What `da3 train` imports, in a fresh process, above `import torch`: "
        f"{imports['compiled'] / MiB:.1f} MiB from compiled bytecode, "
        f"{imports['source'] / MiB:.1f} MiB compiled from source at the start (no bytecode "
        "folder, or `PYTHONDONTWRITEBYTECODE` with none written yet: the compiler's freed "
        "memory stays resident).\n"
    )
    out += (
        "\nBy kind of memory: what the build adds (above da3's imports), and what the "
        "process holds between two later steps (above the floor; a step's own peak comes on "
        "top), MiB:\n\n"
        "| backbone | build: libraries' code/data, heap, other (frozen weights) | "
        "between steps: total | libraries' code/data | heap | other |\n"
        "|---|---|---|---|---|---|\n"
    )
    for r in rows:
        b, k = r["built_by_kind"], r["between_steps_by_kind"]
        out += (
            f"| {r['backbone']} | {b['file'] / MiB:.1f}, {b['heap'] / MiB:.1f}, "
            f"{b['anon'] / MiB:.1f} ({r['frozen_weight_bytes'] / MiB:.1f}) | "
            f"{r['between_steps'] / MiB:.1f} | {k['file'] / MiB:.1f} | {k['heap'] / MiB:.1f} | "
            f"{k['anon'] / MiB:.1f} |\n"
        )
    if code:
        out += (
            "\nIs the libraries' code a build pages in the training's own? A fresh process "
            "builds as above, takes the code pages the build paged in out of its resident set "
            "(`madvise`), takes two steps and counts how many of them the steps paged in "
            "again: "
            + ", ".join(
                f"{c['backbone']} {c['paged_in_again'] / MiB:.1f} of "
                f"{c['build_code'] / MiB:.1f} MiB "
                f"({c['paged_in_again'] / max(c['build_code'], 1):.0%}; the steps hold "
                f"{c['steps_code'] / MiB:.1f} MiB of code above the floor)"
                for c in code
            )
            + ". That code is the machine code of the operations a step runs (each page "
            "mapped with its neighbours, as the kernel faults code in): it shrinks only with "
            "fewer distinct kernels.\n"
        )
    out += (
        "\nTrainable tensors (DA3's adaptors and head): "
        + ", ".join(f"{r['backbone']} {r['trainable_bytes'] / MiB:.1f} MiB" for r in rows)
        + " (gradients as much again, AdamW's moments twice).\n"
    )
    return out


def child(flag: str, backbone: str, bits: int) -> dict:
    """A fresh process's readings (``flag``: --one or --code-again), in a memory-first
    run's environment."""
    done = subprocess.run(
        [sys.executable, __file__, flag, backbone, "--bits", str(bits)],
        capture_output=True,
        text=True,
        check=True,
        env=memory_first_env(),
    )
    out = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=8, choices=(32, 16, 8))
    p.add_argument("--backbones", default="efficientnet_lite0,resnet50")
    p.add_argument("--one", help=argparse.SUPPRESS)  # the child: one backbone, JSON out
    p.add_argument("--imports-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--code-again", help=argparse.SUPPRESS)  # the child: one backbone
    args = p.parse_args()
    if args.imports_only:
        print(json.dumps(imports_only()))
        return
    if args.one:
        print(json.dumps(one(args.one, args.bits)))
        return
    if args.code_again:
        print(json.dumps(code_again(args.code_again, args.bits)))
        return
    from da3.bench.common import run_info, save
    from da3.bench.process_memory import compile_bytecode

    info = run_info("cpu")
    t0 = time.perf_counter()
    # da3's modules as an installed package has them (compiled), and what compiling them
    # from source at each start holds: a copy of the package with no bytecode folders,
    # imported with none written (as a source tree where PYTHONDONTWRITEBYTECODE is set)
    info["bytecode"] = "compiled" if compile_bytecode() else "compiled by each run"
    import shutil

    import da3

    with tempfile.TemporaryDirectory() as tree:
        shutil.copytree(
            Path(da3.__file__).parent,
            Path(tree) / "da3",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        source = {"PYTHONPATH": tree, "PYTHONDONTWRITEBYTECODE": "1"}
        imports = {
            kind: json.loads(
                subprocess.run(
                    [sys.executable, __file__, "--imports-only"],
                    capture_output=True,
                    text=True,
                    check=True,
                    env={**memory_first_env(), **extra},
                )
                .stdout.strip()
                .splitlines()[-1]
            )["imports_above_floor"]
            for kind, extra in (("compiled", {}), ("source", source))
        }
    backbones = args.backbones.split(",")
    rows = [child("--one", b, args.bits) for b in backbones]
    code = [child("--code-again", b, args.bits) for b in backbones]
    info["stage_seconds"] = {"memory_parts": round(time.perf_counter() - t0, 1)}
    result = {"info": info, "imports": imports, "rows": rows, "code_again": code}
    save(RESULTS, "memory_parts", result, markdown(info, rows, imports, code))


if __name__ == "__main__":
    main()
