"""Merge the accuracy results of ``da3 bench`` jobs run separately (benchmarks/bench_jobs.sh)
into benchmarks/results, then rewrite docs/benchmark.md.

    python benchmarks/merge_bench.py --tag full JOB_FOLDER...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from da3.bench.merge import merge_accuracy
from da3.bench.report import write_report
from da3.errors import Da3Error

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="+", type=Path, help="results folders of the jobs")
    ap.add_argument("--tag", default="full", help="the bench preset the jobs ran (default full)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument(
        "--report",
        type=Path,
        help="report to rewrite (default: docs/benchmark.md for benchmarks/results, else "
        "RESULTS/benchmark.md, so a side run never overwrites the project's report)",
    )
    args = ap.parse_args()
    try:
        records = merge_accuracy(args.parts, args.results, args.tag)
    except Da3Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"merged {len(records)} records from {len(args.parts)} jobs")
    report = args.report
    if report is None:
        own = args.results.resolve() == RESULTS.resolve()
        report = Path("docs/benchmark.md") if own else args.results / "benchmark.md"
    write_report(report, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
