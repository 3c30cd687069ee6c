"""A fleet learns a domain together (issue #19): federated DA3 against pooled and alone.

    python benchmarks/federated.py [--domains digits,clothing] [--partitions by-class:3,iid]
                                   [--clients 8] [--rounds 10] [--out federated]

Per domain, under the quick protocol of ``da3 bench`` (EfficientNet-Lite0 ImageNet, 64 px,
batch 32, seed 0, augmented):

* **pooled**: DA3 trained on all the training images in one place (``da3 train``, 3 epochs,
  best epoch by validation);
* **federated**, per partition: ``da3 federate`` in Flower's simulation engine, ``--clients``
  devices each holding its shard, ``--rounds`` rounds of ``--local-epochs`` local epochs
  (each device's loss over every class or its own, ``--local-classes``; its learning rate decaying
  over the whole run, ``--schedule``), FedAvg (or FedAvgM, ``--server-momentum``,
  ``--server-lr``; FedProx's term on the devices, ``--proximal-mu``); the global
  domain's test accuracy after every round, and the bytes each client receives and sends per
  round (protobuf content of Flower's messages, counted by the server);
* **alone**, per partition: each client trains DA3 on its own shard only, the same local
  training as in the fleet (the quick protocol's 3 epochs, no validation on the device), and
  is scored on the whole test split; the mean and the range over clients.

Bytes of ``finetune``: the tensors a fine-tuned model's client would send each round (every
backbone tensor and the head), counted on the model.

Writes benchmarks/results/<out>.{json,md} and <out>.png.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from da3.bench.common import header, run_info, save
from da3.bench.run import PRESETS
from da3.federated import FederateSettings, federate, partition_indices
from da3.federated.client import build_domain
from da3.train import evaluate, fit
from da3.training import TrainSettings, train_domain

FLEET_KEYS = ("local_epochs", "local_classes", "schedule", "server_momentum", "server_lr")
FLEET_KEYS += ("proximal_mu", "head_calibration")
RESULTS = Path(__file__).resolve().parent / "results"
KiB = 1024


def protocol() -> dict:
    return dict(PRESETS["quick"]["accuracy"])


def pooled(domain: str, proto: dict, store: Path) -> dict:
    settings = TrainSettings(
        domain=f"{Path(domain).name}-pooled", data=domain, method="da3", **proto
    )
    t0 = time.perf_counter()
    result = train_domain(
        settings, store, overwrite=True, progress=False, checkpoints=False, plot=False
    )
    return {
        "test_accuracy": result.metrics["test_accuracy"],
        "best_epoch": result.metrics["best_epoch"],
        "seconds": time.perf_counter() - t0,
    }


def alone(domain: str, proto: dict, clients: int, partition: str) -> dict:
    """Each client's DA3 trained on its own shard only, scored on the whole test split."""
    fleet = FederateSettings.from_values(
        {
            **proto,
            "domain": f"{Path(domain).name}-alone",
            "data": domain,
            "clients": clients,
            "local_epochs": proto["epochs"],
        }
    )
    t = fleet.train
    model, dom, data = build_domain(fleet)
    start = {k: v.clone() for k, v in dom.model.domain_state().items()}
    shards = partition_indices(data.train.labels, clients, partition, t.seed)
    accuracies = []
    t0 = time.perf_counter()
    for i, shard in enumerate(shards):
        dom.model.load_domain_state(start)
        idx = torch.from_numpy(shard)
        subset = getattr(data.train.images, "subset", None)
        images = data.train.images[idx] if subset is None else subset(idx)
        tc = replace(t.train_config(), seed=t.seed * 1_000_003 + i)
        empty = torch.zeros((0, *images.shape[1:]), dtype=torch.uint8)
        fit(
            dom.model,
            images,
            data.train.labels[idx],
            empty,
            torch.zeros(0, dtype=torch.long),
            model.preprocess,
            t.config(),
            tc,
            progress=False,
        )
        test = evaluate(dom.model, data.test.images, data.test.labels, model.preprocess, 64)
        accuracies.append(test["accuracy"])
        print(f"  alone {domain} {partition} client {i}: test {test['accuracy']:.4f}", flush=True)
    return {
        "mean_test_accuracy": sum(accuracies) / len(accuracies),
        "min_test_accuracy": min(accuracies),
        "max_test_accuracy": max(accuracies),
        "client_test_accuracy": accuracies,
        "shard_images": [len(s) for s in shards],
        "seconds": time.perf_counter() - t0,
    }


