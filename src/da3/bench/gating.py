"""DA3's dynamic gates: inference FLOPs against accuracy, and batch-1 latency.

Per domain: the ungated ``da3`` domain (trained under the accuracy protocol); then, for each
FLOP target, gates switch on, the model starts from the ungated domain's tensors, and adaptor,
gates and head train together for ``gate_epochs`` more epochs with the budget loss. Accuracy is
on the test split; FLOPs per image are counted with ``torch.utils.flop_counter`` on the
executed graph of the whole test split (closed gates skip their branch, so they are not
counted); latency is the median wall time of batch-1 inference over test images.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from da3.bench.accuracy import train_one
from da3.data import load_domain
from da3.methods import FrozenBackbone


@torch.no_grad()
def executed_flops_per_image(model, images, preprocess, batch_size: int = 128) -> float:
    model.eval()
    counter = FlopCounterMode(display=False)
    device = next(model.parameters()).device
    with counter:
        for i in range(0, len(images), batch_size):
            model(preprocess(images[i : i + batch_size].to(device)))
    return counter.get_total_flops() / len(images)


@torch.no_grad()
def batch1_latency(model, images, preprocess, n: int, warmup: int = 3) -> float:
    """Median seconds of one forward of one image (``n`` timed, after ``warmup``)."""
    model.eval()
    device = next(model.parameters()).device
    times = []
    for i in range(n + warmup):
        x = preprocess(images[i % len(images)][None].to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_gating(
    frozen: FrozenBackbone,
    protocol: dict,
    domains: list[str],
    ungated: Callable[[str, object], tuple[dict, torch.nn.Module]],
    records: list[dict],
    *,
    device: str = "cpu",
    on_domain: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Append the rows of every domain not yet in ``records``; ``ungated(domain, data)``
    gives the ungated da3 domain's (record, model)."""
    pre = frozen.preprocess
    for d in domains:
        if any(r["domain"] == d for r in records):
            continue
        d0 = time.perf_counter()
        data = load_domain(d, protocol["image_size"])
        test = data.test
        n = protocol["latency_images"]
        base, model0 = ungated(d, data)
        rows = [
            {
                "domain": d,
                "gate_target": None,
                "test_accuracy": base["test_accuracy"],
                "flops_per_image": executed_flops_per_image(model0, test.images, pre),
                "latency_s": batch1_latency(model0, test.images, pre, n),
                "train_seconds": base["train_seconds"],
            }
        ]
        state = model0.domain_state()
        for t in protocol["targets"]:
            # from the ungated domain, gates added; the head is trained already: no warm-up
            overrides = {
                **protocol.get("overrides", {}).get("da3", {}),
                "gates": True,
                "gate_target": t,
                "head_warmup": 0.0,
                "head_warmup_steps": 0,
            }
            gate_protocol = {**protocol, "epochs": protocol["gate_epochs"]}
            s0 = time.perf_counter()
            rec, model = train_one(
                frozen,
                "da3",
                overrides,
                d,
                gate_protocol,
                seed=protocol["seed"] + 1,  # the gates' own random draws (their init has none)
                device=device,
                warm_start=state,
            )
            rows.append(
                {
                    "domain": d,
                    "gate_target": t,
                    "test_accuracy": rec["test_accuracy"],
                    "flops_per_image": executed_flops_per_image(model, test.images, pre),
                    "latency_s": batch1_latency(model, test.images, pre, n),
                    "train_seconds": time.perf_counter() - s0,
                }
            )
        rows[0]["wall_seconds"] = round(time.perf_counter() - d0, 1)  # the whole domain
        for r in rows:
            r["flops_fraction"] = r["flops_per_image"] / rows[0]["flops_per_image"]
            t = "off" if r["gate_target"] is None else f"{r['gate_target']:.2f}"
            print(
                f"  gating {d:10s} target {t}: top-1 {r['test_accuracy']:.4f}, FLOPs kept "
                f"{r['flops_fraction']:.3f}, batch-1 {r['latency_s'] * 1e3:.2f} ms",
                flush=True,
            )
        records += rows
        if on_domain:
            on_domain(records)
    return records


def summary(records: list[dict]) -> list[dict]:
    """Per gate setting: means over the domains (only settings every domain has)."""
    out = []
    domains = {r["domain"] for r in records}
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


def _setting(t) -> str:
    return "off" if t is None else f"{t:.2f}"


def markdown_table(records: list[dict]) -> str:
    lines = [
        "| domain | gates (FLOP target) | test top-1 | FLOPs / image (M) | FLOPs kept | "
        "batch-1 latency (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['domain']} | {_setting(r['gate_target'])} | {r['test_accuracy']:.4f} | "
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
        lines.append(
            f"| {_setting(s['gate_target'])} | {s['mean_accuracy']:.4f} | "
            f"{s['mean_flops_fraction']:.3f} | {s['mean_latency_s'] * 1e3:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
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
    ax.set_title("DA3 dynamic gating")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
