"""``da3 data``: list the benchmark domains and prepare their caches; ``da3 cache``: what the
prepared-data cache holds, and clearing it. Neither imports torch to list anything.

da3 data list [--image-size 96]
da3 data prepare [--domains digits,clipart] [--image-size 96] [--force]
da3 cache list
da3 cache clear [ENTRY ...] [--missing]
"""

from __future__ import annotations

import argparse
from typing import Any

from da3.data import (
    BENCHMARK_DOMAINS,
    DEFAULT_IMAGE_SIZE,
    cache_index,
    describe_domains,
    prepare,
)
from da3.errors import Da3Error
from da3.tables import text_table


def register(subparsers: Any) -> None:
    """Add the ``data`` command (with ``list`` and ``prepare``) to the main parser."""
    data = subparsers.add_parser(
        "data",
        help="list and prepare the image domains",
        description="The offline benchmark domains: what is installed, what is cached.",
    )
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    listing = commands.add_parser("list", help="table of domains, image counts and status")
    listing.add_argument(
        "--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="resolution (default 96)"
    )
    listing.set_defaults(run=run_list)

    build = commands.add_parser("prepare", help="build the cached arrays of benchmark domains")
    build.add_argument(
        "--domains",
        default=",".join(BENCHMARK_DOMAINS),
        help=f"comma-separated names (default all: {','.join(BENCHMARK_DOMAINS)})",
    )
    build.add_argument(
        "--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="resolution (default 96)"
    )
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.set_defaults(run=run_prepare)

    where = "$DA3_CACHE_DIR/data, default ~/.cache/da3/data"
    cache = subparsers.add_parser(
        "cache",
        help="list or clear the prepared-data cache",
        description=f"Every domain da3 loads (a benchmark, or your folder) is decoded once per "
        f"image size into the cache ({where}) and read from there after; a folder's entry is "
        "rebuilt when its files change. Entries stay until you clear them.",
    )
    commands = cache.add_subparsers(dest="cache_command", metavar="SUBCOMMAND", required=True)
    listing = commands.add_parser("list", help="the cache's entries: domain, size, source, age")
    listing.set_defaults(run=run_cache_list)
    clear = commands.add_parser(
        "clear",
        help="delete cache entries (all of them by default); the next run rebuilds what it needs",
    )
    clear.add_argument(
        "entries",
        nargs="*",
        metavar="ENTRY",
        help="a key from `da3 cache list`, a domain name (digits) or a folder path; "
        "every resolution of it (default: every entry)",
    )
    clear.add_argument(
        "--missing",
        action="store_true",
        help="only the entries of folders that no longer exist",
    )
    clear.set_defaults(run=run_cache_clear)


def run_list(args: argparse.Namespace) -> int:
    rows = describe_domains(image_size=args.image_size)
    header = ("domain", "classes", "train", "val", "test", "status", "source package")
    table = [
        (
            r["name"],
            str(r["classes"]),
            str(r["train"]),
            str(r["val"]),
            str(r["test"]),
            ("cached" if r["cached"] else "installed")
            if r["installed"]
            else ("cached, package missing" if r["cached"] else "missing"),
            r["requirement"],
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    numeric = {1, 2, 3, 4}
    for row in [header, *table]:
        cells = [
            cell.rjust(w) if i in numeric else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())
    root = cache_index.cache_root()
    print(f"image size {args.image_size} px; cache: {root} (see `da3 cache list`)")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.domains.split(",") if n.strip()]
    rows = prepare(names, image_size=args.image_size, force=args.force, progress=True)
    for row in rows:
        print(f"{row['name']:<10} {row['status']:<7} {row['seconds']:6.1f} s  {row['path']}")
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def run_cache_list(args: argparse.Namespace) -> int:
    root = cache_index.cache_root()
    entries = cache_index.list_entries(root)
    if not entries:
        print(f"the cache is empty ({root})")
        return 0
    rows = [("entry", "images", "px", "MiB", "age", "source")]
    for e in entries:
        rows.append(
            (
                e.key,
                str(e.images or "-"),
                str(e.image_size or "-"),
                _mib(e.bytes),
                cache_index.age(e.modified),
                (e.source or "-") + (" (gone)" if e.source_missing else ""),
            )
        )
    print(text_table(rows, left=(0, 5)))
    total = sum(e.bytes for e in entries)
    print(f"{len(entries)} entries, {_mib(total)} MiB in {root}; `da3 cache clear` removes them")
    return 0


def run_cache_clear(args: argparse.Namespace) -> int:
    root = cache_index.cache_root()
    entries = cache_index.list_entries(root)
    if args.entries:
        entries, unmatched = cache_index.select(entries, args.entries)
        if unmatched:
            raise Da3Error(
                f"no cache entry for {', '.join(map(repr, unmatched))} in {root} "
                "(see `da3 cache list`)"
            )
    if args.missing:
        entries = [e for e in entries if e.source_missing]
    freed = cache_index.remove(entries)
    print(f"removed {len(entries)} cache entries ({_mib(freed)} MiB) from {root}")
    return 0