def federated(
    domain: str,
    proto: dict,
    clients: int,
    rounds: int,
    partition: str,
    store,
    fleet: dict,
) -> dict:
    """``fleet``: the fleet's own settings (local_epochs, local_classes, schedule,
    server_momentum, server_lr, proximal_mu)."""
    values = {**proto, "epochs": None}
    settings = FederateSettings.from_values(
        {
            **values,
            "domain": f"{Path(domain).name}-fleet-{partition.replace(':', '')}",
            "data": domain,
            "clients": clients,
            "rounds": rounds,
            "partition": partition,
            **fleet,
        }
    )
    t0 = time.perf_counter()
    run = federate(settings, store, overwrite=True, echo=lambda line: print(f"  {line}"))
    return {
        "test_accuracy": run.metrics["test_accuracy"],
        "calibration": run.calibration,
        "round_test_accuracy": [r["test_accuracy"] for r in run.rounds],
        "traffic": run.traffic,
        "rounds": [
            {k: v for k, v in r.items() if k not in ("client_train_loss",)} for r in run.rounds
        ],
        "seconds": time.perf_counter() - t0,
    }


def server_words(payload: dict) -> str:
    """The server's update and the devices' proximal term, in words."""
    m, lr = payload.get("server_momentum", 0.0), payload.get("server_lr", 1.0)
    words = f"FedAvgM (server momentum {m}, learning rate {lr}) " if m or lr != 1.0 else "FedAvg "
    mu, rank = payload.get("proximal_mu", 0.0), payload.get("head_calibration", 0)
    words += f"with FedProx's term (mu {mu}) " if mu else ""
    return words + (f"then the head calibrated (rank {rank}) " if rank else "")


def markdown(info: dict, payload: dict) -> str:
    p = payload["protocol"]
    out = header(
        info,
        "A fleet learns a domain together: federated DA3 on Flower",
        f"- protocol: quick ({p['backbone']} {p['weights']}, {p['image_size']} px, batch "
        f"{p['batch_size']}, seed {p['seed']}); pooled: {p['epochs']} epochs; fleet: "
        f"{payload['clients']} clients, {payload['rounds']} rounds of "
        f"{payload.get('local_epochs', 1)} local epoch(s), each device's loss over "
        f"{payload.get('local_classes', 'all')} classes, learning rate decayed over "
        f"{'the whole run' if payload.get('schedule', 'round') == 'rounds' else 'each round'}, "
        + server_words(payload)
        + f"(Flower {payload['flwr']}, simulation engine); alone: each client on its own shard, "
        f"{p['epochs']} epochs\n",
    )
    out += (
        "| domain | partition | federated (the saved domain) | pooled DA3 | federated - pooled "
        "| clients alone: mean (min-max) |\n|---|---|---|---|---|---|\n"
    )
    for r in payload["records"]:
        a, fed, pool = r["alone"], r["federated"]["test_accuracy"], r["pooled"]
        out += f"| {r['domain']} | {r['partition']} | {fed:.3f} | "
        if pool is None:  # --fleet-only
            out += "- | - | - |\n"
            continue
        out += (
            f"{pool['test_accuracy']:.3f} | {100 * (fed - pool['test_accuracy']):+.1f} pt | "
            f"{a['mean_test_accuracy']:.3f} ({a['min_test_accuracy']:.3f}-"
            f"{a['max_test_accuracy']:.3f}) |\n"
        )
    out += "\nTest top-1 on the whole test split.\n\n"
    t = payload["records"][0]["federated"]["traffic"]
    out += (
        "| per client per round | da3 | finetune |\n|---|---|---|\n"
        f"| tensors (each way) | {t['domain_state_bytes'] / KiB:.0f} KiB | "
        f"{t['finetune_state_bytes'] / KiB:.0f} KiB |\n"
        f"| message received (server to client, measured) | "
        f"{t['down_bytes_per_client_round'] / KiB:.0f} KiB | - |\n"
        f"| message sent (client to server, measured) | "
        f"{t['up_bytes_per_client_round'] / KiB:.0f} KiB | - |\n\n"
        f"A fine-tuned model's state is {t['finetune_state_bytes'] / t['domain_state_bytes']:.0f}x "
        "DA3's. Messages: Flower's protobuf content (tensors as .npy, names, the run's "
        "settings), counted by the ServerApp.\n\n"
        "Test accuracy of the global domain per round (round 0: before training):\n\n"
    )
    for r in payload["records"]:
        accs = " ".join(f"{a:.3f}" for a in r["federated"]["round_test_accuracy"])
        cal = r["federated"].get("calibration")
        after = (
            f"; head calibrated: {cal['test_accuracy']:.3f} ({cal['classes']} classes, "
            f"{max(cal['up_bytes'].values()) / KiB:.0f} KiB sent per client, once)"
            if cal
            else ""
        )
        out += f"- {r['domain']} {r['partition']}: {accs}{after}\n"
    return out


