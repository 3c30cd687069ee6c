"""The ServerApp: federated averaging of a domain's own state, with Flower's FedAvg(M).

Each round, Flower's :class:`~flwr.serverapp.strategy.FedAvg` sends the global domain state
(an ArrayRecord of the domain's tensors, nothing of the backbone) and the run's settings to
every connected client, and averages the states they send back weighted by ``num-examples``
(each client's number of training images): exact FedAvg (with ``--server-momentum`` or
``--server-lr``, the server moves the global state as Flower's FedAvgM does: momentum on
the average's change). :class:`FleetFedAvg` adds three things to it and nothing else:

* the traffic, counted: the bytes of every message's content as Flower serialises it
  (protobuf), per client and round, in both directions, and the tensors' own bytes;
* the fleet's size: round 1 waits for ``clients`` SuperNodes; later rounds go on with the
  ones still there, down to ``min_clients`` (a client that dies mid-round is left out of
  that round's average); fewer replies than that stop the run with a one-line error;
* a refusal of any reply whose tensors are not exactly the domain's (names, shapes).

After each round the server evaluates the global domain on the domain's test split. At the
end it saves an ordinary domain file (what ``da3 train`` saves; ``da3 eval``, ``predict``
and ``export`` use it as it is) and the run folder: ``config.yaml``, ``history.json`` (per
round: accuracy, clients, bytes) and ``rounds.png`` (accuracy against rounds).

:func:`serve` is the whole server; the simulation (:func:`da3.federated.federate`) and the
deployment (``server_app``, started by ``flwr run``) both call it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvgM

from da3.errors import Da3Error
from da3.federated.client import (
    ARRAYS,
    CONFIG,
    STATS,
    STATS_ACTION,
    build_domain,
    settings_record,
    state_from_arrays,
)
from da3.federated.settings import FederateSettings

KiB = 1024
STATS_KEYS = {"classes", "counts", "means", "components", "residual"}
REPLY_TIMEOUT = 3600.0  # seconds a round waits for replies (Flower's strategies' default)


def content_bytes(message: Message) -> int:
    """Bytes of a message's content as Flower serialises it (protobuf)."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(message.content).ByteSize()


def tensor_bytes(arrays: ArrayRecord) -> int:
    """Bytes of the tensors' values alone (no names, shapes or framing)."""
    import numpy as np

    return int(sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in arrays.values()))


def answered(replies: Iterable[Message], asked: int, quorum: int, what: str):
    """(valid, failed) replies; a one-line Da3Error naming ``what`` when fewer than
    ``quorum`` of the ``asked`` clients answered."""
    replies = list(replies)
    valid = [m for m in replies if not m.has_error()]
    failed = [m for m in replies if m.has_error()]
    if len(valid) < quorum:
        why = f": {failed[0].error.reason.splitlines()[-1][:200]}" if failed else ""
        raise Da3Error(
            f"{what}: {len(valid)} of {asked} clients answered, fewer than the {quorum} the "
            f"run needs (--min-clients){why}"
        )
    return valid, failed


