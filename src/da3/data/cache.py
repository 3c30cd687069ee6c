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

Memory: the images are never all in memory. :func:`write_entry` writes each split's images as
they come (a folder of 20,000 photos is decoded a chunk at a time), and :func:`read` returns
splits whose ``images`` are :class:`CachedImages`: the file stays on disk and each batch is
read when it is asked for (``images[idx]``), so what a training run holds does not grow with
the number of images. The file is a plain safetensors file; the writer lays it out by the
format's own rules (8-byte header length, JSON header, then the tensors back to back).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

# where the cache is and reading an entry's JSON need no torch (`da3 cache`, `da3 data list`)
from da3.data.cache_index import (  # noqa: F401 - part of this module's interface
    FORMAT_VERSION,
    cache_root,
    entry_paths,
    read_meta,
)
from da3.data.domain import SPLIT_NAMES, DomainData, Split
from da3.errors import Da3Error
from da3.io import safetensors_header

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# images read from the file when asked for


class _OpenFile:
    """A read-only file descriptor, closed when the last reader is gone. Held from the
    moment the entry is read: a cache rebuilt meanwhile replaces the file's name, not the
    file this reader has open, so a run always reads the build it started with."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)

    def __del__(self) -> None:
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)


class CachedImages:
    """The uint8 images ``N x 3 x S x S`` of one split, left in the cache file.

    Behaves like the tensor it stands for where a batch is taken: ``len(images)``,
    ``images.shape``, ``images[i]``, ``images[a:b]`` and ``images[index_tensor]`` return
    uint8 tensors read from disk (consecutive images in one read); iterating yields one
    image at a time, read a chunk at a time. Nothing is held but the file descriptor and,
    for a :meth:`subset`, its index.
    """

    dtype = torch.uint8

    def __init__(
        self,
        file: _OpenFile,
        offset: int,
        count: int,
        image_shape: tuple[int, int, int],
        index: np.ndarray | None = None,
    ) -> None:
        self._file = file
        self._offset = offset
        self._count = count
        self._image_shape = tuple(image_shape)
        self._image_bytes = int(np.prod(image_shape))
        self._index = index  # positions in the file, or None for all of them in order

    @property
    def path(self) -> Path:
        return self._file.path

    def __len__(self) -> int:
        return self._count if self._index is None else len(self._index)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self._image_shape))

    @property
    def nbytes_on_disk(self) -> int:
        return len(self) * self._image_bytes

    def _positions(self, key: Any) -> np.ndarray:
        n = len(self)
        if isinstance(key, slice):
            picked = np.arange(n)[key]
        else:
            if isinstance(key, torch.Tensor):
                key = key.cpu().numpy()
            picked = np.asarray(key)
            if picked.dtype == np.bool_:
                picked = np.flatnonzero(picked)
            picked = picked.astype(np.int64).reshape(-1)
            if picked.size and (picked.min() < -n or picked.max() >= n):
                raise IndexError(f"index out of range for {n} images")
            picked = np.where(picked < 0, picked + n, picked)
        return picked if self._index is None else self._index[picked]

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, int | np.integer):
            return self._read(self._positions([int(key)]))[0]
        return self._read(self._positions(key))

    def _read(self, positions: np.ndarray) -> torch.Tensor:
        out = np.empty((len(positions), *self._image_shape), dtype=np.uint8)
        flat = out.reshape(len(positions), self._image_bytes)
        start = 0
        # one read per run of consecutive positions (a whole slice is one read)
        while start < len(positions):
            stop = start + 1
            while stop < len(positions) and positions[stop] == positions[stop - 1] + 1:
                stop += 1
            where = self._offset + int(positions[start]) * self._image_bytes
            view = memoryview(flat[start:stop]).cast("B")
            got = os.preadv(self._file.fd, [view], where)
            if got != len(view):
                raise Da3Error(f"{self.path}: cache file is shorter than its header says")
            start = stop
        return torch.from_numpy(out)

    def subset(self, indices: Any) -> CachedImages:
        """These images at ``indices``, still on disk."""
        return CachedImages(
            self._file, self._offset, self._count, self._image_shape, self._positions(indices)
        )

    def __iter__(self) -> Iterator[torch.Tensor]:
        step = 256
        for i in range(0, len(self), step):
            yield from self[i : i + step]

    def __repr__(self) -> str:
        return f"CachedImages({len(self)} x {self._image_shape}, {self.path.name})"


# ---------------------------------------------------------------------------------------
# reading


@contextlib.contextmanager
def preparing(root: Path, key: str):
    """Hold entry ``key`` while this process reads, builds and writes it: a second process
    preparing the same entry (two runs on one new folder) waits here, then finds it written,
    rather than interleaving its files with the first's (each pair is whole, but a reader
    between one writer's tensors and the other's JSON would see two builds). An advisory
    lock (``fcntl.flock``) on ``.KEY.lock`` beside the entry; none where it cannot be had
    (no fcntl, a folder that cannot be written: the write then fails on its own)."""
    try:
        import fcntl

        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / f".{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and with it the lock


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
    except _Outdated as err:  # the folder changed, a new recipe: a normal event
        log.info("da3: cache entry %s is outdated (%s); rebuilding", tensors_path, err)
        return None
    except Exception as err:  # any damage at all means "rebuild", never a crash
        log.warning("da3: cache entry %s is damaged (%s); rebuilding it", tensors_path, err)
        return None


class _Outdated(ValueError):
    """An entry that is fine but not for this request (another build of the source)."""


def _data_offsets(path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """(where the tensor data starts, each tensor's [begin, end) in it) from the header."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > min(100_000_000, os.fstat(f.fileno()).st_size):
            raise ValueError("header length out of range")
        header = json.loads(f.read(length))
    offsets = {
        k: (int(v["data_offsets"][0]), int(v["data_offsets"][1]))
        for k, v in header.items()
        if k != "__metadata__"
    }
    return 8 + length, offsets


def _read(
    tensors_path: Path, meta_path: Path, name: str, image_size: int, expect: dict[str, Any]
) -> DomainData:
    meta = read_meta(meta_path)
    if meta is None:
        raise ValueError("bad or outdated JSON")
    if meta.get("name") != name or meta.get("image_size") != image_size:
        raise _Outdated("entry is for another domain or resolution")
    for field, value in expect.items():
        if meta.get(field) != value:
            raise _Outdated(f"its {field} differs")
    classes = meta["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError("bad class list")
    image_shape = (3, image_size, image_size)
    splits: dict[str, Split] = {}
    file = _OpenFile(tensors_path)
    # safetensors checks the layout (offsets within the file, no overlaps); the images
    # themselves are not read here
    with safe_open(str(tensors_path), framework="pt") as f:
        header = f.metadata() or {}
        if header.get("build_id") != meta.get("build_id"):
            raise ValueError("tensors and JSON come from different builds")
        start, offsets = _data_offsets(tensors_path)
        for split in SPLIT_NAMES:
            images = f.get_slice(f"{split}_images")
            labels = f.get_tensor(f"{split}_labels")
            n = int(meta["counts"][split])
            if images.get_dtype() != "U8" or tuple(images.get_shape()) != (n, *image_shape):
                raise ValueError(f"{split} images have shape {tuple(images.get_shape())}")
            if labels.dtype != torch.int64 or tuple(labels.shape) != (n,):
                raise ValueError(f"{split} labels have shape {tuple(labels.shape)}")
            if n and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
                raise ValueError(f"{split} labels out of range")
            begin, _ = offsets[f"{split}_images"]
            splits[split] = Split(CachedImages(file, start + begin, n, image_shape), labels)
    return DomainData(
        name=name,
        classes=list(classes),
        image_size=image_size,
        source=str(meta.get("source", "")),
        layout=str(meta.get("layout", "")),
        **splits,
    )


# ---------------------------------------------------------------------------------------
# writing


def write(root: Path, key: str, domain: DomainData, extra: dict[str, Any] | None = None) -> Path:
    """Store an in-memory ``domain`` atomically; returns the tensors file's path."""
    return write_entry(
        root,
        key,
        name=domain.name,
        image_size=domain.image_size,
        classes=domain.classes,
        source=domain.source,
        layout=domain.layout,
        splits={s: (split.labels, _chunks(split.images)) for s, split in domain.splits().items()},
        extra=extra,
    )


def _chunks(images: Any, step: int = 512) -> Iterator[np.ndarray]:
    for i in range(0, len(images), step):
        chunk = images[i : i + step]
        yield chunk.numpy() if isinstance(chunk, torch.Tensor) else np.asarray(chunk)


def write_entry(
    root: Path,
    key: str,
    *,
    name: str,
    image_size: int,
    classes: list[str],
    source: str,
    splits: dict[str, tuple[Any, Iterable[np.ndarray]]],
    layout: str = "",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a cache entry whose images arrive in chunks, holding one chunk at a time.

    ``splits``: for each of train/val/test, its labels (int, length N) and an iterable of
    uint8 arrays ``k x 3 x S x S`` that together are its N images in order. Atomic like
    every entry: a temporary file is moved into place, tensors first, then the JSON.
    """
    tensors_path, meta_path = entry_paths(root, key)
    build_id = uuid.uuid4().hex
    shape = (3, image_size, image_size)
    per_image = int(np.prod(shape))
    labels = {s: torch.as_tensor(splits[s][0], dtype=torch.int64).contiguous() for s in SPLIT_NAMES}
    n = {s: len(labels[s]) for s in SPLIT_NAMES}
    head = safetensors_header(
        # labels first: 8-byte aligned whatever the image size
        [(f"{s}_labels", "I64", [n[s]], 8 * n[s]) for s in SPLIT_NAMES]
        + [(f"{s}_images", "U8", [n[s], *shape], n[s] * per_image) for s in SPLIT_NAMES],
        {"build_id": build_id},
    )

    def write_tensors(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(head)
            for s in SPLIT_NAMES:
                f.write(labels[s].numpy().tobytes())
            for s in SPLIT_NAMES:
                written = 0
                for chunk in splits[s][1]:
                    chunk = np.ascontiguousarray(chunk, dtype=np.uint8)
                    if chunk.shape[1:] != shape:
                        raise ValueError(f"{s} images of shape {chunk.shape[1:]}, not {shape}")
                    if len(chunk):
                        f.write(memoryview(chunk).cast("B"))
                    written += len(chunk)
                if written != len(labels[s]):
                    raise ValueError(f"{s}: {written} images for {len(labels[s])} labels")
            f.flush()
            os.fsync(f.fileno())

    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "image_size": image_size,
        "classes": list(classes),
        "counts": {s: len(labels[s]) for s in SPLIT_NAMES},
        "class_counts": {
            s: torch.bincount(labels[s], minlength=len(classes)).tolist() for s in SPLIT_NAMES
        },
        "source": source,
        "layout": layout,
        "build_id": build_id,
        **(extra or {}),
    }
    try:
        root.mkdir(parents=True, exist_ok=True)
        _atomic(tensors_path, write_tensors)
        text_meta = json.dumps(meta, indent=1) + "\n"
        _atomic(meta_path, lambda tmp: Path(tmp).write_text(text_meta, encoding="utf-8"))
    except OSError as err:
        raise CacheWriteError(
            f"{root}: cannot write the data cache ({err.strerror or err}); "
            "set DA3_CACHE_DIR to a writable folder"
        ) from err
    return tensors_path


class CacheWriteError(Da3Error):
    """The cache folder cannot be written (the data itself may be fine)."""


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
