"""A long fuzzing campaign on the loaders of files a user may receive (issue #20).

    python benchmarks/fuzz_loaders.py [--examples 2000] [--targets tensors,json,yaml,...]

Runs the fuzzers of ``tests/test_fuzz.py`` (the domain ``.safetensors`` + ``.json`` pair
through ``da3 predict``, a run's ``config.yaml`` through ``da3 train --config``, an exported
model's sidecar through ``read_sidecar``, class-folder images through ``load_image``) with
``--examples`` random cases per target instead of CI's fixed few dozen to few hundred, in one
pytest process, one thread, its address space limited (``--memory-gib``). A finding is a case
that is neither loaded nor refused with one line ``da3: error: FILE: ...`` (a traceback,
another exit status, a second line, a message not naming the file, a case over 30 s, or 1 GiB
more peak memory); pytest prints its shrunk example. Writes
benchmarks/results/fuzz_loaders.{json,md}: per target the cases run, how many loaded and how
many were refused, the findings, the most memory one case took, the time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from da3.bench.common import header, run_info, save

RESULTS = Path(__file__).resolve().parent / "results"

TESTS = Path(__file__).resolve().parents[1] / "tests"
TARGETS = {
    "tensors": "test_domain_tensors_file",
    "json": "test_domain_json_file",
    "yaml": "test_settings_file",
    "sidecar": "test_sidecar",
    "images": "test_image_file",
}


def markdown(info: dict, args, report: dict, failed: list[str], wall: float) -> str:
    lines = [
        "| file | cases | loaded | refused (one line) | findings | largest case MiB | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for target, r in report.items():
        lines.append(
            f"| {target} | {r['cases']} | {r.get('loaded', 0)} | {r.get('refused', 0)} "
            f"| {r.get('finding', 0)} | {r.get('largest_case_mib', '-')} | {r['seconds']:.0f} |"
        )
    verdict = (
        "no findings" if not failed else "findings in: " + ", ".join(failed) + " (see the log)"
    )
    return (
        header(info, "Fuzzing the loaders of received files")
        + f"{args.examples} random cases per target, {wall / 60:.1f} min in all; {verdict}. "
        "See the docstring of benchmarks/fuzz_loaders.py and tests/test_fuzz.py.\n\n"
        + "\n".join(lines)
        + "\n\nloaded: the damaged file still made sense (a flipped byte inside a class name, "
        "settings that are valid); refused: `da3: error: FILE: ...`, exit status 2. The "
        "settings file's accepted cases end on the missing `--data` folder given to them. "
        "largest case: the most memory one case took over what the process held before it "
        "(Linux peak RSS, reset before each case).\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=2000, help="random cases per target")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset")
    ap.add_argument(
        "--memory-gib",
        type=float,
        default=12,
        help="address-space limit of the fuzzing process (default 12): a runaway case is a "
        "MemoryError, reported, not the machine's OOM killer",
    )
    ap.add_argument("--out", default="fuzz_loaders")
    args = ap.parse_args()
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or args.examples < 1:
        raise SystemExit(f"--targets from {', '.join(TARGETS)}; --examples >= 1 ({unknown})")
    info = run_info()
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "report.json"
        env = {
            **os.environ,
            "DA3_FUZZ_EXAMPLES": str(args.examples),
            "DA3_FUZZ_REPORT": str(report_path),
            "OMP_NUM_THREADS": "1",
        }
        selected = " or ".join(TARGETS[t] for t in targets)
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", selected]
        argv += [str(TESTS / "test_fuzz.py"), "-rf", "--tb=short"]
        t0 = time.perf_counter()
        limit = int(args.memory_gib * 2**30)
        proc = subprocess.run(
            argv,
            env=env,
            capture_output=True,
            text=True,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)),
        )
        wall = time.perf_counter() - t0
        print(proc.stdout[-20000:], proc.stderr[-5000:], sep="\n", flush=True)
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    failed = [
        line.split("::")[1].split()[0]
        for line in proc.stdout.splitlines()
        if line.startswith("FAILED ") and "::" in line
    ]
    payload = {
        "info": info,
        "examples_per_target": args.examples,
        "targets": report,
        "failed_tests": failed,
        "pytest_exit_status": proc.returncode,
        "memory_limit_gib": args.memory_gib,
        "wall_seconds": wall,
    }
    save(RESULTS, args.out, payload, markdown(info, args, report, failed, wall))
    sys.exit(0 if proc.returncode == 0 else 1)


if __name__ == "__main__":
    main()
