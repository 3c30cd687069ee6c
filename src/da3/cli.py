"""The ``da3`` command. Each area of the library registers its own sub-commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from da3 import __version__
from da3.errors import Da3Error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="da3",
        description="Memory-efficient multi-domain learning on the device.",
    )
    parser.add_argument("--version", action="version", version=f"da3 {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Imported here so that `da3 --help` stays fast and a broken area names itself.
    from da3.data import cli as data_cli

    data_cli.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except Da3Error as err:
        print(f"da3: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("da3: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
