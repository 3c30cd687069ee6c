"""DA3's dynamic gates: inference FLOPs against accuracy, and batch-1 latency.

    python benchmarks/gating.py [--domains ...] [--targets 0.8,0.65,0.55] [--gate-epochs 2]

Per domain, under the protocol of benchmarks/accuracy.py: train `da3` without gates; then, for
each FLOP target, switch gates on, start from the ungated domain's tensors, and train adaptor,
gates and head together for ``--gate-epochs`` more epochs with the budget loss. Accuracy is on
the test split; FLOPs per image are counted with torch.utils.flop_counter on the executed graph
of the whole test split (closed gates skip their branch, so they are not counted); latency is the
median wall time of batch-1 inference over ``--latency-images`` test images.

Writes benchmarks/results/<out>.{json,md} and <out>.png.
"""

from __future__ import annotations

import argparse
import time

import torch

from accuracy import train_one
from common import RESULTS, header, run_info, save
from da3.backbones import create_backbone
from da3.bench.gating import batch1_latency, executed_flops_per_image, markdown_table, plot
from da3.data import BENCHMARK_DOMAINS, load_domain
from da3.io import read_json
from da3.methods import FrozenBackbone, build_model, make_config
from da3.train import TrainConfig, evaluate, fit_domain


def ungated_da3(frozen, data, protocol, domain):
    """The ungated da3 domain: the one benchmarks/accuracy.py trained under the same
    protocol when its tensors are cached, else trained here."""
    from accuracy import STATES
    from da3.io import read_tensors

    path = STATES / f"accuracy-da3-{domain}.safetensors"
    acc = RESULTS / "accuracy.json"
    same = {k: protocol[k] for k in ("image_size", "epochs", "batch_size", "seed")}
    if path.is_file() and acc.is_file():
        old = read_json(acc)
        rec = next(
            (r for r in old["records"] if r["method"] == "da3" and r["domain"] == domain), None
        )
        if rec and all(old["protocol"].get(k) == v for k, v in same.items()):
            model = build_model("da3", frozen, len(data.classes), make_config("da3"))
            model.load_domain_state(read_tensors(path))
            return rec, model
    return train_one(frozen, "da3", {}, data, protocol)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", default=",".join(BENCHMARK_DOMAINS))
    ap.add_argument("--targets", default="0.8,0.65,0.55")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--gate-epochs", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--latency-images", type=int, default=100)
    ap.add_argument("--out", default="gating")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    targets = [float(t) for t in args.targets.split(",")]
    protocol = {
        "backbone": "efficientnet_lite0 (imagenet)",
        "image_size": args.image_size,
        "epochs": args.epochs,
        "gate_epochs": args.gate_epochs,
        "batch_size": 32,
        "seed": 0,
        "targets": targets,
    }
    path = RESULTS / f"{args.out}.json"
    records = []
    if path.is_file() and read_json(path).get("protocol") == protocol:
        records = read_json(path)["records"]
    info = run_info()
    info["threads"] = torch.get_num_threads()
    frozen = FrozenBackbone(create_backbone("efficientnet_lite0", "imagenet"))
    pre = frozen.preprocess
    t0 = time.perf_counter()
    for d in args.domains.split(","):
        if any(r["domain"] == d for r in records):
            continue
        data = load_domain(d, args.image_size)
        test = data.test
        base, ungated = ungated_da3(frozen, data, protocol, d)
        rows = [
            {
                "domain": d,
                "gate_target": None,
                "test_accuracy": base["test_accuracy"],
                "flops_per_image": executed_flops_per_image(ungated, test.images, pre),
                "latency_s": batch1_latency(ungated, test.images, pre, args.latency_images),
                "train_seconds": base["train_seconds"],
            }
        ]
        state = ungated.domain_state()
        for t in targets:
            # the head is trained already: no head-only warm-up
            config = make_config(
                "da3", {"gates": True, "gate_target": t, "head_warmup": 0.0, "head_warmup_steps": 0}
            )
            torch.manual_seed(0)
            model = build_model("da3", frozen, len(data.classes), config)
            model.load_domain_state(state, strict=False)
            tc = TrainConfig(epochs=args.gate_epochs, batch_size=32, seed=1)
            s0 = time.perf_counter()
            result = fit_domain(
                model,
                data,
                pre,
                config,
                tc,
                progress=False,
            )
            model.load_domain_state(result.best_state)
            rows.append(
                {
                    "domain": d,
                    "gate_target": t,
                    "test_accuracy": evaluate(model, test.images, test.labels, pre)["accuracy"],
                    "flops_per_image": executed_flops_per_image(model, test.images, pre),
                    "latency_s": batch1_latency(model, test.images, pre, args.latency_images),
                    "train_seconds": time.perf_counter() - s0,
                }
            )
        for r in rows:
            r["flops_fraction"] = r["flops_per_image"] / rows[0]["flops_per_image"]
            print(
                f"{d:10s} target {r['gate_target']}: acc {r['test_accuracy']:.4f}, "
                f"FLOPs {r['flops_fraction']:.3f}, batch-1 {r['latency_s'] * 1e3:.2f} ms",
                flush=True,
            )
        records += rows
        info["wall_seconds"] = round(time.perf_counter() - t0, 1)
        save(
            args.out,
            {"info": info, "protocol": protocol, "records": records},
            markdown(info, protocol, records),
        )
        plot(records, RESULTS / f"{args.out}.png")


def markdown(info, protocol, records) -> str:
    proto = ", ".join(f"{k}={v}" for k, v in protocol.items())
    return (
        header(info, "DA3 dynamic gating: FLOPs against accuracy")
        + f"Protocol: {proto}. See the docstring of benchmarks/gating.py.\n\n"
        + markdown_table(records)
        + "\n![gating curve](gating.png)\n"
    )


if __name__ == "__main__":
    main()
