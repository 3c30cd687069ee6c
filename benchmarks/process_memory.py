"""The peak memory of whole `da3 train` processes, one per method, side by side.

The `memory` stage of `da3 bench` (da3.bench.process_memory) on its own, for a subset:

    python benchmarks/process_memory.py                      # every method, Lite0 + ResNet-50
    python benchmarks/process_memory.py --methods finetune,da3,linear --backbones resnet50
    python benchmarks/process_memory.py --methods finetune,da3 --frozen-bits 8   # lean ones
    python benchmarks/process_memory.py --methods da3 --frozen-bits 8 --set optimizer=sgd

Writes benchmarks/results/process_memory.{json,md} (``--name``). ``--merge A B`` joins
results written that way (e.g. one per backbone, run one after the other) into one file, in
the form the report reads (``--name bench_quick_memory``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from da3.bench import process_memory as pm
from da3.bench.common import header, run_info, save
from da3.io import read_json
from da3.methods import list_methods


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(list_methods()))
    p.add_argument(
        "--backbones", default=",".join(b for b, _ in pm.SPEC["backbones"]), help="comma-separated"
    )
    p.add_argument(
        "--frozen-bits",
        type=int,
        default=32,
        choices=(32, 16, 8),
        help="frozen weights of the lean methods (finetune trains float32 weights)",
    )
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="settings of every run (e.g. optimizer=sgd lr=0.005 head_lr=0.005)",
    )
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp one)")
    p.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default="process_memory")
    p.add_argument("--merge", nargs="+", metavar="NAME", help="join these result files")
    args = p.parse_args()
    if args.merge:
        result = pm.merge_results([read_json(args.results / f"{n}.json") for n in args.merge])
        info = result.pop("info")
        info["command"] += f" ; {run_info('cpu')['command']}"  # the runs, then this merge
        md = header(info, "The memory a device sees: whole `da3 train` processes") + (
            pm.markdown_table(result)
        )
        save(args.results, args.name, {"info": info, **result}, md)
        return
    wanted = [b.strip() for b in args.backbones.split(",") if b.strip()]
    spec = {**pm.SPEC, "backbones": [b for b in pm.SPEC["backbones"] if b[0] in wanted]}
    if args.frozen_bits != 32:
        spec["frozen_bits"] = args.frozen_bits
    if args.set:
        spec["settings"] = args.set
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    info = run_info("cpu")
    t0 = time.perf_counter()
    result = pm.run_process_memory(methods, spec, work=args.work)
    info["stage_seconds"] = {"memory": round(time.perf_counter() - t0, 1)}
    md = header(info, "The memory a device sees: whole `da3 train` processes") + (
        pm.markdown_table(result)
    )
    save(args.results, args.name, {"info": info, **result}, md)


if __name__ == "__main__":
    main()