class FleetFedAvg(FedAvgM):
    """FedAvg over every connected client, counting the traffic (see the module docstring);
    with ``server_momentum`` or ``server_lr`` set, FedAvgM's server update."""

    def __init__(self, settings: FederateSettings, expected: dict[str, tuple]) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,  # the server evaluates the global domain on test itself
            min_train_nodes=settings.clients,
            min_available_nodes=settings.clients,
            server_learning_rate=settings.server_lr,
            server_momentum=settings.server_momentum,
        )
        self.settings = settings
        self.expected = expected  # name -> (shape, dtype) of the domain's own tensors
        self.rounds: dict[int, dict] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # round 1 waits for the whole fleet; later rounds go on with those still there
        need = self.settings.clients if server_round == 1 else self.settings.quorum
        self.min_train_nodes = self.min_available_nodes = need
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.rounds[server_round] = {
            "round": server_round,
            "clients_asked": len(messages),
            "started": time.perf_counter(),
            "down_bytes": {str(m.metadata.dst_node_id): content_bytes(m) for m in messages},
            "down_tensor_bytes": tensor_bytes(arrays),
        }
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        record = self.rounds[server_round]
        valid, failed = answered(
            replies, record["clients_asked"], self.settings.quorum, f"round {server_round}"
        )
        record["clients_replied"] = len(valid)
        record["failures"] = [m.error.reason[:200] for m in failed]
        for m in valid:
            arrays = m.content[ARRAYS]
            got = {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}
            if got != self.expected:
                raise Da3Error(
                    f"round {server_round}: node {m.metadata.src_node_id} sent tensors that "
                    "are not the domain's own (names, shapes or types differ)"
                )
        record["up_bytes"] = {str(m.metadata.src_node_id): content_bytes(m) for m in valid}
        record["up_tensor_bytes"] = tensor_bytes(valid[0].content[ARRAYS])
        record["num_examples"] = {
            str(m.metadata.src_node_id): int(m.content["metrics"]["num-examples"]) for m in valid
        }
        record["client_train_loss"] = {
            str(m.metadata.src_node_id): float(m.content["metrics"]["train-loss"]) for m in valid
        }
        return super().aggregate_train(server_round, valid)


def finetune_state_bytes(settings: FederateSettings, num_classes: int) -> int:
    """Bytes of the state a fine-tuned model would send each round: every tensor of the
    backbone (its architecture, random weights: the count is the same) and the head."""
    from da3.backbones import create_backbone
    from da3.memory import tensor_bytes as bytes_of
    from da3.methods import FrozenBackbone, build_model, make_config

    frozen = FrozenBackbone(create_backbone(settings.train.backbone, "none"), "stock")
    model = build_model("finetune", frozen, num_classes, make_config("finetune"))
    return bytes_of(model.domain_state().values())


def serve(
    grid: Grid,
    settings: FederateSettings,
    store,
    *,
    overwrite: bool = False,
    say: Callable[[str], None] = print,
    plot: bool = True,
) -> dict:
    """Run the federated training of ``settings`` over the clients ``grid`` reaches and save
    the domain in ``store`` (a DomainStore or its folder). Returns the run record (what
    ``history.json`` holds)."""
    from da3.domains import DomainStore, check_name

    name = check_name(settings.domain)
    store = store if isinstance(store, DomainStore) else DomainStore(store)
    with store.lock(name):
        if store.exists(name) and not overwrite:
            raise Da3Error(f"domain {name!r} exists in {store.root}; use --overwrite to replace it")
        record = _run_rounds(grid, settings, store, say)
        run_dir = store.run_dir(name)
        if plot:
            from da3.plots import plot_rounds

            plot_rounds(
                record["rounds"],
                run_dir / "rounds.png",
                title=f"{name} ({settings.method}, {settings.clients} clients, "
                f"{settings.partition})",
            )
        from da3.io import write_json

        write_json(run_dir / "history.json", record)
    return record


