"""Accuracy of each method on the five offline domains, under one protocol.

    python benchmarks/accuracy.py [--methods linear,bias,da3,finetune] [--domains ...]
                                  [--epochs 5] [--image-size 64] [--out accuracy]

Protocol (the same for every method): the ImageNet-pretrained efficientnet_lite0, frozen
where the method says so; each domain's fixed train/val/test split (da3.data) at
``--image-size`` px; ``--epochs`` epochs of batch 32, AdamW at the method's default learning
rate (its config), cosine decay to zero, random translations of up to 1/12 of the side;
seed 0; the epoch with the best validation accuracy is evaluated on the test split.

Resumable: a (method, domain) already in the results file with the same protocol and the
same method config is not run again. Writes benchmarks/results/<out>.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from common import RESULTS, header, run_info, save
from da3.backbones import create_backbone
from da3.bench.accuracy import train_one
from da3.data import BENCHMARK_DOMAINS, load_domain
from da3.io import read_json, write_tensors
from da3.methods import FrozenBackbone, make_config

STATES = RESULTS / ".states"  # trained domain tensors, reused by gating.py (git-ignored)


def markdown(
    info: dict, protocol: dict, records: list[dict], methods: list[str], domains: list[str]
) -> str:
    by = {(r["method"], r["domain"]): r for r in records}
    lines = [
        "| method | " + " | ".join(domains) + " | mean | train s (sum) | state KiB |",
        "|---" * (len(domains) + 4) + "|",
    ]
    for m in methods:
        accs = [by[(m, d)]["test_accuracy"] for d in domains if (m, d) in by]
        cells = [f"{by[(m, d)]['test_accuracy']:.4f}" if (m, d) in by else "-" for d in domains]
        mean = f"{sum(accs) / len(accs):.4f}" if len(accs) == len(domains) else "-"
        secs = sum(by[(m, d)]["train_seconds"] for d in domains if (m, d) in by)
        state = [by[(m, d)]["domain_state_bytes"] for d in domains if (m, d) in by]
        kib = f"{sum(state) / len(state) / 1024:.0f}" if state else "-"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {mean} | {secs:.0f} | {kib} |")
    proto = ", ".join(f"{k}={v}" for k, v in protocol.items())
    return (
        header(info, "Accuracy on the offline domains (test top-1)")
        + f"Protocol: {proto}. See the docstring of benchmarks/accuracy.py.\n\n"
        + "\n".join(lines)
        + "\n\nstate KiB: mean size of a domain's own tensors. train s: wall time of the "
        "training in these runs, which shared the CPU with other jobs to a varying degree: not "
        "a speed comparison (the step-time comparison is in the profile tables, measured "
        "interleaved in one run).\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="linear,bias,da3,finetune")
    ap.add_argument("--domains", default=",".join(BENCHMARK_DOMAINS))
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="accuracy")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.key=value",
        help="method config override, e.g. da3.reduction=2",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument(
        "--merge",
        default="",
        help="comma-separated other result files (same protocol, e.g. from a parallel run) "
        "to include in a combined table, written as <out>_table.{json,md}",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods, domains = args.methods.split(","), args.domains.split(",")
    overrides: dict[str, dict] = {}
    for item in args.set:
        key, value = item.split("=", 1)
        m, k = key.split(".", 1)
        overrides.setdefault(m, {})[k] = value
    protocol = {
        "backbone": "efficientnet_lite0 (imagenet)",
        "image_size": args.image_size,
        "epochs": args.epochs,
        "batch_size": 32,
        "seed": args.seed,
        "overrides": overrides,
    }
    path = RESULTS / f"{args.out}.json"
    records = []
    if path.is_file():
        old = read_json(path)
        if old.get("protocol") == protocol:
            records = old["records"]
    # a record made under another config of its method (a changed default) is redone
    configs = {m: dataclasses.asdict(make_config(m, overrides.get(m))) for m in methods}
    records = [
        r for r in records if r["method"] not in configs or r["config"] == configs[r["method"]]
    ]
    merged = []
    for other in filter(None, args.merge.split(",")):
        data = read_json(RESULTS / f"{other}.json")
        if data.get("protocol") != protocol:
            raise SystemExit(f"{other}.json was made under another protocol")
        merged += data["records"]
    info = run_info()
    info["threads"] = torch.get_num_threads()
    if merged:
        table_methods = list(dict.fromkeys([*methods, *(r["method"] for r in merged)]))
        save(
            args.out + "_table",
            {"info": info, "protocol": protocol, "records": records + merged},
            markdown(info, protocol, records + merged, table_methods, domains),
        )
        return
    frozen = FrozenBackbone(create_backbone("efficientnet_lite0", "imagenet"))
    t0 = time.perf_counter()
    for d in domains:
        data = load_domain(d, args.image_size)
        for m in methods:
            if any(r["method"] == m and r["domain"] == d for r in records):
                continue
            rec, model = train_one(frozen, m, overrides.get(m, {}), data, protocol)
            if m == "da3":
                write_tensors(
                    STATES / f"{args.out}-{m}-{d}.safetensors",
                    model.domain_state(),
                    {"protocol": protocol},
                )
            records.append({"method": m, "domain": d, **rec})
            print(
                f"{m:10s} {d:10s} test {rec['test_accuracy']:.4f} ({rec['train_seconds']:.0f}s)",
                flush=True,
            )
            info["wall_seconds"] = round(time.perf_counter() - t0, 1)
            save(
                args.out,
                {"info": info, "protocol": protocol, "records": records},
                markdown(info, protocol, records, methods, domains),
            )


if __name__ == "__main__":
    main()
