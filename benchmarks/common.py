"""Shared by the benchmark scripts: where results go and how a run describes itself
(the functions live in :mod:`da3.bench.common`, which ``da3 bench`` uses too)."""

from __future__ import annotations

from pathlib import Path

from da3.bench.common import header, run_info
from da3.bench.common import save as _save

RESULTS = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS", "header", "run_info", "save"]


def save(name: str, payload: dict, markdown: str) -> None:
    _save(RESULTS, name, payload, markdown)
