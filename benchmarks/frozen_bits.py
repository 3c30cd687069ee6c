"""Frozen weights in 32, 16 and 8 bits (issue #17): accuracy, memory, step time, export.

    python benchmarks/frozen_bits.py --stages accuracy --seeds 0      # paired, quick protocol
    python benchmarks/frozen_bits.py --stages memory,steptime,export,imagenet

Stages (each writes its part of benchmarks/results/frozen_bits.json as it ends; the others
are kept, so they can run in separate sittings; frozen_bits.md is rewritten from all of it):

* ``accuracy``: ``da3`` on the benchmark domains under the quick protocol of ``da3 bench``
  (EfficientNet-Lite0, 64 px, 3 epochs, batch 32), with the frozen weights in 32, 16 and 8
  bits, paired: the same seed, data order and initialisation for each precision, run one
  after the other. Resumable (a run already recorded is not redone).
* ``memory``: whole ``da3 train`` processes (da3.bench.process_memory: VmHWM above the floor
  of a bare ``import torch``), 224 px, batch 8: ``finetune``, and ``da3`` at 32 and 8 bits, on
  Lite0 and ResNet-50.
* ``steptime``: one process, ``da3`` at 32 and 8 bits taking turns step by step, 224 px,
  batch 8; the median step and the ratio.
* ``export``: a ``da3`` domain (digits, 64 px, 1 epoch, trained at 8 bits) exported to ONNX
  at 8 bits (int8 + DequantizeLinear) and at 32 bits, each checked against PyTorch at its own
  precision; file sizes and onnxruntime batch-1 latency (1 thread, the two taking turns).
* ``imagenet``: EfficientNet-Lite0 on the 20 ImageNet photos of foolbox, per precision:
  top-1/top-5 and the logits' agreement with float32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from da3.backbones import create_backbone
from da3.bench import process_memory as pm
from da3.bench.accuracy import train_one
from da3.bench.common import header, parse_seeds, run_info, save
from da3.bench.run import PRESETS
from da3.data import BENCHMARK_DOMAINS
from da3.io import read_json
from da3.methods import FrozenBackbone, build_model, make_config

NAME = "frozen_bits"
BITS = (32, 16, 8)
MiB = 2**20
STAGES = ("accuracy", "memory", "steptime", "export", "imagenet")


# ---------------------------------------------------------------------------------------
# accuracy


def stage_accuracy(old: dict, domains: list[str], seeds: list[int]) -> dict:
    protocol = dict(PRESETS["quick"]["accuracy"])
    part = old.get("accuracy", {})
    records = part.get("records", []) if part.get("protocol") == protocol else []
    done = {(r["domain"], r["seed"], r["frozen_bits"]) for r in records}
    frozen = {
        b: FrozenBackbone(
            create_backbone(protocol["backbone"], protocol["weights"]), "lean", frozen_bits=b
        )
        for b in BITS
    }
    for seed in seeds:
        for domain in domains:
            for bits in (32, 8, 16):  # 8 bits first after the reference: the main target
                if (domain, seed, bits) in done:
                    continue
                print(f"da3 on {domain}, seed {seed}, {bits}-bit frozen ...", end=" ", flush=True)
                rec, _ = train_one(frozen[bits], "da3", {}, domain, protocol, seed=seed)
                rec.pop("history")
                records.append({"domain": domain, "seed": seed, "frozen_bits": bits, **rec})
                print(f"test top-1 {rec['test_accuracy']:.4f} ({rec['train_seconds']:.0f} s)")
                yield {"protocol": protocol, "records": records}


def accuracy_md(part: dict) -> str:
    records = part["records"]
    by = {(r["domain"], r["seed"], r["frozen_bits"]): r["test_accuracy"] for r in records}
    domains = [d for d in BENCHMARK_DOMAINS if any(r["domain"] == d for r in records)]
    lines = [
        "## Accuracy: da3, quick protocol, paired by seed",
        "",
        "Protocol: " + ", ".join(f"{k}={v}" for k, v in part["protocol"].items()) + ".",
        "Test top-1 (%); the differences are paired (same seed), mean over the seeds run.",
        "",
        "| domain | seeds | 32-bit | 16-bit | 8-bit | 16 - 32 | 8 - 32 |",
        "|---|---|---|---|---|---|---|",
    ]
    means = {16: [], 8: []}
    for d in domains:
        seeds = sorted({s for dd, s, b in by if dd == d and all((d, s, x) in by for x in BITS)})
        if not seeds:
            continue
        acc = {b: statistics.mean(100 * by[(d, s, b)] for s in seeds) for b in BITS}
        diff = {
            b: statistics.mean(100 * (by[(d, s, b)] - by[(d, s, 32)]) for s in seeds)
            for b in (16, 8)
        }
        for b in (16, 8):
            means[b].append(diff[b])
        lines.append(
            f"| {d} | {','.join(map(str, seeds))} | {acc[32]:.2f} | {acc[16]:.2f} | "
            f"{acc[8]:.2f} | {diff[16]:+.2f} | {diff[8]:+.2f} |"
        )
    if means[8]:
        lines.append(
            f"| **mean of domains** | | | | | **{statistics.mean(means[16]):+.2f}** | "
            f"**{statistics.mean(means[8]):+.2f}** |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# memory of whole `da3 train` processes


def stage_memory(old: dict, backbones: list[str]) -> dict:
    spec = {**pm.SPEC, "backbones": [b for b in pm.SPEC["backbones"] if b[0] in backbones]}
    work = Path(tempfile.mkdtemp(prefix="da3-bits-memory-"))
    env = {**pm.os.environ, "DA3_CACHE_DIR": str(work / "cache")}
    folder = pm.make_folder(work / "clipart-folder", spec["per_class"])
    size = spec["image_size"]
    pm._run(
        [
            sys.executable,
            "-c",
            f"from da3.data import load_domain; load_domain({str(folder)!r}, {size})",
        ],
        env,
    )
    floors = {
        "torch": pm.measure_floor("torch"),
        "torch+torchvision": pm.measure_floor("torch, torchvision"),
    }
    print(f"floor: import torch {floors['torch']['vmhwm_bytes'] / MiB:.0f} MiB", flush=True)
    rows = []
    for backbone, weights in spec["backbones"]:
        floor = floors["torch" if backbone == "efficientnet_lite0" else "torch+torchvision"]
        for method, bits in (("finetune", 32), ("da3", 32), ("da3", 8)):
            run_spec = {**spec, "frozen_bits": bits}
            r = pm.train_run(folder, work / "store", run_spec, backbone, weights, method, 0, env)
            r |= pm.above_floor(r, floor, backbone, weights)
            rows.append(r)
            print(
                f"{backbone} {method} {bits}-bit: {r['vmhwm_above_floor_bytes'] / MiB:.1f} MiB "
                f"above the floor, frozen weights {r['frozen_weights_bytes'] / MiB:.1f} MiB",
                flush=True,
            )
    return {"spec": spec, "floors": floors, "rows": rows}


def memory_md(part: dict) -> str:
    lines = [
        "## Memory: whole `da3 train` processes, 224 px, batch 8, one epoch",
        "",
        "Peak resident memory (VmHWM, read by the run at its end) above the floor of a bare "
        "`import torch` (+torchvision for ResNet-50) measured in the same sitting "
        "(da3.bench.process_memory).",
        "",
        "| backbone | method | frozen bits | peak above floor | finetune / this | "
        "frozen weights | trainable state | peak during |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for backbone, _ in part["spec"]["backbones"]:
        rows = [r for r in part["rows"] if r["backbone"] == backbone]
        ft = next((r for r in rows if r["method"] == "finetune"), None)
        for r in rows:
            above = r["vmhwm_above_floor_bytes"]
            ratio = f"{ft['vmhwm_above_floor_bytes'] / above:.1f}x" if ft and above > 0 else "-"
            lines.append(
                f"| {backbone} | {r['method']} | {r['frozen_bits']} | {above / MiB:.1f} MiB | "
                f"{ratio} | {r['frozen_weights_bytes'] / MiB:.1f} MiB | "
                f"{r['trainable_state_bytes'] / MiB:.1f} MiB | {r['peak_phase']} |"
            )
    floors = part["floors"]
    lines += [
        "",
        f"Floors: `import torch` {floors['torch']['vmhwm_bytes'] / MiB:.0f} MiB, "
        f"`import torch, torchvision` {floors['torch+torchvision']['vmhwm_bytes'] / MiB:.0f} MiB "
        "(VmHWM).",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# step time


def stage_steptime(old: dict, backbones: list[str], steps: int) -> dict:
    from da3.train import make_optimizer, train_step

    rows = []
    for backbone, weights in pm.SPEC["backbones"]:
        if backbone not in backbones:
            continue
        models = {}
        for bits in (32, 8):
            frozen = FrozenBackbone(create_backbone(backbone, weights), "lean", frozen_bits=bits)
            torch.manual_seed(0)
            model = build_model("da3", frozen, 10, make_config("da3")).train()
            models[bits] = (model, make_optimizer(model, make_config("da3")), frozen)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 3, 224, 224, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        times = {32: [], 8: []}
        for i in range(steps + 1):  # the first round warms up
            for bits, (model, opt, _) in models.items():
                t0 = time.perf_counter()
                train_step(model, opt, x, y)
                if i:
                    times[bits].append(time.perf_counter() - t0)
        med = {b: statistics.median(t) for b, t in times.items()}
        rows.append(
            {
                "backbone": backbone,
                "steps": steps,
                "median_seconds": {str(b): v for b, v in med.items()},
                "all_seconds": {str(b): v for b, v in times.items()},
                "ratio_8_over_32": med[8] / med[32],
                "frozen_weight_bytes": {str(b): m[2].weight_bytes() for b, m in models.items()},
            }
        )
        print(f"{backbone}: 8-bit / 32-bit step time {med[8] / med[32]:.3f}", flush=True)
        del models
    return {"threads": torch.get_num_threads(), "rows": rows}


def steptime_md(part: dict) -> str:
    lines = [
        "## Step time: da3, 224 px, batch 8, 8-bit against 32-bit in one run",
        "",
        f"One process, {part['threads']} torch threads, the two models taking turns step by "
        "step on the same batch (forward, backward, AdamW step); median of the timed steps.",
        "",
        "| backbone | steps | 32-bit s | 8-bit s | 8 / 32 | frozen weights 32 / 8 |",
        "|---|---|---|---|---|---|",
    ]
    for r in part["rows"]:
        m, w = r["median_seconds"], r["frozen_weight_bytes"]
        lines.append(
            f"| {r['backbone']} | {r['steps']} | {m['32']:.3f} | {m['8']:.3f} | "
            f"{r['ratio_8_over_32']:.3f} | {w['32'] / MiB:.1f} / {w['8'] / MiB:.1f} MiB |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# export


def stage_export(old: dict, images: int) -> dict:
    from da3.data import load_domain
    from da3.domains import MultiDomainModel
    from da3.export.core import domain_metadata, export_model, open_runner

    protocol = {**PRESETS["quick"]["accuracy"], "epochs": 1}
    size = protocol["image_size"]
    frozen = {
        b: FrozenBackbone(create_backbone("efficientnet_lite0", "imagenet"), "lean", frozen_bits=b)
        for b in (8, 32)
    }
    _, model8 = train_one(frozen[8], "da3", {}, "digits", protocol)
    state = model8.domain_state()
    model32 = build_model("da3", frozen[32], 10, make_config("da3"))
    model32.load_domain_state(state)  # the same domain, its frozen weights in float32
    data = load_domain("digits", size)
    preprocess = frozen[8].preprocess
    samples = preprocess(data.test.images[: max(images, 8)])
    rows, runners = [], {}
    with tempfile.TemporaryDirectory(prefix="da3-bits-export-") as tmp:
        for bits, model in ((32, model32), (8, model8)):
            meta = domain_metadata(
                "digits",
                "da3",
                list(data.classes),
                size,
                preprocess.to_dict(),
                MultiDomainModel(frozen[bits]).backbone_record(),
            )
            path = Path(tmp) / f"digits-{bits}bit.onnx"
            r = export_model(model, path, "onnx", samples[:8], meta)
            import onnx

            proto = onnx.load(str(path))
            int8 = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8}
            dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
            runners[(bits, True)] = open_runner(path, "onnx", threads=1)
            if bits == 8:  # onnxruntime's default: DequantizeLinear run at every inference
                runners[(bits, False)] = open_runner(path, "onnx", 1, fold_dequantize=False)
            rows.append(
                {
                    "frozen_bits": bits,
                    "file_bytes": r.bytes,
                    "int8_weights": sum(1 for n in dq if n.input[0] in int8),
                    "int8_initializers": len(int8),  # weights and DequantizeLinear zero points
                    "dequantize_nodes": len(dq),
                    "max_abs_diff": r.comparison.max_abs_diff,
                    "top1_agree": f"{r.comparison.top1_agree}/{r.comparison.samples}",
                }
            )
        times = {k: [] for k in runners}
        warmup = 5
        for i in range(warmup + images):
            x = samples[i % len(samples)][None].contiguous()
            for b, run in runners.items():
                t0 = time.perf_counter()
                run(x)
                if i >= warmup:
                    times[b].append(time.perf_counter() - t0)
    for row in rows:
        row["median_ms"] = 1e3 * statistics.median(times[(row["frozen_bits"], True)])
        if (row["frozen_bits"], False) in times:
            row["median_ms_dequantize_each_run"] = 1e3 * statistics.median(
                times[(row["frozen_bits"], False)]
            )
    import onnxruntime

    return {
        "domain": "digits",
        "image_size": size,
        "images": images,
        "threads": 1,
        "onnxruntime": onnxruntime.__version__,
        "rows": rows,
    }


def export_md(part: dict) -> str:
    lines = [
        "## Export: ONNX at 8 bits (int8 + DequantizeLinear) beside float32",
        "",
        f"A da3 domain (digits, {part['image_size']} px, trained 1 epoch with 8-bit frozen "
        "weights; the 32-bit file holds the same domain over the float32 backbone). Each file "
        "is checked against PyTorch at its own precision before it is written; latency: "
        f"onnxruntime {part['onnxruntime']}, batch 1, {part['threads']} thread, median over "
        f"{part['images']} images, the sessions taking turns. onnxruntime's default runs the "
        "DequantizeLinear nodes at every inference; with `session.disable_quant_qdq=1` (what "
        "da3 opens its files with) it folds them into float weights once, at load.",
        "",
        "| frozen bits | file | int8 weights | DequantizeLinear | max abs diff vs PyTorch | "
        "same top-1 | batch-1 median (folded at load) | batch-1 median (ORT default) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in part["rows"]:
        each = r.get("median_ms_dequantize_each_run")
        if "int8_weights" not in r and r["frozen_bits"] == 8:  # a run from before both were timed
            each, r = r["median_ms"], {**r, "median_ms": float("nan")}
        lines.append(
            f"| {r['frozen_bits']} | {r['file_bytes'] / MiB:.2f} MiB | "
            f"{r.get('int8_weights', '-')} "
            f"| {r['dequantize_nodes']} | {r['max_abs_diff']:.1e} | {r['top1_agree']} | "
            f"{r['median_ms']:.2f} ms | {'-' if each is None else f'{each:.2f} ms'} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# ImageNet photos


def stage_imagenet(old: dict) -> dict:
    import importlib.util
    import re

    import numpy as np
    from PIL import Image

    from da3.lean import to_lean

    spec = importlib.util.find_spec("foolbox")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = sorted(folder.glob("imagenet_*.jpg"))
    images = torch.stack(
        [
            torch.from_numpy(
                np.array(Image.open(f).convert("RGB").resize((224, 224), Image.BILINEAR))
            ).permute(2, 0, 1)
            for f in files
        ]
    )
    labels = torch.tensor([int(re.search(r"_(\d+)\.jpg$", f.name).group(1)) for f in files])
    stock = create_backbone("efficientnet_lite0", "imagenet").eval()
    x = stock.preprocess(images)
    logits = {}
    with torch.no_grad():
        for bits in BITS:
            logits[bits] = to_lean(stock, frozen_bits=bits)(x)
    rows = []
    ref = logits[32]
    for bits in BITS:
        top5 = logits[bits].topk(5, dim=1).indices
        rows.append(
            {
                "frozen_bits": bits,
                "top1": int((top5[:, 0] == labels).sum()),
                "top5": int((top5 == labels[:, None]).any(1).sum()),
                "top1_same_as_32": int((top5[:, 0] == ref.argmax(1)).sum()),
                "max_abs_logit_diff": float((logits[bits] - ref).abs().max()),
                "logit_rel_diff": float((logits[bits] - ref).norm() / ref.norm()),
                "cosine_min": float(torch.nn.functional.cosine_similarity(logits[bits], ref).min()),
            }
        )
    return {"photos": len(files), "rows": rows}


def imagenet_md(part: dict) -> str:
    lines = [
        f"## EfficientNet-Lite0 on the {part['photos']} ImageNet photos (foolbox), per precision",
        "",
        "| frozen bits | top-1 | top-5 | top-1 as float32 | max abs logit diff | "
        "relative logit diff | min cosine |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in part["rows"]:
        lines.append(
            f"| {r['frozen_bits']} | {r['top1']}/{part['photos']} | {r['top5']}/{part['photos']} | "
            f"{r['top1_same_as_32']}/{part['photos']} | {r['max_abs_logit_diff']:.3g} | "
            f"{r['logit_rel_diff']:.2e} | {r['cosine_min']:.5f} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------


def write(results: Path, payload: dict) -> None:
    info = payload["info"]
    parts = [
        (k, fn)
        for k, fn in (
            ("accuracy", accuracy_md),
            ("memory", memory_md),
            ("steptime", steptime_md),
            ("export", export_md),
            ("imagenet", imagenet_md),
        )
        if k in payload
    ]
    runs = "".join(
        f"- {k}: `{payload['runs'][k]['command']}` at {payload['runs'][k]['commit']}, "
        f"{payload['runs'][k]['date']}, {payload['runs'][k]['seconds']} s\n"
        for k, _ in parts
        if k in payload.get("runs", {})
    )
    md = header(info, "Frozen weights in 32, 16 and 8 bits (#17)", runs)
    md += "\n".join(fn(payload[k]) for k, fn in parts)
    save(results, NAME, payload, md)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--domains", default=",".join(BENCHMARK_DOMAINS))
    p.add_argument("--seeds", default="0-2", help="A-B or a comma list (accuracy)")
    p.add_argument("--backbones", default="efficientnet_lite0,resnet50")
    p.add_argument("--steps", type=int, default=5, help="timed steps per precision")
    p.add_argument("--images", type=int, default=100, help="images timed (export)")
    p.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    for s in stages:
        if s not in STAGES:
            p.error(f"unknown stage {s!r}; choose from {', '.join(STAGES)}")
    path = args.results / f"{NAME}.json"
    payload = read_json(path) if path.is_file() else {}
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    for stage in stages:
        t0 = time.perf_counter()
        info = run_info("cpu")

        def record(part: dict, stage: str = stage, t0: float = t0, info: dict = info) -> None:
            # the file as it is now: another sitting may have written its stages meanwhile
            payload = read_json(path) if path.is_file() else {}
            payload["info"] = info
            payload[stage] = part
            payload.setdefault("runs", {})[stage] = {
                **{k: info[k] for k in ("command", "commit", "date")},
                "seconds": round(time.perf_counter() - t0, 1),
            }
            write(args.results, payload)

        if stage == "accuracy":
            domains = [d.strip() for d in args.domains.split(",") if d.strip()]
            for part in stage_accuracy(payload, domains, parse_seeds(args.seeds)):
                record(part)
        elif stage == "memory":
            record(stage_memory(payload, backbones))
        elif stage == "steptime":
            record(stage_steptime(payload, backbones, args.steps))
        elif stage == "export":
            record(stage_export(payload, args.images))
        elif stage == "imagenet":
            record(stage_imagenet(payload))


if __name__ == "__main__":
    main()
