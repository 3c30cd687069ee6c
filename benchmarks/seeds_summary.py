"""Mean and spread of test top-1 over seeds, from accuracy.py result files.

    python benchmarks/seeds_summary.py accuracy accuracy_seed1 accuracy_seed2

Writes benchmarks/results/seeds_summary.md: per method and domain, the mean over the files
(one seed each, same protocol otherwise) and the min-max range.
"""

from __future__ import annotations

import statistics
import sys

from common import RESULTS, header, run_info
from da3.io import read_json


def main() -> None:
    names = sys.argv[1:] or ["accuracy", "accuracy_seed1", "accuracy_seed2"]
    runs = [read_json(RESULTS / f"{n}.json") for n in names]
    acc: dict[tuple[str, str], list[float]] = {}
    for run in runs:
        for r in run["records"]:
            acc.setdefault((r["method"], r["domain"]), []).append(r["test_accuracy"])
    methods = list(dict.fromkeys(m for m, _ in acc))
    domains = list(dict.fromkeys(d for _, d in acc))
    seeds = [run["protocol"]["seed"] for run in runs]
    lines = ["| method | " + " | ".join(domains) + " | mean |", "|---" * (len(domains) + 2) + "|"]
    for m in methods:
        cells, means = [], []
        for d in domains:
            v = acc.get((m, d), [])
            if len(v) == len(runs):
                means.append(statistics.mean(v))
                cells.append(f"{statistics.mean(v):.4f} ({min(v):.3f}-{max(v):.3f})")
            else:
                cells.append("-")
        mean = f"{statistics.mean(means):.4f}" if len(means) == len(domains) else "-"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {mean} |")
    text = (
        header(run_info(), f"Test top-1 over seeds {seeds}")
        + f"From {', '.join(n + '.json' for n in names)}: mean (min-max) over the seeds.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    (RESULTS / "seeds_summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
