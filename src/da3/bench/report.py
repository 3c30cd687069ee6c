"""The benchmark report: ``docs/benchmark.md`` and its plots, from the raw results.

Everything between the two marker lines of the report is generated; text outside them (the
discussion) is kept as it is when the report is written again.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from da3.bench import gating as gating_mod
from da3.bench.common import commits_line, header
from da3.io import read_json, write_text

BEGIN = "<!-- da3 bench: generated from benchmarks/results; edit outside these markers -->"
END = "<!-- da3 bench: end of generated part -->"
MIB = 2**20
REPORT_ORDER = (
    "finetune",
    "linear",
    "bias",
    "tinytl",
    "piggyback",
    "series_adapter",
    "parallel_adapter",
    "udta",
    "da3",
)
TAGS = {
    "quick": "`da3 bench --quick`",
    "full": "`da3 bench --full`",
    "custom": "`da3 bench` with method overrides (`--set`)",
}


def _mean_by(records: list[dict]) -> dict[tuple[str, str], list[float]]:
    out: dict[tuple[str, str], list[float]] = {}
    for r in records:
        out.setdefault((r["method"], r["domain"]), []).append(r["test_accuracy"])
    return out


def _methods(records: list[dict]) -> list[str]:
    """The methods of ``records``: references, baselines, then da3 (others after)."""
    from da3.methods import list_methods

    known = [m for m in REPORT_ORDER if m in list_methods()]
    order = {m: i for i, m in enumerate(known + [m for m in list_methods() if m not in known])}
    found = dict.fromkeys(r["method"] for r in records)
    return sorted(found, key=lambda m: order.get(m, len(order)))


def _domains(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["domain"] for r in records))


def mean_accuracy(records: list[dict]) -> dict[str, float]:
    """Mean test top-1 per method over the domains (each domain's mean over seeds); only
    methods that have every domain."""
    by, domains = _mean_by(records), _domains(records)
    out = {}
    for m in _methods(records):
        if all((m, d) in by for d in domains):
            out[m] = statistics.mean(statistics.mean(by[(m, d)]) for d in domains)
    return out


def accuracy_table(records: list[dict]) -> str:
    by, domains = _mean_by(records), _domains(records)
    means = mean_accuracy(records)
    seeds = sorted({r["seed"] for r in records})
    lines = [
        "| method | " + " | ".join(domains) + " | mean |",
        "|---" * (len(domains) + 2) + "|",
    ]
    for m in _methods(records):
        cells = [f"{statistics.mean(by[(m, d)]):.3f}" if (m, d) in by else "-" for d in domains]
        mean = f"**{means[m]:.3f}**" if m in means else "-"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {mean} |")
    note = f"Test top-1; mean over seeds {seeds}." if len(seeds) > 1 else "Test top-1."
    return "\n".join(lines) + f"\n\n{note}\n"


def _rows(profile: dict) -> dict[str, dict]:
    return {r["method"]: r for r in profile["rows"]}


def methods_table(records: list[dict], profile: dict | None) -> str:
    """One row per method: accuracy, what it stores, and what a training step costs at the
    benchmark's own settings."""
    means = mean_accuracy(records)
    rows = _rows(profile) if profile else {}
    ref = means.get("da3")
    states: dict[str, list[int]] = {}
    params: dict[str, int] = {}
    for r in records:
        states.setdefault(r["method"], []).append(r["domain_state_bytes"])
        params[r["method"]] = r["trainable_parameters"]
    lines = [
        "| method | mean top-1 | vs da3 (points) | trainable params (mean) | domain file KiB "
        "(mean) | kept for backward MiB | peak MiB | step s | inference GFLOPs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in _methods(records):
        acc = f"{means[m]:.3f}" if m in means else "-"
        diff = f"{100 * (means[m] - ref):+.1f}" if m in means and ref is not None else "-"
        p = rows.get(m)
        prof = (
            [
                f"{p['saved_activation_bytes'] / MIB:.2f}",
                f"{p['peak_memory_bytes'] / MIB:.1f}" if p.get("peak_memory_bytes") else "-",
                f"{p['step_seconds']:.3f}",
                f"{p['inference_flops'] / 1e9:.3f}",
            ]
            if p
            else ["-"] * 4
        )
        trainable = f"{p['trainable_parameters']:,}" if p else f"{params[m]:,}"
        kib = f"{statistics.mean(states[m]) / 1024:,.0f}"
        lines.append(f"| {m} | {acc} | {diff} | {trainable} | {kib} | " + " | ".join(prof) + " |")
    return "\n".join(lines) + "\n"


def ratio_table(profile: dict) -> str:
    """Each baseline's cost divided by da3's (> 1: da3 uses less)."""
    rows = _rows(profile)
    d = rows.get("da3")
    lines = [
        "| method | kept for backward MiB | peak MiB | step s | kept ÷ da3 | peak ÷ da3 | "
        "step ÷ da3 |",
        "|---|---|---|---|---|---|---|",
    ]

    def ratio(r, key):
        a, b = r.get(key), d.get(key) if d else None
        if not (a and b):
            return "-"
        return f"{a / b:.1f}×" if a >= b else f"{a / b:.2g}×"

    for m in _methods(profile["rows"]):
        r = rows[m]
        peak = r.get("peak_memory_bytes")
        lines.append(
            f"| {m} | {r['saved_activation_bytes'] / MIB:.2f} | "
            f"{'-' if peak is None else f'{peak / MIB:.1f}'} | {r['step_seconds']:.3f} | "
            f"{ratio(r, 'saved_activation_bytes')} | {ratio(r, 'peak_memory_bytes')} | "
            f"{ratio(r, 'step_seconds')} |"
        )
    return "\n".join(lines) + "\n"


def plot_accuracy_memory(records: list[dict], profile: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means, rows = mean_accuracy(records), _rows(profile)
    keys = [("saved_activation_bytes", "kept for backward (MiB)")]
    if all(r.get("peak_memory_bytes") for r in rows.values()):
        keys.append(("peak_memory_bytes", "peak memory of a training step (MiB)"))
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys, strict=True):
        for m, r in rows.items():
            if m not in means:
                continue
            x = max(r[key] / MIB, 1e-3)  # linear keeps ~nothing; keep it on a log axis
            ax.scatter(x, means[m], s=60 if m == "da3" else 35, c="C3" if m == "da3" else "C0")
            ax.annotate(m, (x, means[m]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(label + ", log scale")
        ax.set_ylabel("mean test top-1")
        ax.grid(alpha=0.3, which="both")
    p = next(iter(rows.values()))
    fig.suptitle(
        f"accuracy vs training memory ({p['backbone']}, {p['image_size']} px, "
        f"batch {p['batch_size']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_domains(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by, domains, methods = _mean_by(records), _domains(records), _methods(records)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(domains)), 4))
    for i, m in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(domains))]
        ys = [statistics.mean(by[(m, d)]) if (m, d) in by else 0 for d in domains]
        ax.bar(xs, ys, width, label=m, edgecolor="black" if m == "da3" else None)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("test top-1")
    ax.set_ylim(0, 1)
    ax.legend(
        fontsize=7, ncol=min(len(methods), 5), loc="upper center", bbox_to_anchor=(0.5, -0.08)
    )
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _info_line(info: dict, wall_seconds: float | None = None) -> str:
    wall = f"; wall time {wall_seconds / 60:.1f} min" if wall_seconds else ""
    if wall_seconds and info.get("parallel_jobs"):
        wall += f" summed over {info['parallel_jobs']} jobs run in parallel"
    return (
        f"commit {info['commit']}, da3 {info['da3']}, torch {info['torch']}, Python "
        f"{info['python']}; {info['machine']} ({info.get('device', 'cpu')}); {info['date']}" + wall
    )


def _wall(records: list[dict]) -> float:
    """Seconds the records cost, summed (so a resumed run counts every part)."""
    return sum(r.get("wall_seconds") or 0.0 for r in records)


def _link(target: Path, report: Path) -> str:
    return os.path.relpath(target, report.parent)


def _section(tag: str, results: Path, report: Path) -> str | None:
    acc_path = results / f"bench_{tag}_accuracy.json"
    if not acc_path.is_file():
        return None
    acc = read_json(acc_path)
    records, proto = acc["records"], acc["protocol"]
    profiles = sorted(results.glob(f"bench_{tag}_profile_*.json"))
    profs = [read_json(p) for p in profiles]
    own = next(
        (
            p
            for p in profs
            if p["spec"]["backbone"] == proto["backbone"]
            and p["spec"]["image_size"] == proto["image_size"]
            and p["spec"]["batch_size"] == proto["batch_size"]
        ),
        None,
    )
    out = [f"## {TAGS.get(tag, tag)}", ""]
    walls = {"accuracy": _wall(records)}
    out.append(f"- accuracy run: {_info_line(acc['info'], walls['accuracy'])}")
    if line := commits_line(acc["info"], records):
        out.append(line.rstrip("\n"))
    out.append(
        f"- protocol: {proto['backbone']} ({proto['weights']}) frozen where the method says so; "
        f"{proto['image_size']} px; {proto['epochs']} epochs of batch {proto['batch_size']}; "
        f"AdamW with each method's default learning rates (below), cosine decay to zero; "
        f"random translations {'on' if proto.get('augment', True) else 'off'}; best validation "
        f"epoch evaluated on the test split; seeds {sorted({r['seed'] for r in records})}"
        + (f"; overrides {proto['overrides']}" if proto.get("overrides") else "")
        + "."
    )
    lrs = {}
    for r in records:
        c = r["config"]
        lrs[r["method"]] = f"{r['method']} lr {c['lr']:g}, head {c.get('head_lr') or c['lr']:g}"
    out.append("- learning rates: " + "; ".join(lrs.values()) + ".")
    out += ["", "### Every method side by side", ""]
    if own:
        s = own["spec"]
        out.append(
            f"Accuracy: mean test top-1 over the domains. Cost of one training step at the "
            f"benchmark's own settings ({s['backbone']}, {s['image_size']} px, batch "
            f"{s['batch_size']}, {own['info']['machine']}, median of {s['steps']} steps, "
            f"methods interleaved): bytes kept for backward, peak memory of the step in a "
            f"fresh process, step time. Domain file: the tensors one domain stores."
        )
    tables = [methods_table(records, own), "### Per domain", "", accuracy_table(records)]
    # the same tables as a results file of their own (one table of every method)
    intro = [line for line in out[2:] if line.startswith("- ") or line.startswith("Accuracy:")]
    write_text(
        results / f"bench_{tag}_methods.md",
        header(acc["info"], f"Every method side by side ({TAGS.get(tag, tag)})")
        + "\n".join(intro)
        + "\n\n"
        + "\n".join(tables),
    )
    out += ["", *tables]
    plots = []
    if own:
        png = results / f"bench_{tag}_accuracy_memory.png"
        plot_accuracy_memory(records, own, png)
        plots.append(f"![accuracy against training memory]({_link(png, report)})")
    png = results / f"bench_{tag}_domains.png"
    plot_domains(records, png)
    plots.append(f"![per-domain accuracy]({_link(png, report)})")
    out += ["\n\n".join(plots), ""]
    for p in profs:
        s = p["spec"]
        out += [
            f"### Training cost: {s['backbone']} ({s['weights']}), {s['image_size']} px, "
            f"batch {s['batch_size']}",
            "",
            f"{_info_line(p['info'], p['info']['stage_seconds']['profile'])}; median of "
            f"{s['steps']} steps; "
            f"raw: `{_link(results / (p['name'] + '.json'), report)}`.",
            "",
            ratio_table(p),
        ]
    gpath = results / f"bench_{tag}_gating.json"
    if gpath.is_file():
        g = read_json(gpath)
        gp = g["protocol"]
        walls["gating"] = _wall(g["records"])
        out += [
            "### DA3 dynamic gating",
            "",
            f"{_info_line(g['info'], walls['gating'])}. Each FLOP target: gates on, started "
            f"from the ungated domain, {gp['gate_epochs']} more epochs; FLOPs counted on the "
            f"executed graph of the test split; batch-1 latency median over "
            f"{gp['latency_images']} images.",
            "",
            gating_mod.markdown_table(g["records"]),
            f"![gating curve]({_link(results / f'bench_{tag}_gating.png', report)})",
            "",
        ]
    mpath = results / f"bench_{tag}_memory.json"
    if mpath.is_file():
        from da3.bench.process_memory import markdown_table as memory_table

        m = read_json(mpath)
        walls["memory"] = m["info"]["stage_seconds"]["memory"]
        s = m["spec"]
        out += [
            "### The memory a device sees: whole training processes",
            "",
            f"{_info_line(m['info'], walls['memory'])}. One fresh `da3 train` process per "
            f"row: a folder of {m['folder']}, {s['image_size']} px, batch {s['batch_size']}, "
            f"{s['epochs']} epoch; peak resident memory above the floor of the runtime it "
            "needs, read by the run at its end (VmHWM) and by the parent when it ended "
            "(wait4, as `/usr/bin/time -f %M`; it includes the CUDA build's ~120 MiB of "
            f"library pages touched while the interpreter shuts down); raw: "
            f"`{_link(mpath, report)}`.",
            "",
            memory_table(m),
        ]
    walls["profiles"] = sum(p["info"]["stage_seconds"]["profile"] for p in profs)
    total = sum(walls.values())
    parts = ", ".join(f"{k} {v / 60:.1f}" for k, v in walls.items())
    jobs = acc["info"].get("parallel_jobs")
    if jobs:  # merged from jobs run side by side: their times add up to more than the wall
        parts += f" min; accuracy summed over {jobs} jobs run in parallel"
        out.insert(2, f"- whole run: {total / 60:.1f} min of job time ({parts}).")
    else:
        out.insert(2, f"- whole run: {total / 60:.1f} min of wall time ({parts} min).")
    return "\n".join(out)


def write_report(report: Path, results: Path) -> None:
    """Write the generated part of ``report`` from ``results``; keep the rest of the file."""
    report, results = Path(report), Path(results)
    sections = [s for tag in TAGS if (s := _section(tag, results, report))]
    body = "\n".join([BEGIN, "", *sections, END])
    before, after = "# Benchmark: every method side by side\n\n", "\n"
    if report.is_file():
        text = report.read_text()
        if BEGIN in text and END in text:
            before = text[: text.index(BEGIN)]
            after = text[text.index(END) + len(END) :]
        else:  # a hand-written page without a generated part yet: append it
            before = text.rstrip("\n") + "\n\n"
    write_text(report, before + body + after)
    print(f"wrote {report}", flush=True)
