"""A fleet on one machine: the ServerApp and ClientApp in Flower's simulation engine.

Flower's simulation engine (Ray) runs the clients as virtual SuperNodes; each gets a
``partition-id`` and ``num-partitions`` in its node config, exactly the keys a real SuperNode
is started with, so the ClientApp is the one a deployment runs. The ServerApp runs in this
process (:func:`da3.federated.server.serve`).

On a small machine the engine runs one worker process (``num_cpus`` of the whole machine per
client), which serves the clients one after the other and holds the frozen backbone and the
data once for all of them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from da3.errors import Da3Error
from da3.federated.settings import FederateSettings


@dataclass
class FederatedDomain:
    """What :func:`federate` returns: the saved domain and its run record."""

    name: str
    file: Path
    run_dir: Path
    metrics: dict
    rounds: list[dict]
    traffic: dict
    settings: FederateSettings
    calibration: dict | None = None  # the head's calibration after the rounds, if asked


def check_run(settings: FederateSettings, store, overwrite: bool = False):
    """Everything that can be refused before any work: the name, an existing domain, the
    data, a partition the training split cannot give. Returns the data's class counts.
    Writes nothing."""
    from da3.data import load_domain
    from da3.domains import DomainStore, check_name
    from da3.federated.partition import check_partition, parse_partition

    name = check_name(settings.domain)
    store = store if isinstance(store, DomainStore) else DomainStore(store)
    if store.exists(name) and not overwrite:
        raise Da3Error(f"domain {name!r} exists in {store.root}; use --overwrite to replace it")
    data = load_domain(settings.train.data, settings.train.image_size)
    counts = data.train.class_counts(data.num_classes)
    check_partition(parse_partition(settings.partition), settings.clients, counts, data.classes)
    return counts


def backend_config(device: str = "cpu", verbose: bool = False) -> dict:
    """Flower's Ray backend: one worker with the whole machine (see the module docstring);
    with ``device`` cuda, the worker gets the GPU (Ray hides it from a worker that asks for
    none)."""
    cpus = os.cpu_count() or 1
    gpus = 1.0 if device == "cuda" else 0.0
    return {
        "client_resources": {"num_cpus": cpus, "num_gpus": gpus},
        "init_args": {"num_cpus": cpus, "logging_level": "ERROR", "log_to_driver": verbose},
    }


def federate(
    settings: FederateSettings,
    store,
    *,
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    verbose: bool = False,
) -> FederatedDomain:
    """Learn domain ``settings.domain`` across ``settings.clients`` simulated devices, each
    training on its own shard of ``settings.train.data``, by ``settings.rounds`` rounds of
    federated averaging of the domain's own state in Flower's simulation engine; save it in
    ``store`` (a DomainStore or its folder) as an ordinary domain.

        >>> from da3.federated import FederateSettings, federate
        >>> s = FederateSettings.from_values(
        ...     {"domain": "digits-fleet", "data": "digits", "clients": 8, "rounds": 10,
        ...      "partition": "by-class:3", "image_size": 64})
        >>> run = federate(s, "da3-store")                       # doctest: +SKIP
        >>> run.metrics["test_accuracy"], run.traffic["up_bytes_per_client_round"]  # doctest: +SKIP

    ``verbose``: Flower's and Ray's own log lines too.
    """
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from da3.domains import DomainStore
    from da3.federated.client import client_app
    from da3.federated.server import serve

    say = echo or (print if progress else (lambda line: None))
    store = store if isinstance(store, DomainStore) else DomainStore(store)
    check_run(settings, store, overwrite)
    outcome: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:
        outcome["record"] = serve(grid, settings, store, overwrite=overwrite, say=say)

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # a FutureWarning less
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    if not verbose:
        flwr_log.setLevel(logging.ERROR)
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=settings.clients,
            backend_config=backend_config(settings.train.device, verbose),
            verbose_logging=verbose,
        )
    finally:
        flwr_log.setLevel(level)
    if "record" not in outcome:
        raise Da3Error(f"federated run of {settings.domain!r} did not finish (see Flower's log)")
    record = outcome["record"]
    return FederatedDomain(
        name=settings.domain,
        file=store.paths(settings.domain)[0],
        run_dir=store.run_dir(settings.domain),
        metrics=record["metrics"],
        rounds=record["rounds"],
        traffic=record["traffic"],
        settings=settings,
        calibration=record.get("calibration"),
    )
