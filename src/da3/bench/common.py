"""What every benchmark result says about itself, and how it is written."""

from __future__ import annotations

import dataclasses
import datetime
import platform
import subprocess
import sys
from pathlib import Path

import torch

from da3 import __version__
from da3.io import write_json, write_text
from da3.methods import make_config, with_legacy


def _git(where: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], capture_output=True, text=True, check=True, cwd=where
    ).stdout.strip()


def _program() -> str:
    name = Path(sys.argv[0]).name
    return "da3" if name in ("cli.py", "__main__.py") else name  # python -m da3.cli is da3


def run_info(device: str = "cpu", where: Path | None = None) -> dict:
    """Command, commit (``+dirty`` when code differs from it), date, machine, versions.

    ``where`` is a folder inside the repository whose commit is meant (default: this
    package's). Result files being written do not make the code dirty."""
    from da3.profile import machine_description

    where = Path(where) if where is not None else Path(__file__).parent
    try:
        commit = _git(where, "rev-parse", "--short", "HEAD")
        top = Path(_git(where, "rev-parse", "--show-toplevel"))
        dirty = bool(
            _git(
                top,
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                "src",
                "benchmarks",
                ":(exclude)benchmarks/results",
            )
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    return {
        "command": " ".join([_program(), *sys.argv[1:]]),
        "commit": commit + ("+dirty" if dirty else ""),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "da3": __version__,
    }


def header(info: dict, title: str, extra: str = "") -> str:
    """Title and the run's list (command, commit, machine, date); ``extra``: more list items
    (lines ending in a newline)."""
    command = info["command"]
    if isinstance(command, list):  # merged from parallel jobs (da3.bench.merge)
        command = f"{command[0]}` and {len(command) - 1} more jobs like it, the last `{command[-1]}"
    return (
        f"# {title}\n\n"
        f"- command: `{command}`\n- commit: {info['commit']}, da3 {info['da3']}, "
        f"torch {info['torch']}, Python {info['python']}\n- machine: {info['machine']}\n"
        f"- date: {info['date']}\n{extra}\n"
    )


def save(results: Path, name: str, payload: dict, markdown: str) -> None:
    """``results/name.json`` (raw, atomic) and ``results/name.md`` (a readable table)."""
    results.mkdir(parents=True, exist_ok=True)
    write_json(results / f"{name}.json", payload)
    write_text(results / f"{name}.md", markdown)
    print(f"wrote {results / name}.json and .md", flush=True)


def parse_seeds(text: str) -> list[int]:
    """``"0-9"`` or ``"0,3,5"`` as a list of seeds; Da3Error on anything else."""
    from da3.errors import Da3Error

    try:
        if "-" in text.strip("-"):
            a, b = text.split("-")
            seeds = list(range(int(a), int(b) + 1))
        else:
            seeds = [int(s) for s in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0:
        raise Da3Error(f"seeds {text!r}: expected A-B or a comma-separated list of seeds >= 0")
    return seeds


def commits_line(info: dict, records: list[dict]) -> str:
    """Where ``records`` were not all trained at ``info``'s commit (a resumed or partly re-run
    stage), which commit trained how many of them, as a markdown list item; else ""."""
    counts: dict[str, list[str]] = {}
    for r in records:
        counts.setdefault(r.get("commit", "not recorded"), []).append(r["method"])
    if set(counts) <= {info.get("commit")}:
        return ""
    parts = [
        f"{c}: {len(ms)} ({', '.join(dict.fromkeys(ms))})"
        for c, ms in sorted(counts.items(), key=lambda kv: -len(kv[1]))
    ]
    return "- records by commit: " + "; ".join(parts) + "\n"


def same_config(recorded: dict, current: dict, method: str) -> bool:
    """Whether a result recorded under ``method``'s config ``recorded`` still stands for
    ``current``. A setting added to the method since the record was written counts as having
    its current default (new settings are added with a default that keeps the old
    behaviour), unless the method names the value it had before in ``legacy``: then it counts
    as that (see da3.methods.with_legacy). A changed value, or a setting that no longer
    exists, makes the record stale."""
    recorded = with_legacy(method, recorded)
    return {**current, **recorded} == current


def config_is_current(recorded: dict, method: str, protocol: dict) -> bool:
    """:func:`same_config` against ``method``'s config under ``protocol``'s overrides today."""
    current = dataclasses.asdict(make_config(method, protocol["overrides"].get(method)))
    return same_config(recorded, current, method)


def same_gating_protocol(recorded: dict | None, current: dict) -> bool:
    """:func:`same_config` for a gating protocol, which holds DA3's whole config."""
    if not recorded or "da3_config" not in recorded:
        return False
    rest_same = {**recorded, "da3_config": None} == {**current, "da3_config": None}
    return rest_same and same_config(recorded["da3_config"], current["da3_config"], "da3")