def _run_rounds(grid: Grid, settings: FederateSettings, store, say) -> dict:
    import yaml

    from da3.federated.partition import check_partition, parse_partition
    from da3.io import write_text
    from da3.train import evaluate

    t = settings.train
    model, domain, data = build_domain(settings)
    check_partition(
        parse_partition(settings.partition),
        settings.clients,
        data.train.class_counts(data.num_classes),
        data.classes,
    )
    run_dir = store.run_dir(settings.domain)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise Da3Error(f"{run_dir}: cannot write here ({err.strerror})") from None
    write_text(run_dir / "config.yaml", yaml.safe_dump(settings.to_values(), sort_keys=False))
    state = {k: v.detach().clone() for k, v in domain.model.domain_state().items()}
    expected = {k: (tuple(v.shape), str(v.numpy().dtype)) for k, v in state.items()}
    strategy = FleetFedAvg(settings, expected)
    finetune_bytes = finetune_state_bytes(settings, data.num_classes)
    evals: dict[int, dict] = {}
    t_start = time.perf_counter()

    def global_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        domain.model.load_domain_state(state_from_arrays(arrays, domain.model.domain_state()))
        test = evaluate(
            domain.model, data.test.images, data.test.labels, model.preprocess, 64, t.device
        )
        evals[server_round] = test
        r = strategy.rounds.get(server_round)
        if r is None:
            say(f"round 0 (the initial domain): test accuracy {test['accuracy']:.4f}")
        else:
            r["seconds"] = time.perf_counter() - r.pop("started")
            down = max(r["down_bytes"].values())
            up = max(r["up_bytes"].values())
            say(
                f"round {server_round}/{settings.rounds}: test accuracy {test['accuracy']:.4f}, "
                f"{r['clients_replied']}/{r['clients_asked']} clients, per client "
                f"{down / KiB:.1f} KiB received + {up / KiB:.1f} KiB sent "
                f"(fine-tuning: {finetune_bytes / KiB:.0f} KiB each way), {r['seconds']:.1f} s"
            )
        return MetricRecord({"accuracy": test["accuracy"], "loss": test["loss"]})

    state_bytes = sum(v.numel() * v.element_size() for v in state.values())
    say(
        f"federated {settings.method}: {settings.clients} clients, {settings.rounds} rounds of "
        f"{settings.local_epochs} local epoch(s), partition {settings.partition}, "
        f"local loss over {settings.local_classes} classes, learning rate decayed over "
        f"{'the whole run' if settings.schedule == 'rounds' else 'each round'}, "
        + (
            f"FedAvgM (server momentum {settings.server_momentum:g}, learning rate "
            f"{settings.server_lr:g}); "
            if strategy.server_opt
            else "FedAvg; "
        )
        + (
            f"FedProx term mu {settings.proximal_mu:g} on the devices; "
            if settings.proximal_mu
            else ""
        )
        + (
            f"then the head calibrated on the devices' feature statistics (rank "
            f"{settings.head_calibration}); "
            if settings.head_calibration
            else ""
        )
        + f"{len(state)} tensors travel ({state_bytes / KiB:.1f} KiB), "
        "never the backbone"
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(state),
        num_rounds=settings.rounds,
        train_config=settings_record(settings),
        evaluate_fn=global_evaluate,
        timeout=REPLY_TIMEOUT,
    )
    final = result.arrays if len(result.arrays) else ArrayRecord(state)
    domain.model.load_domain_state(state_from_arrays(final, domain.model.domain_state()))
    test = evals[settings.rounds]
    calibration = None
    if settings.head_calibration:
        calibration = _calibrate_head(grid, settings, final, domain)
        test = evaluate(
            domain.model, data.test.images, data.test.labels, model.preprocess, 64, t.device
        )
        calibration["test_accuracy_before"] = evals[settings.rounds]["accuracy"]
        calibration["test_accuracy"] = test["accuracy"]
        say(
            f"head calibrated on {calibration['classes']} classes' virtual features from "
            f"{calibration['clients_replied']} clients' statistics (rank "
            f"{settings.head_calibration}, {max(calibration['up_bytes'].values()) / KiB:.1f} "
            f"KiB sent per client, once): test accuracy {test['accuracy']:.4f} (was "
            f"{calibration['test_accuracy_before']:.4f}), {calibration['seconds']:.1f} s"
        )
    val = evaluate(domain.model, data.val.images, data.val.labels, model.preprocess, 64, t.device)
    rounds = []
    for r in range(settings.rounds + 1):
        entry = {"round": r, "test_accuracy": evals[r]["accuracy"], "test_loss": evals[r]["loss"]}
        rounds.append(entry | strategy.rounds.get(r, {}))
    seconds = time.perf_counter() - t_start
    domain.metrics = {
        "val_accuracy": val["accuracy"],
        "test_accuracy": test["accuracy"],
        "best_epoch": settings.rounds,  # the last round's state is saved
        "train_seconds": seconds,
        "train_images": len(data.train),
        **{k: v for k, v in test.items() if k.startswith("gate_")},
    }
    domain.train = {k: getattr(t, k) for k in t.TRAIN_KEYS if k != "epochs"} | {
        "federated": "fedavg (flower)",
        "clients": settings.clients,
        "rounds": settings.rounds,
        "partition": settings.partition,
        "local_epochs": settings.local_epochs,
        "local_classes": settings.local_classes,
        "schedule": settings.schedule,
        "server_momentum": settings.server_momentum,
        "server_lr": settings.server_lr,
        "proximal_mu": settings.proximal_mu,
        "head_calibration": settings.head_calibration,
        "data": t.data,
    }
    model.save(settings.domain, store)
    traffic = {
        "domain_state_bytes": state_bytes,
        "finetune_state_bytes": finetune_bytes,
        "down_bytes_per_client_round": max(rounds[1]["down_bytes"].values()),
        "up_bytes_per_client_round": max(rounds[1]["up_bytes"].values()),
        "total_bytes": sum(
            sum(r.get("down_bytes", {}).values()) + sum(r.get("up_bytes", {}).values())
            for r in [*rounds, *([calibration] if calibration else [])]
        ),
    }
    say(
        f"domain {settings.domain}: test {test['accuracy']:.4f} after {settings.rounds} rounds, "
        f"val {val['accuracy']:.4f}, {seconds:.0f} s -> {store.paths(settings.domain)[0]}"
    )
    say(
        f"traffic per client per round: {traffic['down_bytes_per_client_round'] / KiB:.1f} KiB "
        f"received + {traffic['up_bytes_per_client_round'] / KiB:.1f} KiB sent; a fine-tuned "
        f"model would send {finetune_bytes / KiB:.0f} KiB each way "
        f"({finetune_bytes / state_bytes:.0f}x)"
    )
    return {
        "settings": settings.to_values(),
        "rounds": rounds,
        "metrics": domain.metrics,
        "traffic": traffic,
        "tensors": {k: list(v[0]) for k, v in expected.items()},
        "calibration": calibration,
    }


