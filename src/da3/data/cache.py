"""On-disk cache of prepared domains: one ``.safetensors`` file of arrays + one small ``.json``.

Location: ``$DA3_CACHE_DIR/data`` (default ``~/.cache/da3/data``), one pair of files per
(domain, resolution), e.g. ``digits-96px.safetensors`` + ``digits-96px.json``.

- The safetensors file holds ``{train,val,test}_images`` (uint8 N x 3 x S x S) and
  ``{train,val,test}_labels`` (int64 N). No pickle anywhere.
- The JSON holds the format version, the domain name, resolution, class names, per-split
  counts, the source and a random ``build_id`` that is also written into the safetensors header,
  so a pair from two different builds is never mixed.
- Both are written to a temporary file in the same folder and moved into place with
  ``os.replace``, tensors first, JSON last: a reader sees a complete old or a complete new entry.
- Anything that does not check out (missing file, bad JSON, truncated tensors, wrong shape or
  dtype, other format version) makes :func:`read` return ``None`` and the domain is rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from da3.data.domain import SPLIT_NAMES, DomainData, Split
from da3.errors import Da3Error

FORMAT_VERSION = 1
log = logging.getLogger(__name__)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder prepared domains live in: ``<cache_dir>/data``.

    ``cache_dir`` defaults to ``$DA3_CACHE_DIR``, then ``~/.cache/da3``.
    """
    if cache_dir is None:
        cache_dir = os.environ.get("DA3_CACHE_DIR") or Path.home() / ".cache" / "da3"
    return Path(cache_dir).expanduser() / "data"


def entry_paths(root: Path, key: str) -> tuple[Path, Path]:
    """(tensors file, JSON file) of one cache entry."""
    return root / f"{key}.safetensors", root / f"{key}.json"


def read_meta(meta_path: Path) -> dict[str, Any] | None:
    """The JSON of an entry, or None when missing or unreadable (cheap: no tensors read)."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        return None
    return meta


def read(
    root: Path, key: str, name: str, image_size: int, expect: dict[str, Any] | None = None
) -> DomainData | None:
    """The cached domain, or None when there is no valid entry (the caller rebuilds).

    ``expect``: JSON fields that must hold these values (e.g. the recipe version).
    """
    tensors_path, meta_path = entry_paths(root, key)
    if not meta_path.exists() or not tensors_path.exists():
        return None
    try:
        return _read(tensors_path, meta_path, name, image_size, expect or {})
    except Exception as err:  # any damage at all means "rebuild", never a crash
        log.warning("da3: ignoring cache entry %s (%s); rebuilding", tensors_path, err)
        return None


def _read(
    tensors_path: Path, meta_path: Path, name: str, image_size: int, expect: dict[str, Any]
) -> DomainData:
    meta = read_meta(meta_path)
    if meta is None:
        raise ValueError("bad or outdated JSON")
    if meta.get("name") != name or meta.get("image_size") != image_size:
        raise ValueError("entry is for another domain or resolution")
    for field, value in expect.items():
        if meta.get(field) != value:
            raise ValueError(f"{field} is {meta.get(field)!r}, expected {value!r}")
    classes = meta["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError("bad class list")
    splits: dict[str, Split] = {}
    with safe_open(str(tensors_path), framework="pt") as f:
        header = f.metadata() or {}
        if header.get("build_id") != meta.get("build_id"):
            raise ValueError("tensors and JSON come from different builds")
        for split in SPLIT_NAMES:
            images = f.get_tensor(f"{split}_images")
            labels = f.get_tensor(f"{split}_labels")
            n = int(meta["counts"][split])
            if images.dtype != torch.uint8 or tuple(images.shape) != (n, 3, image_size, image_size):
                raise ValueError(f"{split} images have shape {tuple(images.shape)}")
            if labels.dtype != torch.int64 or tuple(labels.shape) != (n,):
                raise ValueError(f"{split} labels have shape {tuple(labels.shape)}")
            if n and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
                raise ValueError(f"{split} labels out of range")
            splits[split] = Split(images, labels)
    return DomainData(
        name=name,
        classes=list(classes),
        image_size=image_size,
        source=str(meta.get("source", "")),
        **splits,
    )


def write(root: Path, key: str, domain: DomainData, extra: dict[str, Any] | None = None) -> Path:
    """Store ``domain`` atomically; returns the tensors file's path."""
    tensors_path, meta_path = entry_paths(root, key)
    build_id = uuid.uuid4().hex
    tensors: dict[str, torch.Tensor] = {}
    for split_name, split in domain.splits().items():
        tensors[f"{split_name}_images"] = split.images.contiguous()
        tensors[f"{split_name}_labels"] = split.labels.to(torch.int64).contiguous()
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "name": domain.name,
        "image_size": domain.image_size,
        "classes": domain.classes,
        "counts": domain.counts(),
        "class_counts": {
            s: split.class_counts(domain.num_classes) for s, split in domain.splits().items()
        },
        "source": domain.source,
        "build_id": build_id,
        **(extra or {}),
    }
    try:
        root.mkdir(parents=True, exist_ok=True)
        _atomic(
            tensors_path,
            lambda tmp: save_file(tensors, tmp, metadata={"build_id": build_id}),
        )
        text = json.dumps(meta, indent=1) + "\n"
        _atomic(meta_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    except OSError as err:
        raise Da3Error(
            f"{root}: cannot write the data cache ({err.strerror or err}); "
            "set DA3_CACHE_DIR to a writable folder"
        ) from err
    return tensors_path


def _atomic(path: Path, write_to: Any) -> None:
    # A unique temporary name in the same folder (so os.replace is atomic); created with open()
    # rather than mkstemp so the file gets the usual umask permissions, not 0600.
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.touch(exist_ok=False)
    try:
        write_to(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
