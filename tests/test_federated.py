"""A fleet learns a domain together (issue #19): ``da3 federate`` on Flower.

Small on purpose: a toy folder of three colours, 32 px, random backbone weights, 2 clients,
1-2 rounds. One simulated run (Flower's simulation engine) is shared by the tests that read
its domain file and run record; the ClientApp's reply and FedAvg's average are checked on
messages built here; the loopback deployment starts real Flower processes (a SuperLink and
two SuperNodes on 127.0.0.1) and kills one SuperNode mid-run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from da3.cli import main
from da3.errors import Da3Error
from da3.federated import FederateSettings, parse_partition, partition_indices
from da3.store import DomainStore
from test_first_hour import make_folder, one_error_line

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

BIN = Path(sys.executable).parent
TOY = {"weights": "none", "image_size": 32, "batch_size": 8}


def settings(data, **values) -> FederateSettings:
    return FederateSettings.from_values({"domain": "fleet", "data": str(data), **TOY, **values})


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    base = tmp_path_factory.mktemp("fed")
    data = make_folder(base / "toy")  # 3 classes x 12 images: 7 train / 1 val / 4 test each
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DA3_CACHE_DIR", str(base / "cache"))
        yield {"data": data, "base": base, "cache": base / "cache"}


@pytest.fixture(scope="module")
def simulated(toy):
    """One run in Flower's simulation engine: 2 clients, 2 rounds, by-class:2, then the
    head calibrated on the clients' feature statistics (rank 4)."""
    from da3.federated import federate

    store = toy["base"] / "store"
    lines: list[str] = []
    run = federate(
        settings(toy["data"], clients=2, rounds=2, partition="by-class:2", head_calibration=4),
        store,
        echo=lines.append,
    )
    return {"run": run, "store": store, "lines": lines}


# ---------------------------------------------------------------------------------------
# partitions


def test_partitions_share_the_training_split():
    labels = np.repeat(np.arange(4), 10)
    for spec in ("iid", "by-class:2", "by-class", "dirichlet:0.5"):
        shards = partition_indices(labels, 3, spec, seed=1)
        joined = np.sort(np.concatenate(shards))
        assert (joined == np.arange(len(labels))).all(), spec  # disjoint, all of them
        assert all(len(s) for s in shards)
        again = partition_indices(labels, 3, spec, seed=1)
        assert all((a == b).all() for a, b in zip(shards, again, strict=True))  # deterministic
    iid = partition_indices(labels, 3, "iid")
    assert all(sorted(set(labels[s])) == [0, 1, 2, 3] for s in iid)
    by_class = partition_indices(labels, 4, "by-class:2")
    assert [sorted(set(labels[s])) for s in by_class] == [[0, 1], [2, 3], [0, 1], [2, 3]]
    assert str(parse_partition("by-class")) == "by-class:2"


@pytest.mark.parametrize(
    ("spec", "clients", "needle"),
    [
        ("iid", 11, "more clients than training images of class"),
        ("by-class:1", 3, "no client holds class"),
        ("by-class:5", 2, "only 4 classes"),
        ("dirichlet:0", 2, "unknown partition"),
        ("shards", 2, "unknown partition"),
    ],
)
def test_partitions_refuse_what_the_split_cannot_give(spec, clients, needle):
    labels = np.repeat(np.arange(4), 10)
    with pytest.raises(Da3Error, match=needle):
        partition_indices(labels, clients, spec)


# ---------------------------------------------------------------------------------------
# what travels, and the average