def _calibrate_head(grid: Grid, settings: FederateSettings, arrays: ArrayRecord, domain):
    """Ask every connected client for its per-class feature statistics under ``arrays``
    (the final global state) and re-fit ``domain``'s head on virtual features drawn from
    them (:mod:`da3.federated.calibrate`). Returns the record of it."""
    from flwr.app import RecordDict

    from da3.federated.calibrate import calibrate_head

    t0 = time.perf_counter()
    content = RecordDict({ARRAYS: arrays, CONFIG: settings_record(settings)})
    nodes = sorted(grid.get_node_ids())
    asked = [
        Message(content=content, message_type=f"query.{STATS_ACTION}", dst_node_id=n) for n in nodes
    ]
    down = {str(m.metadata.dst_node_id): content_bytes(m) for m in asked}
    replies = grid.send_and_receive(asked, timeout=REPLY_TIMEOUT)
    valid, _ = answered(replies, len(asked), settings.quorum, "head calibration")
    stats = []
    for m in valid:
        got = m.content[STATS].to_torch_state_dict()
        if set(got) != STATS_KEYS:
            raise Da3Error(
                f"head calibration: node {m.metadata.src_node_id} sent {sorted(got)}, not "
                "feature statistics"
            )
        stats.append(got)
    net = domain.model
    lr = domain.config.head_lr or domain.config.lr
    done = calibrate_head(net.head, stats, lr, settings.train.seed)
    return {
        **done,
        "clients_asked": len(asked),
        "clients_replied": len(valid),
        "down_bytes": down,
        "up_bytes": {str(m.metadata.src_node_id): content_bytes(m) for m in valid},
        "seconds": time.perf_counter() - t0,
    }


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """The deployment's entry (``flwr run``): settings from the run config."""
    values: dict[str, Any] = dict(context.run_config)
    store = str(values.pop("store", "") or "da3-store")
    overwrite = bool(values.pop("overwrite", False))
    settings = FederateSettings.from_values({k: v for k, v in values.items() if v != ""})
    where = Path(store).resolve()
    serve(grid, settings, where, overwrite=overwrite, say=lambda line: print(line, flush=True))
