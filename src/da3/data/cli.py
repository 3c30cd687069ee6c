"""``da3 data``: list the benchmark domains and prepare their caches.

da3 data list [--image-size 96]
da3 data prepare [--domains digits,clipart] [--image-size 96] [--force]
"""

from __future__ import annotations

import argparse
from typing import Any

from da3.data import BENCHMARK_DOMAINS, DEFAULT_IMAGE_SIZE, cache, describe_domains, prepare


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
    print(f"image size {args.image_size} px; cache: {cache.cache_root()}")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.domains.split(",") if n.strip()]
    rows = prepare(names, image_size=args.image_size, force=args.force, progress=True)
    for row in rows:
        print(f"{row['name']:<10} {row['status']:<7} {row['seconds']:6.1f} s  {row['path']}")
    return 0
