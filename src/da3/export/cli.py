"""``da3 export`` and ``da3 bench-infer``.

da3 export --domain NAME --format onnx|torchscript [--gates on|off] [--out FILE] [--store DIR]
da3 bench-infer --domain NAME [--images 50] [--threads 1] [--json] [--store DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from da3.errors import Da3Error

DEFAULT_STORE = "da3-store"


def _common(p: argparse.ArgumentParser, samples: int, what: str) -> None:
    p.add_argument("--domain", required=True, help="a domain saved in the store")
    p.add_argument(
        "--store",
        default=os.environ.get("DA3_STORE", DEFAULT_STORE),
        help="folder of domain files (default: $DA3_STORE or ./da3-store)",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=samples,
        help=f"images of the domain's test split {what} (default {samples})",
    )


def register(commands) -> None:
    p = commands.add_parser(
        "export",
        help="write a domain as one ONNX or TorchScript file, checked against PyTorch",
        description="Export the frozen backbone with the domain's modules and head as one "
        "graph that takes a normalised float image batch and returns logits; the file is run "
        "(onnxruntime / torch.jit) on sample images and written only if its logits match "
        "PyTorch's (max abs difference < 1e-4, same top-1). A JSON sidecar FILE.json holds "
        "the classes, image size, mean/std, method and backbone fingerprint.",
    )
    _common(p, 16, "the export is checked on")
    p.add_argument("--format", required=True, help="onnx or torchscript (any case)")
    p.add_argument(
        "--gates",
        help="on: DA3's closed gates skip their branch (an If node / if per gated block; "
        "the default for a gated domain); off: every branch runs (no control flow)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="output file (default STORE/exports/NAME[.static][.8bit].onnx or .pt)",
    )
    p.add_argument(
        "--frozen-bits",
        dest="frozen_bits",
        help="the frozen backbone's weights in 32, 16 or 8 bits (default: the precision the "
        "domain was trained with); 8 writes int8 weights and DequantizeLinear nodes in ONNX, "
        "checked against PyTorch at 8 bits",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="absolute difference of the logits accepted (default 1e-4) ...",
    )
    p.add_argument(
        "--rtol",
        type=float,
        default=1e-5,
        help="... plus this times the largest |logit| on the samples (default 1e-5)",
    )
    p.set_defaults(run=run_export)

    p = commands.add_parser(
        "bench-infer",
        help="batch-1 inference latency of a domain: PyTorch, TorchScript, onnxruntime",
        description="Export the domain (gated and ungated) to TorchScript and ONNX in a "
        "temporary folder, then time batch-1 inference on images of its test split, the "
        "runtimes taking turns image by image; prints the median and the 10th/90th "
        "percentiles.",
    )
    _common(p, 50, "timed one at a time")
    p.add_argument("--threads", type=int, default=1, help="threads of every runtime (default 1)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run_bench_infer)


def load_for_export(
    store_dir: str | Path,
    name: str,
    samples: int,
    warn=None,
    noise: int = 4,
    frozen_bits: int | None = None,
):
    """(model, domain, metadata, normalised sample images) of a saved domain: the first
    images of the domain's test split, then ``noise`` random-pixel images (only random ones
    where the domain's data cannot be loaded here). ``frozen_bits``: the precision of the
    frozen weights (default: the one the domain was trained with)."""
    import torch

    from da3.domains import open_domain
    from da3.export.core import domain_metadata
    from da3.methods import get_method

    if samples < 2:
        raise Da3Error(f"--samples must be at least 2, got {samples}")
    model, store = open_domain(store_dir, name, frozen_bits=frozen_bits)
    note = model.precision_note(name)
    if note:
        print(note, file=sys.stderr)
    d = model.get(name)
    if model.frozen_bits != 32 and get_method(d.method).frozen_form != "lean":
        raise Da3Error(
            f"domain {name!r} ({d.method}) trained the backbone's own weights; they export in "
            "float32 (--frozen-bits applies to methods on the frozen backbone)"
        )
    meta = store.read_meta(name)
    metadata = domain_metadata(
        name,
        d.method,
        d.classes,
        d.image_size,
        model.preprocess.to_dict(),
        model.backbone_record(),
        source={
            "store": str(Path(store_dir).resolve()),
            "build_id": meta["build_id"],
            "metrics": d.metrics,
        },
    )
    g = torch.Generator().manual_seed(0)
    size = (samples, 3, d.image_size, d.image_size)
    random = torch.randint(0, 256, size, generator=g, dtype=torch.uint8)
    images = random
    if d.source:
        from da3.data import load_domain

        try:
            test = load_domain(d.source, d.image_size).test.images
            images = torch.cat([test[: max(0, samples - noise)], random[:noise]])
        except Da3Error as err:
            if warn:
                warn(f"note: {err}; using random images")
    return model, d, metadata, model.preprocess(images[:samples])


def _gate_mode(text: str | None, has_gates: bool, name: str) -> str:
    if text is None:
        return "dynamic" if has_gates else "static"
    if text not in ("on", "off"):
        raise Da3Error(f"--gates must be on or off, not {text!r}")
    if text == "on" and not has_gates:
        raise Da3Error(f"domain {name!r} has no gates (trained without gates=true); omit --gates")
    return "dynamic" if text == "on" else "static"


def run_export(args) -> int:
    import time

    from da3.domains import DomainStore
    from da3.export.core import SUFFIX, check_format, export_model, gated_block_count
    from da3.precision import frozen_bits_value

    fmt = check_format(args.format.lower())  # ONNX, onnx
    DomainStore(args.store).require(args.domain)
    if args.gates is not None:
        args.gates = args.gates.lower()
    if args.gates is not None and args.gates not in ("on", "off"):
        raise Da3Error(f"--gates must be on or off, not {args.gates!r}")
    if not 0 < args.tolerance < float("inf"):
        raise Da3Error(f"--tolerance must be positive, got {args.tolerance}")
    if not 0 <= args.rtol < float("inf"):
        raise Da3Error(f"--rtol must be zero or positive, got {args.rtol}")
    if args.out is not None and args.out.is_dir():
        raise Da3Error(f"--out {args.out}: is a folder; give a file name")

    def warn(msg: str) -> None:
        print(msg, file=sys.stderr)

    start = time.perf_counter()

    def step(msg: str) -> None:
        # on stdout, as training's lines are: stderr is for what went wrong
        print(f"  [{time.perf_counter() - start:4.0f}s] {msg}", flush=True)

    bits = frozen_bits_value(args.frozen_bits)
    step(f"loading domain {args.domain!r} and sample images")
    model, d, metadata, samples = load_for_export(
        args.store, args.domain, args.samples, warn, frozen_bits=bits
    )
    gates = _gate_mode(args.gates, bool(gated_block_count(d.model)), args.domain)
    out = args.out
    if out is None:
        tag = ".static" if args.gates == "off" else ""
        tag += f".{model.frozen_bits}bit" if model.frozen_bits != 32 else ""
        out = Path(args.store) / "exports" / f"{args.domain}{tag}{SUFFIX[fmt]}"
    r = export_model(
        d.model,
        out,
        fmt,
        samples,
        metadata,
        gates=gates,
        tolerance=args.tolerance,
        rtol=args.rtol,
        progress=step,
    )
    c = r.comparison
    print(
        f"exported {args.domain} ({d.method}, gates {r.gates}, "
        f"{model.frozen_bits}-bit frozen weights) to {r.path} "
        f"({r.bytes / 2**20:.1f} MiB, {r.seconds:.0f}s); checked on {c.samples} images: "
        f"max abs diff {c.max_abs_diff:.1e}, same top-1 {c.top1_agree}/{c.samples}"
    )
    print(f"metadata: {r.sidecar}")
    return 0


def run_bench_infer(args) -> int:
    import json

    from da3.export.bench import bench_infer, format_bench

    if args.threads < 1:
        raise Da3Error(f"--threads must be at least 1, got {args.threads}")

    def say(msg: str) -> None:
        if not args.json:
            print(f"  {msg}", file=sys.stderr)

    model, d, metadata, samples = load_for_export(
        args.store, args.domain, args.samples, say, noise=0
    )
    result = bench_infer(d.model, samples, metadata, threads=args.threads, progress=say)
    print(json.dumps(result, indent=1) if args.json else format_bench(result))
    return 0
