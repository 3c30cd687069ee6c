"""Training memory and time of every method, per backbone, one `da3 profile` run each.

    python benchmarks/profile_backbones.py [--backbones resnet50,...] [--steps 5]

Writes benchmarks/results/profile_<backbone>.{json,md}. Timings are medians over the
steps with methods interleaved; compare them as ratios within one table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from da3.bench.common import header, run_info, save
from da3.profile import format_table, profile_methods

RESULTS = Path(__file__).resolve().parent / "results"

DEFAULT_METHODS = "finetune,linear,bias,da3"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="resnet50,mobilenet_v2,efficientnet_lite0")
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    methods = args.methods.split(",")
    for backbone in args.backbones.split(","):
        t0 = time.perf_counter()
        info = run_info(args.device)
        weights = "imagenet" if backbone == "efficientnet_lite0" else "none"
        rows = profile_methods(
            backbone,
            methods,
            weights=weights,
            image_size=args.image_size,
            batch_size=args.batch_size,
            steps=args.steps,
            device=args.device,
            progress=lambda m, b=backbone: print(f"  {b}: {m}", flush=True),
        )
        info["wall_seconds"] = round(time.perf_counter() - t0, 1)
        table = format_table(rows)
        print(table, flush=True)
        md = header(info, f"Training cost of one step: {backbone}") + (
            "Columns: trainable parameters; MiB kept for backward (saved-tensor hooks, "
            "deduplicated, parameters excluded); the analytical lean floor; peak memory of a "
            "real training step in a fresh process (minus the process before the step); "
            "median step time; inference GFLOPs per image; ratios are finetune / method.\n\n"
            f"```\n{table}\n```\n\nWall time of this run: {info['wall_seconds']} s.\n"
        )
        save(RESULTS, f"profile_{backbone}", {"info": info, "rows": rows}, md)


if __name__ == "__main__":
    main()
