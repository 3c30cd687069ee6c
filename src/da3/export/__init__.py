"""Export a domain to ONNX or TorchScript, checked against PyTorch (:mod:`da3.export.core`),
and time batch-1 inference in each runtime (:mod:`da3.export.bench`)."""

from __future__ import annotations

import importlib
from typing import Any

_CORE = (
    "FORMATS",
    "TOLERANCE",
    "ExportResult",
    "compare",
    "domain_metadata",
    "export_model",
    "inference_module",
    "open_runner",
    "read_sidecar",
    "sidecar_path",
)
_BENCH = ("bench_infer", "format_bench", "gate_statistics")
__all__ = [*_CORE, *_BENCH]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `da3 --help` does not load torch.onnx.
    if name in _CORE:
        return getattr(importlib.import_module("da3.export.core"), name)
    if name in _BENCH:
        return getattr(importlib.import_module("da3.export.bench"), name)
    raise AttributeError(f"module 'da3.export' has no attribute {name!r}")
