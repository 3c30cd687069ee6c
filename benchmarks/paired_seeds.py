"""One method against another, seed by seed, from a multi-seed ``da3 bench`` accuracy file
(or a ``benchmarks/sweep.py`` file, whose runs count as methods).

    python benchmarks/paired_seeds.py benchmarks/results/quick_10seeds/bench_quick_accuracy.json \\
        --base linear --other da3 --out paired_quick_10seeds

For every domain, over the seeds both methods ran: each method's mean test top-1, the mean of
the per-seed differences (other minus base, in points), its standard error, and on how many
seeds the other method was above, level with, or below the base. Both methods train on the same
data order and augmentation for a given seed, so the per-seed difference removes most of the
seed-to-seed spread that a comparison of means keeps. Writes benchmarks/results/<out>.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from da3.bench.common import header, run_info, save
from da3.io import read_json

RESULTS = Path(__file__).resolve().parent / "results"


def compare(records: list[dict], base: str, other: str, domain: str = "") -> list[dict]:
    """Per domain; a record without a domain (a sweep's) is on ``domain``, and its ``run``
    names its method."""
    acc: dict[tuple[str, str], dict[int, float]] = {}
    for r in records:
        key = (r.get("method", r.get("run")), r.get("domain", domain))
        acc.setdefault(key, {})[r["seed"]] = r["test_accuracy"]
    domains = list(dict.fromkeys(d for _, d in acc))
    rows = []
    for d in domains:
        a, b = acc.get((base, d), {}), acc.get((other, d), {})
        seeds = sorted(set(a) & set(b))
        if not seeds:
            continue
        diffs = [100 * (b[s] - a[s]) for s in seeds]
        rows.append(
            {
                "domain": d,
                "seeds": seeds,
                "base_mean": statistics.mean(a[s] for s in seeds),
                "other_mean": statistics.mean(b[s] for s in seeds),
                "diff_points": statistics.mean(diffs),
                "diff_stderr": statistics.stdev(diffs) / len(diffs) ** 0.5
                if len(diffs) > 1
                else None,
                "above": sum(x > 0 for x in diffs),
                "level": sum(x == 0 for x in diffs),
                "below": sum(x < 0 for x in diffs),
            }
        )
    return rows


def markdown(
    info: dict, source: str, base: str, other: str, rows: list[dict], configs: dict
) -> str:
    head = f"| domain | seeds | {base} | {other} | difference (points) |"
    lines = [head + f" {other} above / level / below |", "|---|---|---|---|---|---|"]
    for r in rows:
        se = f" ± {r['diff_stderr']:.2f}" if r["diff_stderr"] is not None else ""
        lines.append(
            f"| {r['domain']} | {len(r['seeds'])} | {r['base_mean']:.4f} | {r['other_mean']:.4f} | "
            f"{r['diff_points']:+.2f}{se} | {r['above']} / {r['level']} / {r['below']} |"
        )
    return (
        header(info, f"`{other}` against `{base}`, seed by seed")
        + f"From `{source}`. Difference: mean over the seeds of {other}'s test top-1 minus "
        f"{base}'s on the same seed, ± its standard error.\n\n"
        + "".join(f"- `{m}` config: `{c}`\n" for m, c in configs.items())
        + "\n"
        + "\n".join(lines)
        + "\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="a da3 bench accuracy JSON file")
    ap.add_argument("--base", default="linear")
    ap.add_argument("--other", default="da3")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    data = read_json(args.results)
    rows = compare(data["records"], args.base, args.other, data["protocol"].get("domain", ""))
    if not rows:
        raise SystemExit(f"{args.results}: no seed where both {args.base} and {args.other} ran")
    info = run_info()
    source = args.results.as_posix()
    configs = {
        m: next(r["config"] for r in data["records"] if r.get("method", r.get("run")) == m)
        for m in (args.base, args.other)
    }
    payload = {
        "info": info,
        "source": source,
        "protocol": data["protocol"],
        "configs": configs,
        "rows": rows,
    }
    save(RESULTS, args.out, payload, markdown(info, source, args.base, args.other, rows, configs))


if __name__ == "__main__":
    main()
