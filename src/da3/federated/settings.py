"""The settings of a federated run: the fleet's own, plus the training settings each client
uses for its local epochs (:class:`~da3.training.TrainSettings`, ``epochs`` = local epochs).

One flat mapping of plain values describes a run everywhere: ``da3 federate``'s flags, the
``--run-config`` of ``flwr run`` (a deployment), and the ConfigRecord each training message
carries to the clients (so a SuperNode needs nothing but the message and its node config).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from da3.errors import Da3Error
from da3.federated.partition import parse_partition

# The fleet's own settings, with their defaults (the rest are TrainSettings' and the method's).
FLEET_DEFAULTS: dict[str, Any] = {
    "clients": 2,
    "rounds": 3,
    "partition": "iid",
    "local_epochs": 1,
    "min_clients": 0,  # 0: every client must answer every round
    "local_classes": "all",  # all: a device's loss reads every class; own: those it holds
    "schedule": "rounds",  # rounds: the learning rate decays over the whole run; round: each
    "server_momentum": 0.0,  # FedAvgM's server momentum (0: FedAvg)
    "server_lr": 1.0,  # FedAvgM's server learning rate (1 with momentum 0: FedAvg)
    "proximal_mu": 0.0,  # FedProx's proximal term on each device (0: none)
    "head_calibration": 0,  # rank of the devices' feature statistics for the head (0: off)
}
LOCAL_CLASSES = ("own", "all")
SCHEDULES = ("rounds", "round")


@dataclass
class FederateSettings:
    """A federated run. ``train``: what each client trains with (``train.epochs`` is the
    number of local epochs per round; ``train.seed`` seeds the initial domain, the
    partition and each client's shuffling). ``min_clients``: the fewest clients a round
    may end with (clients that die are left out of the average); 0 means all.
    ``local_classes``: ``"all"`` (default): each device's loss is a softmax over every class;
    ``"own"``: over the classes it holds images of only, so a device without a class leaves
    that class's row of the head as the average gave it (with shards of a few classes each,
    the head's rows are otherwise pulled down on every device that lacks them). Under a
    3-of-10-classes split it helped on one domain and hurt on another (docs/benchmark.md),
    so it is not the default.
    ``schedule``: ``"rounds"`` (default): each device's learning rate follows one cosine
    decay over all the rounds (round r trains its part of it), as one training run's does
    over its epochs; ``"round"``: the decay starts over in every round.
    ``server_momentum``, ``server_lr``: the server's update is FedAvgM's (Hsu et al. 2019,
    Flower's :class:`~flwr.serverapp.strategy.FedAvgM`): the average's change to the global
    state is a pseudo-gradient, given momentum and a learning rate; 0 and 1 (the defaults)
    are plain FedAvg.
    ``proximal_mu``: each device's loss gets FedProx's term (Li et al. 2020, as Flower's
    :class:`~flwr.serverapp.strategy.FedProx` asks its clients for), ``mu / 2`` times the
    squared distance of its trainable state from the global state it received; 0 (the
    default): none.
    ``head_calibration``: after the last round each device sends per-class feature
    statistics of rank ``head_calibration`` and the server re-fits the head on features
    drawn from them (:mod:`da3.federated.calibrate`, after CCVR); 0 (the default): off."""

    train: Any  # da3.training.TrainSettings
    clients: int = 2
    rounds: int = 3
    partition: str = "iid"
    min_clients: int = 0
    local_classes: str = "all"
    schedule: str = "rounds"
    server_momentum: float = 0.0
    server_lr: float = 1.0
    proximal_mu: float = 0.0
    head_calibration: int = 0

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        if self.clients < 1:
            raise Da3Error(f"--clients must be at least 1, got {self.clients}")
        if self.rounds < 1:
            raise Da3Error(f"--rounds must be at least 1, got {self.rounds}")
        if not 0 <= self.min_clients <= self.clients:
            raise Da3Error(
                f"--min-clients must be between 0 (all) and --clients ({self.clients}), "
                f"got {self.min_clients}"
            )
        if not 0.0 <= self.server_momentum < 1.0:
            raise Da3Error(f"--server-momentum must be in [0, 1), got {self.server_momentum}")
        if not self.server_lr > 0.0:
            raise Da3Error(f"--server-lr must be above 0, got {self.server_lr}")
        if not self.proximal_mu >= 0.0:
            raise Da3Error(f"--proximal-mu must be 0 or more, got {self.proximal_mu}")
        from da3.federated.calibrate import check_rank

        check_rank(self.head_calibration)
        self.partition = str(parse_partition(self.partition))
        for flag, value, choices in (
            ("--local-classes", self.local_classes, LOCAL_CLASSES),
            ("--schedule", self.schedule, SCHEDULES),
        ):
            if value not in choices:
                raise Da3Error(
                    f"{flag} must be one of {', '.join(choices)}, got {str(value)[:40]!r}"
                )

    @property
    def domain(self) -> str:
        return self.train.domain

    @property
    def method(self) -> str:
        return self.train.method

    @property
    def local_epochs(self) -> int:
        return self.train.epochs

    @property
    def quorum(self) -> int:
        """The fewest replies a round may be averaged from."""
        return self.min_clients or self.clients

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> FederateSettings:
        """Settings from plain values (flags, ``--run-config``, a message): the fleet's
        keys, ``local_epochs``, and every key TrainSettings or the method takes."""
        from da3.training import TrainSettings

        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        values.pop("epochs", None)  # a fleet's epochs are its local epochs
        fleet = {}
        for key, default in FLEET_DEFAULTS.items():
            value = values.pop(key, None)
            if value is None or value == "":
                value = default
            if isinstance(default, int) and not isinstance(value, int):
                try:
                    value = int(str(value))
                except ValueError:
                    raise Da3Error(f"setting {key!r} expects an integer, got {value!r}") from None
            if isinstance(default, float):
                try:
                    value = float(str(value))
                except ValueError:
                    raise Da3Error(
                        f"setting {key!r} expects a number, got {str(value)[:40]!r}"
                    ) from None
                if not math.isfinite(value):
                    raise Da3Error(f"setting {key!r} expects a finite number, got {value}")
            fleet[key] = value
        local = fleet.pop("local_epochs")
        if local < 1:
            raise Da3Error(f"--local-epochs must be at least 1, got {local}")
        train = TrainSettings.from_values({**values, "epochs": local})
        return cls(train=train, **fleet)

    def to_values(self) -> dict[str, Any]:
        """Flat plain values (``config.yaml`` of the run; what :meth:`from_values` reads)."""
        train = self.train.to_values()
        train.pop("epochs")
        return {
            "clients": self.clients,
            "rounds": self.rounds,
            "partition": self.partition,
            "local_epochs": self.local_epochs,
            "min_clients": self.min_clients,
            "local_classes": self.local_classes,
            "schedule": self.schedule,
            "server_momentum": self.server_momentum,
            "server_lr": self.server_lr,
            "proximal_mu": self.proximal_mu,
            "head_calibration": self.head_calibration,
            **train,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_values(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FederateSettings:
        return cls.from_values(json.loads(text))

    def replace(self, **changes) -> FederateSettings:
        return dataclasses.replace(self, **changes)
