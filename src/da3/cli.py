"""The ``da3`` command. Each area of the library registers its own sub-commands."""

from __future__ import annotations

import argparse
import sys
import warnings
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
    from da3 import commands as domain_commands
    from da3.bench import cli as bench_cli
    from da3.data import cli as data_cli
    from da3.export import cli as export_cli
    from da3.federated import cli as federated_cli

    domain_commands.register(commands)
    data_cli.register(commands)
    export_cli.register(commands)
    _register_profile(commands)
    bench_cli.register(commands)
    federated_cli.register(commands)
    return parser


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _register_profile(commands) -> None:
    p = commands.add_parser(
        "profile",
        help="measure training memory, time and FLOPs of methods side by side",
        description="Profile one training step of each method on one backbone, in one run.",
    )
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--weights", default="none", help="none, imagenet, or a weights file")
    p.add_argument("--method", default="finetune,linear,bias", help="comma-separated methods")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per method (median)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument(
        "--frozen-bits",
        default="32",
        help="the frozen backbone's weights in 32, 16 or 8 bits (lean methods; default 32)",
    )
    p.add_argument("--no-peak", action="store_true", help="skip the fresh-process peak memory")
    p.add_argument("--json", action="store_true", help="print one JSON array")
    p.set_defaults(run=_run_profile)


def _run_profile(args) -> int:
    import json

    from da3.methods import get_method
    from da3.precision import frozen_bits_value
    from da3.profile import format_table, profile_methods

    bits = frozen_bits_value(args.frozen_bits)
    methods = _csv(args.method)
    for m in methods:
        get_method(m)  # unknown names fail before any work
    if args.image_size < 32 or args.batch_size < 1 or args.steps < 1:
        raise Da3Error("--image-size must be >= 32, --batch-size and --steps >= 1")
    rows = profile_methods(
        args.backbone,
        methods,
        weights=args.weights,
        image_size=args.image_size,
        batch_size=args.batch_size,
        steps=args.steps,
        device=args.device,
        num_classes=args.num_classes,
        peak=not args.no_peak,
        frozen_bits=bits,
        progress=None if args.json else lambda msg: print(f"  {msg}", file=sys.stderr),
    )
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0


def silence_pil_warnings() -> None:
    """PIL warns about the images it reads and goes on (a header declaring more pixels than
    its limit, a TIFF tag past the end of the file); da3 refuses what matters with its own
    one-line error, so on the command line these multi-line warnings are noise."""
    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")


def main(argv: Sequence[str] | None = None) -> int:
    silence_pil_warnings()
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
    except BrokenPipeError:  # `da3 predict ... | head`: the reader has all it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
