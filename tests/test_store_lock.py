"""One store, many writers (issue #20): a domain's name is locked for a whole training run.

A second writer of the same name, ``--overwrite`` or not, is refused at once with one line
naming the process that holds it, and nothing of the first run is touched; other names train
side by side; a lock whose process was killed is taken over; reading is never blocked. Each
run keeps its checkpoints in a folder of its own, and ``--resume`` finds the right one.

The holder is a real process (``python -c`` taking ``DomainStore.lock`` and waiting on its
stdin), so the lock is held for as long as a test needs, without racing two trainings.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import da3
from da3.domains import DomainLocked, DomainStore
from da3.errors import Da3Error
from test_cli import cli, make_folder, one_error_line, train_args

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

HOLD = """
import sys
from da3.domains import DomainStore
with DomainStore(sys.argv[1]).lock(sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
"""


def _env(tmp: Path) -> dict:
    src = str(Path(da3.__file__).resolve().parents[1])  # this checkout's da3, installed or not
    path = os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "OMP_NUM_THREADS": "1",
        "DA3_CACHE_DIR": str(tmp / "cache"),
    }


class Holder:
    """A process holding ``store.lock(name)`` until :meth:`release` (or a kill)."""

    def __init__(self, store: Path, name: str, tmp: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(store), name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_env(tmp),
        )
        assert self.proc.stdout.readline().strip() == "held"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def release(self) -> None:
        self.proc.communicate("", timeout=60)
        assert self.proc.returncode == 0

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)
        self.proc.stdin.close()
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny image folder, its data cache, and a store with domain 'c' trained once."""
    base = tmp_path_factory.mktemp("lock")
    data = make_folder(base / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DA3_CACHE_DIR", str(base / "cache"))
        assert cli(*train_args("c", data, base / "golden")) == 0
    return {"data": data, "cache": base / "cache", "golden": base / "golden"}


@pytest.fixture
def env(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("DA3_CACHE_DIR", str(trained["cache"]))
    store = tmp_path / "store"
    shutil.copytree(trained["golden"], store)
    return {**trained, "store": store, "tmp": tmp_path}


def _everything(store: Path) -> dict[str, bytes]:
    """Every file of the store but the lock files (whose record changes with the holder)."""
    return {
        str(p.relative_to(store)): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file() and ".locks" not in p.parts
    }


# ---------------------------------------------------------------------------------------
# the lock


def test_lock_is_exclusive_and_released(tmp_path):
    store = DomainStore(tmp_path / "store")
    with store.lock("a"):
        record = json.loads((tmp_path / "store" / ".locks" / "a.lock").read_text())
        assert record["pid"] == os.getpid() and record["started"].endswith("Z")
        # flock is per open file: the same process taking it again is refused too
        with pytest.raises(DomainLocked, match=rf"'a' .* process {os.getpid()} "), store.lock("a"):
            pass
        with store.lock("b"):  # another name is free
            pass
    with store.lock("a"):  # released on exit
        pass
    with pytest.raises(Da3Error, match="domain name"), store.lock("../a"):
        pass


def test_second_writer_is_refused_at_once(env, capsys):
    store, data = env["store"], env["data"]
    before = _everything(store)
    holder = Holder(store, "c", env["tmp"])
    try:
        with (
            pytest.raises(DomainLocked, match=f"process {holder.pid} "),
            DomainStore(store).lock("c"),
        ):
            pass
        capsys.readouterr()
        for extra in ([], ["--overwrite"], ["--resume"]):  # --overwrite waits for no one
            t0 = time.perf_counter()
            assert cli(*train_args("c", data, store, *extra)) == 2
            assert time.perf_counter() - t0 < 5
            one_error_line(capsys.readouterr().err, "'c'", f"process {holder.pid} ", "wait for it")
        assert cli("domains", "delete", "c", "--store", store) == 2
        one_error_line(capsys.readouterr().err, f"process {holder.pid} ")
        assert _everything(store) == before  # nothing written, nothing deleted

        # reading is not blocked
        assert cli("domains", "show", "c", "--store", store, "--json") == 0
        assert json.loads(capsys.readouterr().out)["name"] == "c"
        # another name trains while 'c' is held
        assert cli(*train_args("d", data, store)) == 0
        assert (store / "d.json").is_file()
    finally:
        holder.release()
    assert cli(*train_args("c", data, store, "--overwrite")) == 0  # free again


def test_lock_of_a_killed_process_is_taken_over(env, capsys):
    store = env["store"]
    holder = Holder(store, "c", env["tmp"])
    holder.kill()  # kill -9: no cleanup ran, its record is still in the lock file
    record = json.loads((store / ".locks" / "c.lock").read_text())
    assert record["pid"] == holder.pid
    assert cli(*train_args("c", env["data"], store, "--overwrite", "reduction=1")) == 0
    assert json.loads((store / "c.json").read_text())["config"]["reduction"] == 1
    assert (store / ".locks" / "c.lock").read_text() == ""  # released, record gone


def _train_process(env, name: str, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "da3.cli", *map(str, train_args(name, env["data"], env["store"]))]
    return subprocess.Popen(
        [*argv, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(env["tmp"]),
    )


def _wait_for_holder(lock: Path, pid: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(lock.read_text())["pid"] == pid:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never held {lock}: {proc.communicate()}")


def test_two_processes_train_the_same_name(env, capsys):
    """The bug of issue #20: both exited 0 and the second silently replaced the first."""
    store = env["store"]
    first = _train_process(env, "e", "--epochs", "6", "reduction=3")
    _wait_for_holder(store / ".locks" / "e.lock", first.pid, first)
    capsys.readouterr()
    # the second writer, with other settings and --overwrite, while the first trains
    assert cli(*train_args("e", env["data"], store, "--overwrite", "reduction=1")) == 2
    one_error_line(capsys.readouterr().err, "'e'", f"process {first.pid} ", "(da3 train --domain e")
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    # the first run's domain, settings and checkpoint folder, untouched by the second
    meta = json.loads((store / "e.json").read_text())
    assert meta["config"]["reduction"] == 3 and meta["train"]["epochs"] == 6
    config = (store / "runs" / "e" / "config.yaml").read_text()
    assert "reduction: 3" in config
    assert len(DomainStore(store).checkpoint_dirs("e")) == 1
    assert cli("predict", env["data"] / "red" / "00.png", "--domain", "e", "--store", store) == 0


def test_two_names_train_side_by_side(env):
    procs = {name: _train_process(env, name, f"seed={i}") for i, name in enumerate("fg")}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, err)
        assert f"domain {name}:" in out
    store = DomainStore(env["store"])
    assert {"c", "f", "g"} <= set(store.names())
    for name in "fg":
        meta, tensors = store.read(name)
        assert meta["name"] == name and tensors
        (folder,) = store.checkpoint_dirs(name)
        assert folder.parent == store.run_dir(name) / "checkpoints"


# ---------------------------------------------------------------------------------------
# checkpoint folders


def test_each_run_has_its_own_checkpoint_folder(tmp_path):
    store = DomainStore(tmp_path)
    with pytest.raises(Da3Error, match="no checkpoint to resume from"):
        store.checkpoint_dir("x", resume=True)
    first, second = store.checkpoint_dir("x"), store.checkpoint_dir("x")
    assert first != second and first.parent == tmp_path / "runs" / "x" / "checkpoints"
    assert not first.exists()  # created by the run's first checkpoint
    for folder in (first, second):
        folder.mkdir(parents=True)
        (folder / "checkpoint.json").write_text("{}")
    third = store.checkpoint_dir("x")
    third.mkdir()  # a run that stopped before its first checkpoint: nothing to resume
    assert store.checkpoint_dirs("x") == [first, second]
    assert store.checkpoint_dir("x", resume=True) == second  # the latest started
    store.prune_checkpoints("x", keep=second)
    assert [p.name for p in (tmp_path / "runs" / "x" / "checkpoints").iterdir()] == [second.name]


def test_a_checkpoint_from_before_the_folders_still_resumes(tmp_path):
    store = DomainStore(tmp_path)
    legacy = tmp_path / "runs" / "x"
    legacy.mkdir(parents=True)
    (legacy / "checkpoint.json").write_text("{}")
    (legacy / "checkpoint.safetensors").write_bytes(b"")
    assert store.checkpoint_dir("x", resume=True) == legacy
    new = store.checkpoint_dir("x")
    new.mkdir(parents=True)
    store.prune_checkpoints("x", keep=new)  # the new run saved: the legacy files go
    assert not (legacy / "checkpoint.json").exists() and new.is_dir()


def test_fresh_run_keeps_an_interrupted_runs_checkpoint_until_it_saves(env, capsys, monkeypatch):
    import da3.train

    store, data = env["store"], env["data"]
    real = da3.train.train_step
    calls = {"n": 0}

    def dies_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # 21 training images, batch 8: 3 steps per epoch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(da3.train, "train_step", dies_in_epoch_2)
    assert cli(*train_args("h", data, store, "--epochs", "2")) == 130
    (interrupted,) = DomainStore(store).checkpoint_dirs("h")
    monkeypatch.setattr(da3.train, "train_step", real)
    capsys.readouterr()
    # a fresh run refused on its settings leaves the interrupted run's checkpoint alone
    assert cli(*train_args("h", data, store, "reduction=0")) == 2
    assert DomainStore(store).checkpoint_dirs("h") == [interrupted]
    # a fresh run that saves supersedes it
    assert cli(*train_args("h", data, store)) == 0
    (kept,) = DomainStore(store).checkpoint_dirs("h")
    assert kept != interrupted and not interrupted.exists()
