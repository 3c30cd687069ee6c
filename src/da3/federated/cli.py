"""``da3 federate``: a simulated fleet learns a domain (or writes the Flower App that runs one
across real SuperNodes). Parses and prints; the work is :func:`da3.federated.federate`."""

from __future__ import annotations

import os
from pathlib import Path

FLEET_FLAGS = (
    "clients",
    "rounds",
    "partition",
    "local_epochs",
    "min_clients",
    "local_classes",
    "schedule",
    "server_momentum",
    "server_lr",
    "proximal_mu",
    "head_calibration",
)
TRAIN_FLAGS = ("domain", "data", "method", "backbone", "weights", "image_size", "batch_size")
TRAIN_FLAGS += ("seed", "device")


def register(commands) -> None:
    p = commands.add_parser(
        "federate",
        help="learn a domain across a fleet of devices (federated averaging on Flower)",
        description="Split the domain's training images among --clients simulated devices, "
        "run --rounds rounds of federated averaging (Flower's FedAvg, weighted by each "
        "device's images) of the domain's own state only (the frozen backbone never "
        "travels), evaluate the global domain on the test split after each round, and save "
        "it as an ordinary domain (da3 eval/predict/export use it). Runs in Flower's "
        "simulation engine; --flower-app DIR writes the Flower App for real SuperNodes "
        "instead. The run's settings, per-round history and rounds.png go to "
        "STORE/runs/NAME/.",
    )
    p.add_argument("--domain", required=True, help="name of the new domain")
    p.add_argument(
        "--data",
        required=True,
        help="benchmark domain (see `da3 data list`) or a folder with one sub-folder per class",
    )
    p.add_argument("--clients", type=int, default=2, help="devices of the fleet (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of averaging (default 3)")
    p.add_argument("--method", help="method (default da3; bias, tinytl, udta, linear, finetune)")
    p.add_argument(
        "--partition",
        default="iid",
        help="how the training images are shared: iid, by-class[:K] (each device sees K "
        "classes, default 2), dirichlet:ALPHA (default iid)",
    )
    p.add_argument(
        "--local-epochs",
        type=int,
        default=1,
        dest="local_epochs",
        help="epochs each device trains per round (default 1)",
    )
    p.add_argument(
        "--local-classes",
        dest="local_classes",
        help="the classes each device's loss reads: all (default) or own (only the ones it "
        "has images of; see docs/benchmark.md for when it helps)",
    )
    p.add_argument(
        "--schedule",
        help="the devices' learning rate: rounds (one decay over the whole run; default) or "
        "round (the decay starts over every round)",
    )
    p.add_argument(
        "--server-momentum",
        type=float,
        dest="server_momentum",
        help="momentum of the server's update (Flower's FedAvgM; default 0: FedAvg)",
    )
    p.add_argument(
        "--server-lr",
        type=float,
        dest="server_lr",
        help="learning rate of the server's update (FedAvgM; default 1)",
    )
    p.add_argument(
        "--proximal-mu",
        type=float,
        dest="proximal_mu",
        help="FedProx: each device's loss adds MU/2 times the squared distance of its state "
        "from the global one (default 0: none)",
    )
    p.add_argument(
        "--calibrate-head",
        type=int,
        dest="head_calibration",
        metavar="RANK",
        help="after the last round, each device sends per-class feature statistics (mean "
        "and RANK principal directions) and the server re-fits the head on features drawn "
        "from them (CCVR; helps when devices hold few classes; 16 is a good rank; default "
        "0: off)",
    )
    p.add_argument(
        "--min-clients",
        type=int,
        default=0,
        dest="min_clients",
        help="the fewest devices a round may end with; a device that dies mid-round is "
        "left out of the average (default 0: all of them)",
    )
    p.add_argument("--backbone", help="backbone (default efficientnet_lite0)")
    p.add_argument("--weights", help="imagenet or none (default imagenet)")
    p.add_argument("--image-size", type=int, dest="image_size", help="pixels (default 96)")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="(default 32)")
    p.add_argument("--seed", type=int, help="seed of init, partition, shuffling (default 0)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="(default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing domain")
    p.add_argument(
        "--flower-app",
        type=Path,
        metavar="DIR",
        dest="flower_app",
        help="write the Flower App for a deployment (SuperLink, SuperNodes, flwr run) into "
        "DIR and print the commands that run it, instead of simulating",
    )
    p.add_argument("--quiet", action="store_true", help="only the result lines")
    p.add_argument("--verbose", action="store_true", help="Flower's and Ray's log lines too")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="method settings")
    p.add_argument(
        "--store",
        default=os.environ.get("DA3_STORE", "da3-store"),
        help="folder of domain files (default: $DA3_STORE or ./da3-store)",
    )
    p.set_defaults(run=run_federate)


def settings_from_args(args):
    from da3.data import BENCHMARK_DOMAINS
    from da3.federated.settings import FederateSettings
    from da3.training import parse_overrides

    values = {k: getattr(args, k) for k in FLEET_FLAGS + TRAIN_FLAGS}
    values = {k: v for k, v in values.items() if v is not None}
    if values["data"] not in BENCHMARK_DOMAINS and Path(values["data"]).exists():
        values["data"] = str(Path(values["data"]).resolve())  # eval works from anywhere
    values |= parse_overrides(args.overrides)
    return FederateSettings.from_values(values)


def run_federate(args) -> int:
    from da3.federated.run import check_run

    settings = settings_from_args(args)
    if args.flower_app is not None:
        from da3.federated.deploy import commands, write_flower_app

        check_run(settings, args.store, args.overwrite)
        path = write_flower_app(args.flower_app, settings, args.store, args.overwrite)
        print(f"wrote {path}: the Flower App of this run. Start, each in its own terminal:")
        for line in commands(args.flower_app.resolve(), settings.clients):
            print(f"  {line}")
        return 0
    from da3.federated import federate

    say = (lambda line: None) if args.quiet else print
    run = federate(settings, args.store, overwrite=args.overwrite, echo=say, verbose=args.verbose)
    if args.quiet:
        t = run.traffic
        print(
            f"domain {run.name}: test {run.metrics['test_accuracy']:.4f} after "
            f"{settings.rounds} rounds; per client per round "
            f"{t['down_bytes_per_client_round'] / 1024:.1f} KiB received + "
            f"{t['up_bytes_per_client_round'] / 1024:.1f} KiB sent -> {run.file}"
        )
    print(f"run folder: {run.run_dir} (config.yaml, history.json, rounds.png)")
    return 0