@pytest.fixture
def task_identity():
    """Messages are stamped with the identity of the task that builds them; outside a
    Flower process, give them one."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def test_only_the_domains_trainable_tensors_travel(toy, task_identity):
    from flwr.app import ArrayRecord, Context, Message, RecordDict

    from da3.federated.client import build_domain, settings_record, train
    from da3.federated.server import content_bytes, tensor_bytes

    s = settings(toy["data"], clients=2)
    model, domain, _ = build_domain(s)
    state = domain.model.domain_state()
    trainable = {n for n, p in domain.model.named_parameters() if p.requires_grad}
    assert set(state) == trainable  # (da3 has no buffers of its own)
    own_bytes = sum(v.numel() * v.element_size() for v in state.values())
    msg = Message(
        content=RecordDict({"arrays": ArrayRecord(state), "config": settings_record(s)}),
        dst_node_id=5,
        message_type="train",
    )
    context = Context(7, 5, {"partition-id": 1, "num-partitions": 2}, RecordDict(), {})
    reply = train(msg, context)
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    arrays = reply.content["arrays"]
    assert set(arrays) == set(state)  # names: the domain's trainable tensors, nothing else
    assert all(tuple(arrays[k].shape) == tuple(v.shape) for k, v in state.items())
    assert tensor_bytes(arrays) == own_bytes  # bytes: theirs, once
    # the message adds names, shapes and .npy headers, not another tensor
    assert own_bytes < content_bytes(reply) < 1.1 * own_bytes + 4096
    assert reply.content["metrics"]["num-examples"] == 10  # its iid half of 21 images
    changed = [k for k, v in arrays.to_torch_state_dict().items() if not torch.equal(v, state[k])]
    assert changed  # it trained


def test_a_node_with_its_own_folder_trains_on_all_of_it(toy, task_identity, tmp_path):
    """--node-config data=FOLDER (a SuperNode holding its own images): the client trains on
    that folder's whole training split, not on a shard of the run's data; no partition-id
    needed."""
    from flwr.app import ArrayRecord, Context, Message, RecordDict

    from da3.federated.client import build_domain, settings_record, train

    mine = tmp_path / "mine"
    make_folder(mine, {"red": 8, "green": 8, "blue": 8})
    from da3.data import load_domain

    whole = len(load_domain(str(mine), TOY["image_size"]).train)
    assert whole == 15
    s = settings(toy["data"], clients=2)
    _, domain, _ = build_domain(s)
    state = domain.model.domain_state()
    msg = Message(
        content=RecordDict({"arrays": ArrayRecord(state), "config": settings_record(s)}),
        dst_node_id=5,
        message_type="train",
    )
    reply = train(msg, Context(7, 5, {"data": str(mine)}, RecordDict(), {}))
    assert reply.content["metrics"]["num-examples"] == whole  # its own, all of it
    assert set(reply.content["arrays"]) == set(state)


@pytest.mark.parametrize("method", ["bias", "tinytl", "udta", "linear", "finetune"])
def test_every_method_travels_and_averages(toy, task_identity, method):
    """Each method's domain state goes out and comes back averaged into a loadable state
    (udta's own batch norms travel with their integer step counts)."""
    from flwr.app import ArrayRecord, Context, Message, RecordDict

    from da3.federated.client import build_domain, settings_record, state_from_arrays, train
    from da3.federated.server import FleetFedAvg

    s = settings(toy["data"], clients=2, method=method)
    _, domain, _ = build_domain(s)
    state = domain.model.domain_state()
    content = RecordDict({"arrays": ArrayRecord(state), "config": settings_record(s)})
    replies = []
    for pid in (0, 1):
        msg = Message(content=content, dst_node_id=5 + pid, message_type="train")
        context = Context(7, 5 + pid, {"partition-id": pid, "num-partitions": 2}, RecordDict(), {})
        replies.append(train(msg, context))
        assert set(replies[-1].content["arrays"]) == set(state)
    expected = {k: (tuple(v.shape), str(v.numpy().dtype)) for k, v in state.items()}
    strategy = FleetFedAvg(s, expected)
    strategy.rounds[1] = {"clients_asked": 2}
    arrays, _ = strategy.aggregate_train(1, replies)
    domain.model.load_domain_state(state_from_arrays(arrays, state))


def test_fedavg_is_exact_on_known_tensors(task_identity):
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from da3.federated.server import FleetFedAvg

    s = FederateSettings(
        train=settings("digits").train, clients=3, rounds=1, partition="iid", min_clients=0
    )
    expected = {"w": ((2, 3), "float32"), "b": ((3,), "float32")}
    strategy = FleetFedAvg(s, expected)
    strategy.rounds[1] = {"clients_asked": 3}
    weights = [1, 2, 5]  # shares 1/8, 2/8, 5/8: exact in binary
    states = [
        {"w": torch.full((2, 3), float(v)), "b": torch.arange(3.0) * v} for v in (8.0, -4.0, 16.0)
    ]
    replies = []
    for node, (n, state) in enumerate(zip(weights, states, strict=True)):
        ins = Message(content=RecordDict(), dst_node_id=10 + node, message_type="train")
        content = RecordDict(
            {
                "arrays": ArrayRecord(state),
                "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5}),
            }
        )
        replies.append(Message(content=content, reply_to=ins))
    arrays, _ = strategy.aggregate_train(1, replies)
    avg = arrays.to_torch_state_dict()
    want = sum(n * st["w"] for n, st in zip(weights, states, strict=True)) / sum(weights)
    assert torch.equal(avg["w"], want) and avg["w"].dtype == torch.float32
    assert torch.equal(avg["b"], torch.arange(3.0) * (8 * 1 - 4 * 2 + 16 * 5) / 8)
    assert strategy.rounds[1]["num_examples"] == {"10": 1, "11": 2, "12": 5}
    # a reply whose tensors are not the domain's is refused
    bad = RecordDict(
        {
            "arrays": ArrayRecord({"w": torch.zeros(2, 3), "backbone.x": torch.zeros(3)}),
            "metrics": MetricRecord({"num-examples": 1, "train-loss": 0.1}),
        }
    )
    ins = Message(content=RecordDict(), dst_node_id=20, message_type="train")
    with pytest.raises(Da3Error, match="not the domain's own"):
        strategy.aggregate_train(1, [*replies[:2], Message(content=bad, reply_to=ins)])
    # fewer replies than the run needs stop it
    with pytest.raises(Da3Error, match="2 of 3 clients answered"):
        strategy.aggregate_train(1, replies[:2])


def test_server_momentum_is_fedavgm_on_known_tensors(task_identity):
    """--server-momentum: the server moves the global state by momentum on the average's
    change (FedAvgM); round 1 is plain FedAvg, round 2 adds the momentum of round 1."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from da3.federated.server import FleetFedAvg

    s = FederateSettings(
        train=settings("digits").train, clients=2, rounds=2, server_momentum=0.5, server_lr=1.0
    )
    strategy = FleetFedAvg(s, {"w": ((2,), "float32")})

    def replies(values):
        out = []
        for node, v in enumerate(values):
            ins = Message(content=RecordDict(), dst_node_id=10 + node, message_type="train")
            content = RecordDict(
                {
                    "arrays": ArrayRecord({"w": torch.full((2,), v)}),
                    "metrics": MetricRecord({"num-examples": 1, "train-loss": 0.5}),
                }
            )
            out.append(Message(content=content, reply_to=ins))
        return out

    strategy.current_arrays = ArrayRecord({"w": torch.full((2,), 8.0)})  # the initial state
    for r in (1, 2):
        strategy.rounds[r] = {"clients_asked": 2}
    one, _ = strategy.aggregate_train(1, replies([4.0, 6.0]))  # average 5: change -3
    assert torch.equal(one.to_torch_state_dict()["w"], torch.full((2,), 5.0))
    two, _ = strategy.aggregate_train(2, replies([3.0, 3.0]))  # change -2, plus 0.5 x -3
    assert torch.equal(two.to_torch_state_dict()["w"], torch.full((2,), 5.0 - 2.0 - 1.5))
    # the defaults are FedAvg: no server update at all
    plain = FleetFedAvg(FederateSettings(train=settings("digits").train), {})
    assert not plain.server_opt
    with pytest.raises(Da3Error, match="--server-momentum must be in"):
        FederateSettings(train=settings("digits").train, server_momentum=1.0)
    with pytest.raises(Da3Error, match="'server_lr' expects a number"):
        FederateSettings.from_values({"domain": "d", "data": "digits", "server_lr": "fast"})


# ---------------------------------------------------------------------------------------
# a simulated fleet


def test_a_federated_domain_loads_predicts_and_has_its_record(simulated, toy, capsys):
    run, store = simulated["run"], simulated["store"]
    assert run.file == store / "fleet.safetensors" and run.file.is_file()
    rounds = run.rounds
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert r["clients_replied"] == 2 and len(r["up_bytes"]) == 2 and len(r["down_bytes"]) == 2
        assert sum(r["num_examples"].values()) == 21  # the whole training split, shared
    assert 0 <= run.metrics["test_accuracy"] <= 1
    # the saved domain is the calibrated one; the last round's accuracy is kept beside it
    cal = run.calibration
    assert run.metrics["test_accuracy"] == cal["test_accuracy"]
    assert rounds[-1]["test_accuracy"] == cal["test_accuracy_before"]
    assert cal["clients_replied"] == 2 and cal["classes"] == 3 and cal["components"] == 4
    # what a client sends for it: its 2 classes' statistics (mean, 4 directions, residual
    # of 1280 features, float32; class ids and counts), a little framing, nothing else
    stats = 2 * (4 + 2) * 1280 * 4 + 2 * 2 * 8
    assert all(stats < b < stats + 2048 for b in cal["up_bytes"].values())
    assert any(line.startswith("head calibrated on 3 classes") for line in simulated["lines"])
    t = run.traffic
    assert t["finetune_state_bytes"] > 10 * t["domain_state_bytes"]
    assert t["domain_state_bytes"] < t["up_bytes_per_client_round"]
    assert any(line.startswith("round 2/2: test accuracy") for line in simulated["lines"])
    history = json.loads((run.run_dir / "history.json").read_text())
    assert history["traffic"] == t and len(history["rounds"]) == 3
    assert history["calibration"] == cal
    assert t["total_bytes"] == sum(
        sum(r.get(k, {}).values())
        for r in [*history["rounds"], cal]
        for k in ("up_bytes", "down_bytes")
    )
    assert (run.run_dir / "rounds.png").stat().st_size > 1000
    assert (run.run_dir / "config.yaml").is_file()
    # an ordinary domain: the travelling tensors are what the file holds
    meta = json.loads((store / "fleet.json").read_text())
    assert meta["method"] == "da3" and meta["train"]["partition"] == "by-class:2"
    from safetensors import safe_open

    with safe_open(run.file, "pt") as f:
        assert {k: list(f.get_slice(k).get_shape()) for k in f.keys()} == history["tensors"]  # noqa: SIM118
    capsys.readouterr()
    assert main(["eval", "--domain", "fleet", "--store", str(store)]) == 0
    assert "fleet" in capsys.readouterr().out
    image = next((toy["data"] / "red").iterdir())
    assert main(["predict", str(image), "--domain", "fleet", "--store", str(store)]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["domains", "show", "fleet", "--store", str(store)]) == 0
    shown = capsys.readouterr().out
    assert "(config.yaml, history.json, rounds.png)" in shown and "curves.png" not in shown
    assert meta["train"]["local_classes"] == "all" and meta["train"]["schedule"] == "rounds"
    assert meta["train"]["head_calibration"] == 4


def test_flower_app_is_written_and_valid(toy, tmp_path, capsys):
    from flwr.common.config import validate_config

    app = tmp_path / "app"
    args = ["federate", "--domain", "fleet", "--data", toy["data"], "--clients", "2"]
    args += ["--weights", "none", "--image-size", "32", "--store", tmp_path / "s"]
    assert main([str(a) for a in [*args, "--flower-app", app]]) == 0
    out = capsys.readouterr().out
    assert "flower-superlink --insecure" in out and "partition-id=1 num-partitions=2" in out
    config = tomllib.loads((app / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(config, check_module=True)
    assert ok, errors
    run_config = config["tool"]["flwr"]["app"]["config"]
    assert run_config["clients"] == 2 and run_config["image-size"] == 32
    assert not (tmp_path / "s").exists()  # nothing ran


# ---------------------------------------------------------------------------------------
# bad arguments


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--clients", "8"], ["--clients 8", "more clients than training images of class"]),
        (["--rounds", "0"], ["--rounds must be at least 1"]),
        (["--partition", "shards:3"], ["unknown partition 'shards:3'"]),
        (["--partition", "by-class:1", "--clients", "2"], ["no client holds class"]),
        (["--local-epochs", "0"], ["--local-epochs must be at least 1"]),
        (["--local-classes", "some"], ["--local-classes must be one of own, all", "some"]),
        (["--schedule", "epoch"], ["--schedule must be one of rounds, round", "epoch"]),
        (["--server-momentum", "1.5"], ["--server-momentum must be in [0, 1)", "1.5"]),
        (["--server-lr", "0"], ["--server-lr must be above 0"]),
        (["--proximal-mu", "-1"], ["--proximal-mu must be 0 or more", "-1"]),
        (["--calibrate-head", "-1"], ["--calibrate-head must be between 0 (off) and 256"]),
    ],
)
def test_bad_arguments_one_line_store_unchanged(toy, tmp_path, capsys, extra, needles):
    small = tmp_path / "small"
    make_folder(small, {"red": 8, "green": 8, "blue": 8})  # 4 training images a class
    store = tmp_path / "store"
    store.mkdir()
    (store / "keep.txt").write_text("x")
    before = sorted((p.relative_to(store), p.stat().st_mtime_ns) for p in store.rglob("*"))
    args = ["federate", "--domain", "fleet", "--data", small, "--store", store, "--clients"]
    args += ["2", "--weights", "none", "--image-size", "32", *extra]
    assert main([str(a) for a in args]) == 2
    one_error_line(capsys.readouterr().err, *needles)
    after = sorted((p.relative_to(store), p.stat().st_mtime_ns) for p in store.rglob("*"))
    assert after == before


def test_an_existing_domain_is_refused_before_any_work(simulated, capsys):
    store = simulated["store"]
    args = ["federate", "--domain", "fleet", "--data", "digits", "--store", str(store)]
    assert main(args) == 2
    one_error_line(capsys.readouterr().err, "exists", "--overwrite")


# ---------------------------------------------------------------------------------------
# the loopback deployment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_loopback_deployment_survives_a_client_killed_mid_run(toy, tmp_path):
    """A SuperLink and two SuperNodes on 127.0.0.1, ``flwr run`` of the app
    ``da3 federate --flower-app`` writes, two rounds; the second SuperNode is killed once it
    has the second round's message: the round ends with the first alone and the domain is
    saved."""
    if not (BIN / "flower-superlink").exists():
        pytest.skip("Flower's command-line programs are not installed next to this Python")
    home = tmp_path / "flwr-home"
    home.mkdir()
    link = free_port()
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "DA3_CACHE_DIR": str(toy["cache"]),
        "OMP_NUM_THREADS": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loop"\n\n[superlink.loop]\naddress = "127.0.0.1:{link}"\n'
        "insecure = true\n"
    )
    store = tmp_path / "store"
    app = tmp_path / "app"
    s = settings(toy["data"], clients=2, rounds=2, min_clients=1)
    from da3.federated.deploy import write_flower_app

    write_flower_app(app, s, str(store))
    procs: list[subprocess.Popen] = []
    logs = {}

    def start(name: str, *args: str) -> subprocess.Popen:
        logs[name] = tmp_path / f"{name}.log"
        p = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            stdout=logs[name].open("w"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
            start_new_session=True,  # its own process group: its children stop with it
        )
        procs.append(p)
        return p

    def log(name: str) -> str:
        return logs[name].read_text(errors="replace")

    try:
        start(
            "superlink",
            "flower-superlink",
            "--insecure",
            "--disable-runtime-dependency-installation",
            "--port",
            str(link),
        )
        wait_for(lambda: "Uvicorn running" in log("superlink"), 60, "the SuperLink")
        nodes = [
            start(
                f"supernode{i}",
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{link}",
                "--port",
                str(free_port()),
                "--node-config",
                f"partition-id={i} num-partitions=2",
            )
            for i in range(2)
        ]
        run = start("run", "flwr", "run", str(app), "loop", "--stream")
        # the second SuperNode dies once it has round 2's message (its second)
        wait_for(lambda: log("supernode1").count("Receiving: train") >= 2, 240, "round 2")
        os.killpg(nodes[1].pid, signal.SIGTERM)
        wait_for(lambda: run.poll() is not None, 240, "the run to end")
        wait_for(lambda: (store / "fleet.json").is_file(), 30, "the domain file")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    history = json.loads((store / "runs" / "fleet" / "history.json").read_text())
    rounds = history["rounds"]
    assert rounds[1]["clients_replied"] == 2
    assert rounds[2]["clients_asked"] == 2  # it was asked: it died mid-round
    assert rounds[2]["clients_replied"] == 1  # the killed one left out, the round went on
    assert "round 2/2: test accuracy" in log("run")
    meta = json.loads((store / "fleet.json").read_text())
    assert meta["train"]["rounds"] == 2
    DomainStore(store).read("fleet")  # an ordinary, intact domain
    shutil.rmtree(home / "apps", ignore_errors=True)


def test_a_devices_loss_reads_only_the_classes_it_holds():
    """local_classes "own": the softmax runs over the device's classes only, so the head's
    rows of the classes it lacks get no gradient (they stay as the average gave them), the
    others do; the loss is the cross-entropy over the device's classes' logits."""
    import torch.nn.functional as F

    from da3.backbones import create_backbone
    from da3.domains import MultiDomainModel
    from da3.train import make_optimizer, train_step

    torch.manual_seed(0)
    model = MultiDomainModel(create_backbone("efficientnet_lite0", "none"), forms="lean")
    d = model.add_domain("d", ["a", "b", "c", "e"], "da3", image_size=32, seed=0)
    x = model.preprocess(torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8))
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    own = torch.tensor([True, True, False, False])
    head = [p for n, p in d.model.named_parameters() if p.requires_grad and p.shape[0] == 4]
    assert head  # the head's weight and bias
    d.model.eval()
    with torch.no_grad():
        full = d.model(x)
    expected = F.cross_entropy(full[:, :2], y)
    d.model.train()
    loss, logits = train_step(d.model, make_optimizer(d.model, d.config), x, y, classes=own)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.isinf(logits[:, 2:]).all() and torch.isfinite(logits[:, :2]).all()
    for p in head:
        assert torch.count_nonzero(p.grad[2:]) == 0 and torch.count_nonzero(p.grad[:2]) > 0
    with pytest.raises(Da3Error, match="--local-classes must be one of own, all"):
        FederateSettings.from_values({"domain": "f", "data": "digits", "local_classes": "x"})


def test_the_proximal_term_pulls_each_step_toward_the_start():
    """FedProx's term: each step's gradient is the loss's plus mu * (w - w0), w0 the values
    when the term was added (known tensors, through an SGD step); removed, the gradient is
    the loss's."""
    from da3.train import add_proximal_term

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.SGD([w], lr=0.5)
    seen = []
    handle = add_proximal_term(opt, 0.25)
    opt.register_step_pre_hook(lambda o, a, k: seen.append(w.grad.clone()))  # with the pull
    for _ in range(2):
        opt.zero_grad()
        (w * torch.tensor([3.0, 1.0])).sum().backward()  # the loss's gradient: (3, 1)
        opt.step()
    assert torch.equal(seen[0], torch.tensor([3.0, 1.0]))  # w = w0: no pull yet
    assert torch.allclose(
        seen[1], torch.tensor([3.0, 1.0]) + 0.25 * -0.5 * torch.tensor([3.0, 1.0])
    )
    # step 1: w is w0, no pull: w = w0 - 0.5 (3, 1); step 2 pulls by 0.25 * (w - w0)
    assert torch.allclose(
        w.detach(),
        torch.tensor([1.0, -2.0])
        - 0.5 * torch.tensor([3.0, 1.0])
        - 0.5 * (torch.tensor([3.0, 1.0]) + 0.25 * -0.5 * torch.tensor([3.0, 1.0])),
    )
    handle()
    before = w.detach().clone()
    opt.zero_grad()
    (w * torch.tensor([3.0, 1.0])).sum().backward()
    opt.step()
    assert torch.equal(w.detach(), before - 0.5 * torch.tensor([3.0, 1.0]))
    with pytest.raises(Da3Error, match="must be 0 or more"):
        add_proximal_term(opt, -0.1)
    with pytest.raises(Da3Error, match="--proximal-mu must be 0 or more"):
        FederateSettings.from_values({"domain": "f", "data": "digits", "proximal_mu": -1})


def test_a_device_trains_with_the_runs_proximal_term(toy, task_identity, monkeypatch):
    """--proximal-mu reaches each device's local training (and 0 adds no term)."""
    from flwr.app import ArrayRecord

    import da3.train
    from da3.federated.client import build_domain, train_locally

    added = []
    real = da3.train.add_proximal_term
    monkeypatch.setattr(
        da3.train, "add_proximal_term", lambda opt, mu: added.append(mu) or real(opt, mu)
    )
    node = {"partition-id": 1, "num-partitions": 2}
    for mu in (0.0, 0.5):
        s = settings(toy["data"], clients=2, rounds=1, proximal_mu=mu)
        _, domain, _ = build_domain(s)
        train_locally(s, node, ArrayRecord(domain.model.domain_state()), 1)
    assert added == [0.5]


def test_the_learning_rate_decays_over_the_rounds_not_in_each(toy, task_identity, monkeypatch):
    """schedule "rounds": round r of R trains steps (r-1)S..rS-1 of one cosine decay over RS
    steps (S: the device's steps per round); "round": every round its own decay from the
    top."""
    import math

    from flwr.app import ArrayRecord

    import da3.train
    from da3.federated.client import build_domain, train_locally

    seen: list[float] = []
    step = da3.train.train_step

    def recording(model, optimizer, *args, **kwargs):
        seen.append(optimizer.param_groups[-1]["lr"])
        return step(model, optimizer, *args, **kwargs)

    monkeypatch.setattr(da3.train, "train_step", recording)
    node = {"partition-id": 0, "num-partitions": 2}
    for schedule in ("rounds", "round"):
        s = settings(toy["data"], clients=2, rounds=3, schedule=schedule)
        _, domain, _ = build_domain(s)
        arrays = ArrayRecord(domain.model.domain_state())
        lr = domain.config.head_lr
        per_round = []
        for r in (1, 2, 3):
            seen.clear()
            train_locally(s, node, arrays, r)
            per_round.append(list(seen))
        steps = len(per_round[0])
        assert steps == math.ceil(10 / TOY["batch_size"])  # its iid half of 21 images
        for r, lrs in enumerate(per_round):
            for i, got in enumerate(lrs):
                at, span = (r * steps + i, 3 * steps) if schedule == "rounds" else (i, steps)
                assert got == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * at / span)))
