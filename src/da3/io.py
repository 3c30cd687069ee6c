"""Atomic writes of safetensors and JSON files (temporary file, fsync, rename)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from da3.errors import Da3Error


def _atomic(path: Path, write) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise Da3Error(f"{path.parent}: cannot write here ({err.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise Da3Error(f"{path}: cannot write ({err.strerror or err})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    _atomic(path, lambda f: f.write(text.encode()))


def write_text(path: Path, text: str) -> None:
    _atomic(path, lambda f: f.write(text.encode()))


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise Da3Error(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise Da3Error(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise Da3Error(f"{path}: expected a JSON object")
    return data


def write_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> None:
    from safetensors.torch import save

    blob = save(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
        metadata={k: str(v) for k, v in (metadata or {}).items()},
    )
    _atomic(path, lambda f: f.write(blob))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise Da3Error(f"{path}: file not found")
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - any decoding failure is the file's fault
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise Da3Error(f"{path}: not a readable safetensors file ({msg})") from None
