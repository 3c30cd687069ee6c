"""DA3's dynamic gates: inference FLOPs against accuracy, and batch-1 latency.

    python benchmarks/gating.py [--domains ...] [--targets 0.8,0.65,0.55] [--gate-epochs 2]

Per domain, under the protocol of benchmarks/accuracy.py: train `da3` without gates; then, for
each FLOP target, switch gates on, start from the ungated domain's tensors, and train adaptor,
gates and head together for ``--gate-epochs`` more epochs with the budget loss. Accuracy is on
the test split; FLOPs per image are counted with torch.utils.flop_counter on the executed graph
of the whole test split (closed gates skip their branch, so they are not counted); latency is the
median wall time of batch-1 inference over ``--latency-images`` test images.

Writes benchmarks/results/<out>.{json,md} and <out>.png.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from accuracy import train_one
from common import RESULTS, header, run_info, save
from da3.backbones import create_backbone
from da3.data import BENCHMARK_DOMAINS, load_domain
from da3.io import read_json
from da3.methods import FrozenBackbone, build_model, make_config
from da3.train import TrainConfig, evaluate, fit_domain


@torch.no_grad()
def executed_flops_per_image(model, images, preprocess, batch_size=128) -> float:
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        for i in range(0, len(images), batch_size):
            model(preprocess(images[i : i + batch_size]))
    return counter.get_total_flops() / len(images)


@torch.no_grad()
def batch1_latency(model, images, preprocess, n: int) -> float:
    model.eval()
    times = []
    for i in range(n + 3):
        x = preprocess(images[i % len(images)][None])
        t0 = time.perf_counter()
        model(x)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ungated_da3(frozen, data, protocol, domain):
    """The ungated da3 domain: the one benchmarks/accuracy.py trained under the same
    protocol when its tensors are cached, else trained here."""
    from accuracy import STATES
    from da3.io import read_tensors

    path = STATES / f"accuracy-da3-{domain}.safetensors"
    acc = RESULTS / "accuracy.json"
    same = {k: protocol[k] for k in ("image_size", "epochs", "batch_size", "seed")}
    if path.is_file() and acc.is_file():
        old = read_json(acc)
        rec = next(
            (r for r in old["records"] if r["method"] == "da3" and r["domain"] == domain), None
        )
        if rec and all(old["protocol"].get(k) == v for k, v in same.items()):
            model = build_model("da3", frozen, len(data.classes), make_config("da3"))
            model.load_domain_state(read_tensors(path))
            return rec, model
    return train_one(frozen, "da3", {}, data, protocol)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", default=",".join(BENCHMARK_DOMAINS))
    ap.add_argument("--targets", default="0.8,0.65,0.55")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--gate-epochs", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--latency-images", type=int, default=100)
    ap.add_argument("--out", default="gating")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    targets = [float(t) for t in args.targets.split(",")]
    protocol = {
        "backbone": "efficientnet_lite0 (imagenet)",
        "image_size": args.image_size,
        "epochs": args.epochs,
        "gate_epochs": args.gate_epochs,
        "batch_size": 32,
        "seed": 0,
        "targets": targets,
    }
    path = RESULTS / f"{args.out}.json"
    records = []
    if path.is_file() and read_json(path).get("protocol") == protocol:
        records = read_json(path)["records"]
    info = run_info()
    info["threads"] = torch.get_num_threads()
    frozen = FrozenBackbone(create_backbone("efficientnet_lite0", "imagenet"))
    pre = frozen.stock.preprocess
    t0 = time.perf_counter()
    for d in args.domains.split(","):
        if any(r["domain"] == d for r in records):
            continue
        data = load_domain(d, args.image_size)
        test = data.test
        base, ungated = ungated_da3(frozen, data, protocol, d)
        rows = [
            {
                "domain": d,
                "gate_target": None,
                "test_accuracy": base["test_accuracy"],
                "flops_per_image": executed_flops_per_image(ungated, test.images, pre),
                "latency_s": batch1_latency(ungated, test.images, pre, args.latency_images),
                "train_seconds": base["train_seconds"],
            }
        ]
        state = ungated.domain_state()
        for t in targets:
            config = make_config("da3", {"gates": True, "gate_target": t})
            torch.manual_seed(0)
            model = build_model("da3", frozen, len(data.classes), config)
            model.load_domain_state(state, strict=False)
            tc = TrainConfig(epochs=args.gate_epochs, batch_size=32, seed=1)
            s0 = time.perf_counter()
            result = fit_domain(
                model,
                data,
                pre,
                config,
                tc,
                progress=False,
            )
            model.load_domain_state(result.best_state)
            rows.append(
                {
                    "domain": d,
                    "gate_target": t,
                    "test_accuracy": evaluate(model, test.images, test.labels, pre)["accuracy"],
                    "flops_per_image": executed_flops_per_image(model, test.images, pre),
                    "latency_s": batch1_latency(model, test.images, pre, args.latency_images),
                    "train_seconds": time.perf_counter() - s0,
                }
            )
        for r in rows:
            r["flops_fraction"] = r["flops_per_image"] / rows[0]["flops_per_image"]
            print(
                f"{d:10s} target {r['gate_target']}: acc {r['test_accuracy']:.4f}, "
                f"FLOPs {r['flops_fraction']:.3f}, batch-1 {r['latency_s'] * 1e3:.2f} ms",
                flush=True,
            )
        records += rows
        info["wall_seconds"] = round(time.perf_counter() - t0, 1)
        save(
            args.out,
            {"info": info, "protocol": protocol, "records": records},
            markdown(info, protocol, records),
        )
        plot(records, RESULTS / f"{args.out}.png")


def summary(records: list[dict]) -> list[dict]:
    """Per gate setting: mean accuracy and mean FLOPs fraction over the domains."""
    out = []
    domains = sorted({r["domain"] for r in records})
    for t in dict.fromkeys(r["gate_target"] for r in records):
        rs = [r for r in records if r["gate_target"] == t]
        if len(rs) != len(domains):
            continue
        out.append(
            {
                "gate_target": t,
                "mean_accuracy": statistics.mean(r["test_accuracy"] for r in rs),
                "mean_flops_fraction": statistics.mean(r["flops_fraction"] for r in rs),
                "mean_latency_s": statistics.mean(r["latency_s"] for r in rs),
            }
        )
    return out


def markdown(info, protocol, records) -> str:
    lines = [
        "| domain | gates (FLOP target) | test top-1 | FLOPs / image (M) | FLOPs kept | "
        "batch-1 latency (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        t = "off" if r["gate_target"] is None else f"{r['gate_target']:.2f}"
        lines.append(
            f"| {r['domain']} | {t} | {r['test_accuracy']:.4f} | "
            f"{r['flops_per_image'] / 1e6:.1f} | {r['flops_fraction']:.3f} | "
            f"{r['latency_s'] * 1e3:.2f} |"
        )
    lines += [
        "",
        "Mean over the domains:",
        "",
        "| gates | mean test top-1 | mean FLOPs kept | mean batch-1 latency (ms) |",
        "|---|---|---|---|",
    ]
    for s in summary(records):
        t = "off" if s["gate_target"] is None else f"{s['gate_target']:.2f}"
        lines.append(
            f"| {t} | {s['mean_accuracy']:.4f} | {s['mean_flops_fraction']:.3f} | "
            f"{s['mean_latency_s'] * 1e3:.2f} |"
        )
    proto = ", ".join(f"{k}={v}" for k, v in protocol.items())
    return (
        header(info, "DA3 dynamic gating: FLOPs against accuracy")
        + f"Protocol: {proto}. See the docstring of benchmarks/gating.py.\n\n"
        + "\n".join(lines)
        + "\n\n![gating curve](gating.png)\n"
    )


def plot(records, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for d in sorted({r["domain"] for r in records}):
        rs = sorted((r for r in records if r["domain"] == d), key=lambda r: r["flops_fraction"])
        ax.plot([r["flops_fraction"] for r in rs], [r["test_accuracy"] for r in rs], "o-", label=d)
    s = sorted(summary(records), key=lambda r: r["mean_flops_fraction"])
    if s:
        ax.plot(
            [r["mean_flops_fraction"] for r in s],
            [r["mean_accuracy"] for r in s],
            "k*-",
            ms=10,
            label="mean",
        )
    ax.set_xlabel("inference FLOPs kept (executed graph, fraction of ungated)")
    ax.set_ylabel("test top-1")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