def plot(payload: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, r in enumerate(payload["records"]):
        accs = r["federated"]["round_test_accuracy"]
        line = ax.plot(range(len(accs)), accs, "o-", label=f"{r['domain']} {r['partition']}")[0]
        if i % len(payload["partitions"]) == 0 and r["pooled"] is not None:
            ax.axhline(
                r["pooled"]["test_accuracy"],
                color=line.get_color(),
                linestyle=":",
                label=f"{r['domain']} pooled",
            )
    ax.set_xlabel("round"), ax.set_ylabel("test top-1 (global domain)"), ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def merge(out: str, parts: list[str]) -> None:
    from da3.io import read_json

    payload = read_json(RESULTS / f"{out}.json")
    infos = [payload["info"]]
    for name in parts:
        other = read_json(RESULTS / f"{name}.json")
        same = ("protocol", "clients", "rounds", "flwr")
        if any(other[k] != payload[k] for k in same) or any(
            other.get(k, d) != payload.get(k, d)
            for k, d in (
                ("local_epochs", 1),
                ("local_classes", "all"),
                ("schedule", "round"),
                ("server_momentum", 0.0),
                ("server_lr", 1.0),
                ("proximal_mu", 0.0),
                ("head_calibration", 0),
            )
        ):
            raise SystemExit(f"{name}.json: another protocol than {out}.json's")
        done = {(r["domain"], r["partition"]) for r in other["records"]}
        payload["records"] = [
            r for r in payload["records"] if (r["domain"], r["partition"]) not in done
        ] + other["records"]
        infos.append(other["info"])
    info = dict(infos[0])
    info["command"] = [
        i["command"] if isinstance(i["command"], str) else i["command"][0] for i in infos
    ]
    payload["info"] = info
    save(RESULTS, out, payload, markdown(info, payload))
    plot(payload, RESULTS / f"{out}.png")


def main() -> None:
    import flwr

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", default="digits,clothing")
    ap.add_argument("--partitions", default="by-class:3,iid")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", default="federated")
    ap.add_argument("--local-epochs", type=int, default=1, help="each client's, per round")
    ap.add_argument(
        "--local-classes",
        default="all",
        choices=["own", "all"],
        help="each device's loss over all classes (default) or its own only",
    )
    ap.add_argument(
        "--schedule",
        default="rounds",
        choices=["rounds", "round"],
        help="the devices' learning rate decays over the whole run (default) or each round "
        "(before: round)",
    )
    ap.add_argument(
        "--server-momentum",
        type=float,
        default=0.0,
        help="the server's update: FedAvgM with this momentum (default 0: FedAvg)",
    )
    ap.add_argument(
        "--server-lr", type=float, default=1.0, help="the server's update: FedAvgM's rate"
    )
    ap.add_argument(
        "--proximal-mu",
        type=float,
        default=0.0,
        help="FedProx's term on each device's loss (default 0: none)",
    )
    ap.add_argument(
        "--calibrate-head",
        type=int,
        default=0,
        dest="head_calibration",
        help="rank of the devices' feature statistics the head is calibrated on after the "
        "rounds (default 0: off)",
    )
    ap.add_argument(
        "--fleet-only", action="store_true", help="no pooled and alone baselines (a variant)"
    )
    ap.add_argument("--seed", type=int, help="instead of the protocol's (0): init, shards, order")
    ap.add_argument("--image-size", type=int, help="instead of the protocol's (a smoke run)")
    ap.add_argument("--weights", help="instead of the protocol's (a smoke run: none)")
    ap.add_argument(
        "--merge",
        metavar="NAME,...",
        help="no training: add the records of results/NAME.json (runs of other domains under "
        "the same protocol, e.g. in a second process) to results/<out>.json and rewrite it",
    )
    args = ap.parse_args()
    if args.merge:
        merge(args.out, args.merge.split(","))
        return
    info = run_info()
    proto = protocol()
    if args.seed is not None:
        proto["seed"] = args.seed
    if args.image_size:
        proto["image_size"] = args.image_size
    if args.weights:
        proto["weights"] = args.weights
    payload = {
        "protocol": proto,
        "clients": args.clients,
        "rounds": args.rounds,
        "local_epochs": args.local_epochs,
        "local_classes": args.local_classes,
        "schedule": args.schedule,
        "server_momentum": args.server_momentum,
        "server_lr": args.server_lr,
        "proximal_mu": args.proximal_mu,
        "head_calibration": args.head_calibration,
        "partitions": args.partitions.split(","),
        "flwr": flwr.__version__,
        "records": [],
    }
    with tempfile.TemporaryDirectory(prefix="da3-federated-") as store:
        for domain in args.domains.split(","):
            base = None if args.fleet_only else pooled(domain, proto, Path(store))
            if base is not None:
                print(f"{domain} pooled: test {base['test_accuracy']:.4f}", flush=True)
            for partition in payload["partitions"]:
                fed = federated(
                    domain,
                    proto,
                    args.clients,
                    args.rounds,
                    partition,
                    store,
                    {k: payload[k] for k in FLEET_KEYS},
                )
                own = None if args.fleet_only else alone(domain, proto, args.clients, partition)
                print(f"{domain} {partition}: federated {fed['test_accuracy']:.4f}", flush=True)
                payload["records"].append(
                    {
                        "domain": domain,
                        "partition": partition,
                        "pooled": base,
                        "federated": fed,
                        "alone": own,
                    }
                )
                payload["info"] = info
                save(RESULTS, args.out, payload, markdown(info, payload))  # after each, in case
    plot(payload, RESULTS / f"{args.out}.png")


if __name__ == "__main__":
    main()
