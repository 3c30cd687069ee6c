"""Image domains for multi-domain learning: five offline benchmarks and any ImageFolder tree.

    >>> from da3.data import load_domain
    >>> d = load_domain("digits", image_size=96)        # or load_domain("/path/to/folder")
    >>> d.classes[:3], d.train.images.shape, d.train.labels.dtype
    (['0', '1', '2'], torch.Size([2000, 3, 96, 96]), torch.int64)

Every domain comes as a :class:`DomainData`: class names and fixed, stratified
``train`` / ``val`` / ``test`` splits of RGB ``uint8`` images ``N x 3 x S x S``.

Benchmark domains (``BENCHMARK_DOMAINS``) are read from files that pip / apt packages install
(no downloads; see :mod:`da3.data.benchmarks` for packages, sizes and split rules), prepared once
per resolution and cached as safetensors + JSON (:mod:`da3.data.cache`; ``$DA3_CACHE_DIR``,
default ``~/.cache/da3``). A folder path is read with the ImageFolder convention
(:mod:`da3.data.folder`). Bad input raises :class:`da3.errors.Da3Error` with a one-line message.

Importing this package does not import torch (``da3 data list`` and ``da3 cache`` run without
it); loading a domain does.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from da3.data import cache_index
from da3.data.benchmarks import BENCHMARKS
from da3.data.domain import DomainData, Split
from da3.data.imaging import check_image_size
from da3.errors import Da3Error

__all__ = [
    "BENCHMARK_DOMAINS",
    "class_count",
    "DomainData",
    "Split",
    "describe_domains",
    "load_domain",
    "prepare",
]

BENCHMARK_DOMAINS: tuple[str, ...] = tuple(BENCHMARKS)
DEFAULT_IMAGE_SIZE = 96
log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


def _size(image_size: int) -> int:
    try:
        return check_image_size(image_size)
    except (TypeError, ValueError) as err:
        raise Da3Error(str(err)) from err


def _benchmark_key(name: str, image_size: int) -> str:
    return f"{name}-{image_size}px"


def load_domain(
    name_or_path: PathLike,
    image_size: int = DEFAULT_IMAGE_SIZE,
    cache_dir: PathLike | None = None,
    *,
    progress: bool = False,
    min_classes: int = 2,
) -> DomainData:
    """A benchmark domain by name (``"digits"``, ...) or a folder of class sub-folders.

    Uses the cache when it holds a valid entry, else builds the domain and stores it. A name
    in ``BENCHMARK_DOMAINS`` always means the benchmark; anything else is taken as a path.
    ``min_classes=1`` accepts a folder of one class (to evaluate a domain on it).
    """
    size = _size(image_size)
    root = cache_index.cache_root(cache_dir)
    text = os.fspath(name_or_path)
    if text in BENCHMARKS:
        return _load_benchmark(text, size, root, progress)
    path = Path(text).expanduser()
    if not path.exists() and os.sep not in text and "/" not in text and not text.startswith("."):
        raise Da3Error(
            f"{text}: unknown domain; expected one of {', '.join(BENCHMARK_DOMAINS)} "
            "or the path of a folder with one sub-folder per class"
        )
    return _load_folder(path.absolute(), size, root, progress, min_classes)


def class_count(name_or_path: PathLike, image_size: int = DEFAULT_IMAGE_SIZE) -> int:
    """How many classes :func:`load_domain` will find, without loading any image (a folder
    is listed and checked; a benchmark answers from its cache entry, or its nominal count).
    """
    text = os.fspath(name_or_path)
    if text in BENCHMARKS:
        bench = BENCHMARKS[text]
        meta = cache_index.read_meta(
            cache_index.entry_paths(
                cache_index.cache_root(), _benchmark_key(text, _size(image_size))
            )[1]
        )
        if meta and isinstance(meta.get("classes"), list):
            return len(meta["classes"])
        return bench.nominal_counts[0]
    path = Path(text).expanduser()
    if not path.exists() and os.sep not in text and "/" not in text and not text.startswith("."):
        load_domain(text, image_size)  # the unknown-domain error
    from da3.data import folder

    return len(folder.scan(path.absolute()).classes)


def _load_benchmark(name: str, size: int, root: Path, progress: bool) -> DomainData:
    from da3.data import cache

    key = _benchmark_key(name, size)
    bench = BENCHMARKS[name]
    cached = cache.read(root, key, name, size, bench.cache_fields())
    if cached is not None:
        return cached
    with cache.preparing(root, key):  # another process may be building it: wait, then read
        cached = cache.read(root, key, name, size, bench.cache_fields())
        if cached is not None:
            return cached
        domain = bench.build(size, progress)
        if _store(root, key, domain, bench.cache_fields()):
            # read back: the images stay on disk, not in this process
            return cache.read(root, key, name, size, bench.cache_fields()) or domain
        return domain


def _load_folder(
    path: Path, size: int, root: Path, progress: bool, min_classes: int = 2
) -> DomainData:
    from da3.data import cache, folder

    scanned = folder.scan(path, min_classes)
    key = folder.cache_key(path, size)
    stamp = {"kind": "folder", "fingerprint": folder.fingerprint(path, scanned.files)}
    notes = folder.layout_notes(scanned)
    cached = cache.read(root, key, path.name, size, stamp)
    if cached is not None and cached.classes == scanned.classes:
        cached.notes = notes
        return cached
    with cache.preparing(root, key):  # another process may be writing it: wait, then read
        cached = cache.read(root, key, path.name, size, stamp)
        if cached is not None and cached.classes == scanned.classes:
            cached.notes = notes
            return cached
        return _write_folder(path, size, root, progress, scanned, key, stamp, notes)


def _write_folder(path, size, root, progress, scanned, key, stamp, notes) -> DomainData:
    from da3.data import cache, folder

    # Decoded a chunk at a time straight into the cache file, then read back from it: a
    # folder of any size costs a chunk of memory, not the folder.
    plan = folder.split_plan(scanned)
    labels = [label for _, label in scanned.files]
    from tqdm import tqdm

    try:
        with tqdm(
            total=len(scanned.files),
            desc=f"load {path.name}",
            unit="img",
            disable=not progress,
            leave=False,
        ) as bar:
            cache.write_entry(
                root,
                key,
                name=path.name,
                image_size=size,
                classes=scanned.classes,
                source=str(path),
                layout=scanned.layout,
                splits={
                    s: (
                        [labels[i] for i in idx],
                        folder.decode_chunks([scanned.files[i][0] for i in idx], size, bar),
                    )
                    for s, idx in plan.items()
                },
                extra=stamp,
            )
    except cache.CacheWriteError as err:
        log.warning("da3: %s", err)  # no cache: decode into memory, as a last resort
        domain = folder.build(scanned, size, progress)
        domain.notes = notes
        return domain
    domain = cache.read(root, key, path.name, size, stamp)
    if domain is None:
        raise Da3Error(f"{cache.entry_paths(root, key)[0]}: cache entry unreadable after writing")
    domain.notes = notes
    return domain


def _store(root: Path, key: str, domain: DomainData, extra: dict[str, Any]) -> bool:
    # A cache that cannot be written costs time later, not correctness now: warn and go on.
    from da3.data import cache

    try:
        cache.write(root, key, domain, extra)
    except Da3Error as err:
        log.warning("da3: %s", err)
        return False
    return True


def describe_domains(
    image_size: int = DEFAULT_IMAGE_SIZE, cache_dir: PathLike | None = None
) -> list[dict[str, Any]]:
    """One row per benchmark domain; cheap (reads at most the small JSON files).

    Keys: ``name``, ``summary``, ``classes``, ``train``, ``val``, ``test`` (from the cache when
    built, else the sizes the build gives with the documented package versions),
    ``installed`` (the source files are present), ``cached`` (built at this resolution),
    ``requirement`` (what to install), ``image_size``.
    """
    size = _size(image_size)
    root = cache_index.cache_root(cache_dir)
    rows = []
    for name, bench in BENCHMARKS.items():
        n_classes, n_train, n_val, n_test = bench.nominal_counts
        tensors_path, meta_path = cache_index.entry_paths(root, _benchmark_key(name, size))
        meta = cache_index.read_meta(meta_path) if tensors_path.exists() else None
        if meta is not None and any(meta.get(k) != v for k, v in bench.cache_fields().items()):
            meta = None  # outdated: the next load rebuilds it
        if meta is not None:
            counts = meta.get("counts", {})
            n_classes = len(meta.get("classes", [])) or n_classes
            n_train, n_val, n_test = (counts.get(s, 0) for s in ("train", "val", "test"))
        rows.append(
            {
                "name": name,
                "summary": bench.summary,
                "classes": n_classes,
                "train": n_train,
                "val": n_val,
                "test": n_test,
                "installed": bench.installed(),
                "cached": meta is not None,
                "requirement": bench.requirement,
                "image_size": size,
            }
        )
    return rows


def prepare(
    names: Iterable[str] | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    cache_dir: PathLike | None = None,
    *,
    force: bool = False,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Build the caches of benchmark domains ``names`` (default: all) at ``image_size``.

    Returns one row per domain: ``name``, ``status`` (``"built"`` or ``"cached"``, when a valid
    entry was already there and ``force`` is false), ``seconds``, ``path`` (the tensors file).
    Errors (unknown name, missing package, unwritable cache) raise Da3Error.
    """
    from da3.data import cache

    size = _size(image_size)
    root = cache.cache_root(cache_dir)
    wanted = list(BENCHMARK_DOMAINS if names is None else names)
    unknown = [n for n in wanted if n not in BENCHMARKS]
    if unknown:
        raise Da3Error(
            f"{unknown[0]}: unknown benchmark domain; expected one of {', '.join(BENCHMARKS)}"
        )
    from tqdm import tqdm

    rows = []
    bar = tqdm(wanted, desc="prepare", unit="domain", disable=not progress)
    for name in bar:
        bar.set_postfix_str(f"{name} {size}px")
        key = _benchmark_key(name, size)
        start = time.perf_counter()
        status = "cached"
        bench = BENCHMARKS[name]
        if force or cache.read(root, key, name, size, bench.cache_fields()) is None:
            domain = bench.build(size, progress)
            cache.write(root, key, domain, bench.cache_fields())
            status = "built"
        seconds = time.perf_counter() - start
        path = cache.entry_paths(root, key)[0]
        rows.append({"name": name, "status": status, "seconds": seconds, "path": str(path)})
    return rows
