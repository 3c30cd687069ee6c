"""Shared by the benchmark scripts: where results go and how a run describes itself."""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from da3 import __version__
from da3.io import write_json

RESULTS = Path(__file__).resolve().parent / "results"


def run_info(device: str = "cpu") -> dict:
    from da3.profile import machine_description

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                # results being written by a running benchmark do not make the code dirty
                [
                    "git",
                    "status",
                    "--porcelain",
                    "--untracked-files=no",
                    "--",
                    ".",
                    ":(exclude)results",
                ],
                capture_output=True,
                text=True,
                check=True,
                cwd=Path(__file__).parent,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": commit + ("+dirty" if dirty else ""),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "da3": __version__,
    }


def save(name: str, payload: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{name}.json", payload)
    (RESULTS / f"{name}.md").write_text(markdown)
    print(f"wrote {RESULTS / name}.json and .md")


def header(info: dict, title: str) -> str:
    return (
        f"# {title}\n\n"
        f"- command: `{info['command']}`\n- commit: {info['commit']}, da3 {info['da3']}, "
        f"torch {info['torch']}, Python {info['python']}\n- machine: {info['machine']}\n"
        f"- date: {info['date']}\n\n"
    )


def dumps(obj) -> str:
    return json.dumps(obj, indent=1)
