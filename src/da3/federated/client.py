"""The ClientApp: one device of the fleet trains the domain on its own images.

A training message holds the global domain state (an ArrayRecord of the domain's own
tensors: adaptor, gates, head; never the backbone) and the run's settings (a ConfigRecord).
The client loads the state into its copy of the domain, trains its local epochs with the
library's own loop (:func:`da3.train.fit`) on its shard, and replies with its new state and
``num-examples`` (its shard's size, the weight of its state in the average).

Which images are its own: the node config's ``data`` (a folder or benchmark of this device's
images, all of its training split), else shard ``partition-id`` of ``num-partitions`` of the
run's ``data`` (:mod:`da3.federated.partition`; the simulation engine sets both keys).

A process keeps the frozen backbone and the data of the run it serves between messages
(:func:`client_work`): a SuperNode, or a simulation worker serving many clients, loads them
once.
"""

from __future__ import annotations

import atexit
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from da3.errors import Da3Error
from da3.federated.settings import FederateSettings

ARRAYS, CONFIG, METRICS, STATS = "arrays", "config", "metrics", "stats"
STATS_ACTION = "head_stats"  # the message type "query.head_stats": feature statistics

client_app = ClientApp()


@dataclass
class ClientWork:
    """What a client process holds for one run: the model with the domain, and the data."""

    key: str
    model: Any  # MultiDomainModel
    domain: Any  # Domain
    data: Any  # DomainData


_held: dict[str, ClientWork] = {}
atexit.register(_held.clear)  # the data's open cache file closes before the interpreter goes


def build_domain(settings: FederateSettings, data=None):
    """The backbone (in the form the method reads), the data, and the untrained domain
    over it, as :func:`da3.training.train_domain` builds them (same seed, same initial
    state)."""
    from da3.backbones import create_backbone
    from da3.data import load_domain
    from da3.domains import MultiDomainModel
    from da3.methods import get_method

    t = settings.train
    if data is None:
        data = load_domain(t.data, t.image_size)
    backbone = create_backbone(t.backbone, t.weights)
    model = MultiDomainModel(backbone, t.device, forms=get_method(t.method).frozen_form)
    domain = model.add_domain(t.domain, data, t.method, t.config(), seed=t.seed)
    return model, domain, data


def client_work(settings: FederateSettings, data_name: str) -> ClientWork:
    """This process's model and data for the run of ``settings`` (built on first use)."""
    t = settings.train
    key = FederateSettings(replace(t, data=data_name)).to_json()
    work = _held.get(key)
    if work is None:
        _held.clear()  # one run at a time per process
        model, domain, data = build_domain(settings.replace(train=replace(t, data=data_name)))
        work = _held[key] = ClientWork(key, model, domain, data)
    return work


def own_shard(settings: FederateSettings, node_config, data):
    """(images, labels) of this client: its ``data`` whole, or its partition's shard."""
    from da3.federated.partition import partition_indices

    if node_config.get("data"):
        return data.train.images, data.train.labels
    try:
        pid = int(node_config["partition-id"])
        parts = int(node_config.get("num-partitions", settings.clients))
    except (KeyError, ValueError):
        raise Da3Error(
            "this SuperNode has no 'partition-id' (nor 'data') in its --node-config"
        ) from None
    if not 0 <= pid < parts:
        raise Da3Error(f"partition-id {pid} is not one of 0..{parts - 1}")
    shards = partition_indices(data.train.labels, parts, settings.partition, settings.train.seed)
    idx = torch.from_numpy(shards[pid])
    images = data.train.images
    subset = getattr(images, "subset", None)  # images on disk stay on disk
    return (images[idx] if subset is None else subset(idx)), data.train.labels[idx]


