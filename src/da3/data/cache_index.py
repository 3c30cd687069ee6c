"""Where the prepared-data cache lives and what is in it, without torch (``da3 cache``).

The cache (:mod:`da3.data.cache`) holds each prepared domain as one pair of files,
``<key>.safetensors`` + ``<key>.json``, in ``$DA3_CACHE_DIR/data`` (default
``~/.cache/da3/data``). A benchmark's key is ``<name>-<size>px``; a folder's is
``folder-<folder name>-<hash of its absolute path>-<size>px``: one entry per folder and
resolution, rebuilt in place when the folder changes, never removed by da3 on its own. This
module lists the entries and removes them on request. Removing an entry is always safe: a
run that is reading it keeps its open file, and the next run rebuilds what it needs.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1


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


@dataclass
class CacheEntry:
    """One entry of the cache, as ``da3 cache list`` shows it."""

    key: str
    files: list[Path]
    bytes: int
    modified: float  # seconds since the epoch, the newest of its files
    name: str = ""  # the domain's name (a benchmark's, or the folder's)
    source: str = ""  # a folder's absolute path, a benchmark's package folder
    image_size: int = 0
    images: int = 0
    kind: str = ""  # "benchmark", "folder", or "" when its JSON is unreadable

    @property
    def source_missing(self) -> bool:
        """A folder entry whose folder is gone (it can never be used again)."""
        return self.kind == "folder" and bool(self.source) and not Path(self.source).exists()


def list_entries(root: Path | None = None) -> list[CacheEntry]:
    """Every entry under ``root`` (default :func:`cache_root`), by key; files left by an
    interrupted write (``.*.tmp``) are listed as one entry of their own, ``(unfinished)``."""
    root = cache_root() if root is None else Path(root)
    if not root.is_dir():
        return []
    groups: dict[str, list[Path]] = {}
    for path in sorted(root.iterdir()):
        if not path.is_file():
            continue
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            groups.setdefault("(unfinished)", []).append(path)
        elif path.suffix in (".json", ".safetensors"):
            groups.setdefault(path.stem, []).append(path)
    entries = []
    for key, files in groups.items():
        stats = [f.stat() for f in files if f.exists()]
        entry = CacheEntry(
            key=key,
            files=files,
            bytes=sum(s.st_size for s in stats),
            modified=max((s.st_mtime for s in stats), default=0.0),
        )
        meta = read_meta(root / f"{key}.json") if key != "(unfinished)" else None
        if meta is not None:
            counts = meta.get("counts") or {}
            entry.name = str(meta.get("name", ""))
            entry.source = str(meta.get("source", ""))
            entry.image_size = int(meta.get("image_size") or 0)
            entry.images = sum(int(v) for v in counts.values() if isinstance(v, int))
            entry.kind = "folder" if meta.get("kind") == "folder" else "benchmark"
        entries.append(entry)
    return entries


def select(entries: list[CacheEntry], wanted: list[str]) -> tuple[list[CacheEntry], list[str]]:
    """The entries each of ``wanted`` names (a key, a domain name such as ``digits``, or a
    folder's path, for every resolution), and the words that named none."""
    chosen: dict[str, CacheEntry] = {}
    unmatched = []
    for word in wanted:
        path = os.path.abspath(os.path.expanduser(word))
        hits = [e for e in entries if word in (e.key, e.name) or (e.source and e.source == path)]
        if not hits:
            unmatched.append(word)
        chosen.update((e.key, e) for e in hits)
    return list(chosen.values()), unmatched


def remove(entries: list[CacheEntry]) -> int:
    """Delete the files of ``entries``; returns the bytes freed."""
    freed = 0
    for entry in entries:
        for path in entry.files:
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            freed += size
    return freed


def age(seconds_since_epoch: float) -> str:
    """``3 h``, ``2 d``: how long ago, for a table."""
    dt = max(0.0, time.time() - seconds_since_epoch)
    for unit, span in (("d", 86400), ("h", 3600), ("min", 60)):
        if dt >= span:
            return f"{dt / span:.0f} {unit}"
    return "now"
