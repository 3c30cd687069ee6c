"""How a domain's training images are split among the devices of a simulated fleet.

=================  ====================================================================
``iid``            every client gets an equal share of every class (stratified)
``by-class[:K]``   every client sees only K classes (default 2): client i holds classes
                   iK, iK+1, ... (mod the number of classes); each class's images are
                   dealt evenly among the clients that hold it
``dirichlet:A``    each class's images are split among the clients in proportions drawn
                   from Dirichlet(A): small A (0.1) gives very uneven shards, large A
                   (100) nearly iid; redrawn until every client has an image
=================  ====================================================================

A partition is a function of the labels, the number of clients, the rule and the seed only:
every process of a deployment (each SuperNode, the ServerApp) computes the same one, so no
index list travels. Only the training split is partitioned; validation and test stay whole
(the server evaluates the global domain on test).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from da3.errors import Da3Error

PARTITIONS = ("iid", "by-class[:K]", "dirichlet:ALPHA")
DEFAULT_CLASSES_PER_CLIENT = 2
DIRICHLET_TRIES = 100


@dataclass(frozen=True)
class Partition:
    """A parsed partition rule (see the module docstring)."""

    kind: str  # iid, by-class, dirichlet
    classes_per_client: int = 0
    alpha: float = 0.0

    def __str__(self) -> str:
        if self.kind == "by-class":
            return f"by-class:{self.classes_per_client}"
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        return self.kind


def parse_partition(text: str) -> Partition:
    """``iid``, ``by-class``, ``by-class:3``, ``dirichlet:0.5`` -> :class:`Partition`;
    one-line Da3Error otherwise."""
    spec = str(text).strip().lower()
    if spec == "iid":
        return Partition("iid")
    m = re.fullmatch(r"by-class(?::(\d+))?", spec)
    if m:
        k = int(m.group(1)) if m.group(1) else DEFAULT_CLASSES_PER_CLIENT
        if k < 1:
            raise Da3Error(f"partition {text!r}: each client needs at least 1 class")
        return Partition("by-class", classes_per_client=k)
    m = re.fullmatch(r"dirichlet:([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)", spec)
    if m and float(m.group(1)) > 0:
        return Partition("dirichlet", alpha=float(m.group(1)))
    raise Da3Error(f"unknown partition {str(text)[:60]!r}; choose from {', '.join(PARTITIONS)}")


def client_classes(partition: Partition, clients: int, num_classes: int) -> list[list[int]]:
    """The classes each client holds (every class for ``iid`` and ``dirichlet``)."""
    if partition.kind != "by-class":
        return [list(range(num_classes))] * clients
    k = partition.classes_per_client
    return [[(i * k + j) % num_classes for j in range(k)] for i in range(clients)]


def check_partition(
    partition: Partition, clients: int, class_counts: list[int], classes: list[str] | None = None
) -> None:
    """Refuse, with one line, a fleet the training split cannot be shared by: fewer than 1
    client, a client without an image, a class no client holds."""
    num_classes = len(class_counts)
    names = classes or [str(c) for c in range(num_classes)]
    if clients < 1:
        raise Da3Error(f"--clients must be at least 1, got {clients}")
    fewest = min(range(num_classes), key=lambda c: class_counts[c])
    if partition.kind == "iid" and clients > class_counts[fewest]:
        raise Da3Error(
            f"--clients {clients}: more clients than training images of class "
            f"{names[fewest]!r} ({class_counts[fewest]}); an iid split gives each client "
            "every class: use at most that many clients"
        )
    if partition.kind == "by-class":
        k = partition.classes_per_client
        if k > num_classes:
            raise Da3Error(f"partition {partition}: the domain has only {num_classes} classes")
        held = client_classes(partition, clients, num_classes)
        holders = [sum(c in h for h in held) for c in range(num_classes)]
        missing = [names[c] for c in range(num_classes) if holders[c] == 0]
        if missing:
            raise Da3Error(
                f"partition {partition} with {clients} clients: no client holds class "
                f"{missing[0]!r} ({clients} x {k} class slots for {num_classes} classes); "
                "use more clients or more classes per client"
            )
        short = [c for c in range(num_classes) if holders[c] > class_counts[c]]
        if short:
            c = short[0]
            raise Da3Error(
                f"--clients {clients}: more clients than training images of class "
                f"{names[c]!r} ({class_counts[c]} images, {holders[c]} clients hold it)"
            )
    if partition.kind == "dirichlet" and clients > sum(class_counts):
        raise Da3Error(
            f"--clients {clients}: more clients than training images ({sum(class_counts)})"
        )


def partition_indices(
    labels, clients: int, partition: Partition | str, seed: int = 0
) -> list[np.ndarray]:
    """Indices into the training split for each client (sorted), by ``partition``.
    Deterministic for (labels, clients, partition, seed)."""
    partition = parse_partition(partition) if isinstance(partition, str) else partition
    labels = np.asarray(labels)
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    counts = np.bincount(labels, minlength=num_classes).tolist()
    check_partition(partition, clients, counts)
    by_class = [
        np.random.default_rng([seed, 7919, c]).permutation(np.flatnonzero(labels == c))
        for c in range(num_classes)
    ]
    shards: list[list[np.ndarray]] = [[] for _ in range(clients)]
    if partition.kind in ("iid", "by-class"):
        held = client_classes(partition, clients, num_classes)
        for c, idx in enumerate(by_class):
            holders = [i for i in range(clients) if c in held[i]]
            # a class's remainder goes to different clients for different classes
            start = c % len(holders)
            holders = holders[start:] + holders[:start]
            for j, part in enumerate(np.array_split(idx, len(holders))):
                shards[holders[j]].append(part)
    else:
        rng = np.random.default_rng([seed, 104729])
        for _ in range(DIRICHLET_TRIES):
            cuts = []
            for idx in by_class:
                p = rng.dirichlet(np.full(clients, partition.alpha))
                cuts.append(np.split(idx, (np.cumsum(p)[:-1] * len(idx)).astype(int)))
            sizes = [sum(len(cut[i]) for cut in cuts) for i in range(clients)]
            if min(sizes) > 0:
                break
        else:
            raise Da3Error(
                f"partition {partition} with {clients} clients: some client got no image in "
                f"{DIRICHLET_TRIES} draws; use a larger alpha or fewer clients"
            )
        for cut in cuts:
            for i in range(clients):
                shards[i].append(cut[i])
    return [np.sort(np.concatenate(s)) if s else np.zeros(0, dtype=np.int64) for s in shards]