def state_from_arrays(arrays: ArrayRecord, like: dict[str, torch.Tensor]) -> dict:
    """An ArrayRecord as tensors of the dtypes of ``like`` (the domain's own state): an
    average of integer tensors (a batch-norm step count) comes back as a float."""
    state = arrays.to_torch_state_dict()
    out = {}
    for k, v in state.items():
        want = like[k].dtype if k in like else v.dtype
        if v.dtype != want:
            v = v.round() if not want.is_floating_point else v
            v = v.to(want)
        out[k] = v
    return out


def train_locally(settings: FederateSettings, node_config, arrays: ArrayRecord, server_round: int):
    """Train this client's copy of the domain from the global ``arrays`` on its own images;
    returns (its new state, metrics)."""
    from da3.train import fit

    data_name = str(node_config.get("data") or settings.train.data)
    work = client_work(settings, data_name)
    images, labels = own_shard(settings, node_config, work.data)
    model = work.domain.model
    model.load_domain_state(state_from_arrays(arrays, model.domain_state()))
    pid = int(node_config.get("partition-id", 0))
    t = settings.train
    # each client and round shuffles and augments with its own draws
    tc = replace(t.train_config(), seed=t.seed * 1_000_003 + server_round * 1009 + pid)
    empty = torch.zeros((0, *images.shape[1:]), dtype=torch.uint8)
    classes = None
    if settings.local_classes == "own":  # the softmax over the classes this device holds
        classes = torch.zeros(work.domain.num_classes, dtype=torch.bool)
        classes[labels.unique()] = True
    schedule = None
    if settings.schedule == "rounds":  # this round's part of one decay over all the rounds
        steps = math.ceil(len(labels) / tc.batch_size) * tc.epochs
        schedule = ((server_round - 1) * steps, settings.rounds * steps)
    t0 = time.perf_counter()
    result = fit(
        model,
        images,
        labels,
        empty,
        torch.zeros(0, dtype=torch.long),
        work.model.preprocess,
        t.config(),
        tc,
        progress=False,
        classes=classes,
        schedule=schedule,
        proximal=settings.proximal_mu,
    )
    last = result.history[-1]
    metrics = {
        "num-examples": len(labels),
        "train-loss": float(last["train_loss"]),
        "train-accuracy": float(last["train_accuracy"]),
        "seconds": time.perf_counter() - t0,
    }
    # the state after the last local epoch (no validation on the device to pick another)
    return {k: v.detach() for k, v in model.domain_state().items()}, metrics


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    settings = FederateSettings.from_json(str(msg.content[CONFIG]["settings"]))
    server_round = int(msg.content[CONFIG].get("server-round", 1))
    state, metrics = train_locally(settings, context.node_config, msg.content[ARRAYS], server_round)
    content = RecordDict({ARRAYS: ArrayRecord(state), METRICS: MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def local_feature_stats(settings: FederateSettings, node_config, arrays: ArrayRecord) -> dict:
    """This client's per-class feature statistics under the global ``arrays`` (see
    :mod:`da3.federated.calibrate`): what it sends for the head's calibration."""
    from da3.federated.calibrate import device_stats

    data_name = str(node_config.get("data") or settings.train.data)
    work = client_work(settings, data_name)
    images, labels = own_shard(settings, node_config, work.data)
    model = work.domain.model
    model.load_domain_state(state_from_arrays(arrays, model.domain_state()))
    return device_stats(model, images, labels, work.model.preprocess, settings.head_calibration)


@client_app.query(STATS_ACTION)
def head_stats(msg: Message, context: Context) -> Message:
    settings = FederateSettings.from_json(str(msg.content[CONFIG]["settings"]))
    stats = local_feature_stats(settings, context.node_config, msg.content[ARRAYS])
    return Message(content=RecordDict({STATS: ArrayRecord(stats)}), reply_to=msg)


def settings_record(settings: FederateSettings) -> ConfigRecord:
    """The ConfigRecord every training message carries: the run's settings, as JSON."""
    return ConfigRecord({"settings": settings.to_json()})
