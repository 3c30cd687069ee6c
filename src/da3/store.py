"""The domain store: a folder of domain files, one writer per name. No torch at import.

A domain on disk is two files in the store folder (format in docs/format.md):

* ``NAME.safetensors``: the domain's tensors, nothing of the backbone;
* ``NAME.json``: everything else, including a ``build_id`` also written into the
  safetensors metadata, so that a pair from two different saves is recognised.

Both are written atomically (temporary file, fsync, rename), tensors first; the JSON
records the SHA-256 of the tensors file, so a damaged one is refused. Nothing is pickled.
Beside them a domain owns ``runs/NAME/`` (its last run's settings, history, curves and
checkpoints) and what ``da3 export`` wrote for it under ``exports/``;
:meth:`DomainStore.delete` removes all of it.

One store, many processes: a writer holds the domain's name (:meth:`DomainStore.lock`, a
``flock`` on ``.locks/NAME.lock`` that the kernel drops when the process ends, however it
ends) for its whole run; a second writer of the same name is refused at once, naming the
first. Readers take no lock: the atomic renames mean they see the old domain or the new
one, never half of one. Each training run keeps its checkpoints in a folder of its own
(:meth:`DomainStore.checkpoint_dir`).

Reading a domain's JSON (``da3 domains list``) needs no torch; reading its tensors does.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from da3.data.imaging import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from da3.errors import Da3Error
from da3.io import (
    file_sha256,
    read_json,
    read_safetensors_header,
    read_tensors,
    write_json,
    write_tensors,
)

if TYPE_CHECKING:
    import torch

FORMAT = "da3-domain"
FORMAT_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_DOMAIN_JSON_BYTES = 16 * 2**20  # ~100x the JSON of a domain with 10,000 classes

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise Da3Error(
            f"domain name {name!r}: use 1-64 ASCII letters (a-z, A-Z), digits, '.', '_' "
            "or '-' ('.', '_' and '-' not first)"
        )
    return name


class DomainLocked(Da3Error):
    """The domain's name is held by another writer (see :meth:`DomainStore.lock`)."""


# Keys every domain JSON has, and the JSON type each must have (checked before use).
_META_TYPES = {
    "name": str,
    "method": str,
    "config": dict,
    "classes": list,
    "backbone": dict,
    "build_id": str,
}
_OPTIONAL_META_TYPES = {
    "image_size": int,
    "metrics": dict,
    "train": dict,
    "source": str,
    "preprocess": dict,
    "tensors_sha256": str,
}


class DomainStore:
    """A folder of domain files."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def paths(self, name: str) -> tuple[Path, Path]:
        check_name(name)
        return self.root / f"{name}.safetensors", self.root / f"{name}.json"

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("*.json") if not p.name.startswith("."))

    def exists(self, name: str) -> bool:
        return self.paths(name)[1].is_file()

    def require(self, name: str) -> None:
        if not self.exists(name):
            where = self.root.absolute()
            hint = "another store: --store DIR or the environment variable DA3_STORE"
            if not self.root.is_dir():
                raise Da3Error(
                    f"unknown domain {name!r}: there is no store at {where} (no such folder); "
                    f"{hint}"
                )
            known = ", ".join(self.names()) or "none"
            raise Da3Error(f"unknown domain {name!r} in store {where} (domains: {known}); {hint}")

    def read_meta(self, name: str) -> dict:
        """The domain's JSON, its keys checked to have the types the loaders expect."""
        self.require(name)
        path = self.paths(name)[1]
        meta = read_json(path, MAX_DOMAIN_JSON_BYTES)
        if meta.get("format") != FORMAT:
            raise Da3Error(f"{path}: not a da3 domain file")
        version = meta.get("format_version", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise Da3Error(f"{path}: format_version is not an integer")
        if version > FORMAT_VERSION:
            raise Da3Error(f"{path}: written by a newer da3 (format {version})")
        for key, kind in (_META_TYPES | _OPTIONAL_META_TYPES).items():
            if key not in meta:
                if key in _META_TYPES:
                    raise Da3Error(f"{path}: missing key {key!r}")
                continue
            if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
                raise Da3Error(f"{path}: {key!r} is not a JSON {_JSON_NAMES[kind]}")
        classes = meta["classes"]
        if len(classes) < 2 or not all(isinstance(c, str) for c in classes):
            raise Da3Error(f"{path}: 'classes' is not a list of at least 2 names")
        if not MIN_IMAGE_SIZE <= meta.get("image_size", 96) <= MAX_IMAGE_SIZE:
            raise Da3Error(f"{path}: image_size {meta['image_size']} is out of range")
        for key in ("name", "weights", "fingerprint"):
            if not isinstance(meta["backbone"].get(key, ""), str):
                raise Da3Error(f"{path}: backbone {key!r} is not a JSON string")
        if meta["backbone"].get("frozen_bits", 32) not in (32, 16, 8):  # absent: float32
            raise Da3Error(f"{path}: backbone 'frozen_bits' is not 32, 16 or 8")
        return meta

    def _previous(self, name: str) -> Path:
        """Where the last saved tensors wait until the new JSON is in place."""
        return self.root / f".{name}.safetensors.prev"

    def read(self, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
        meta = self.read_meta(name)
        tensors_path, json_path = self.paths(name)
        candidates = [tensors_path, self._previous(name)]  # the second: a save cut short
        for path in candidates:
            if path.is_file() and _build_id(path) == meta["build_id"]:
                tensors = read_tensors(path)
                digest = meta.get("tensors_sha256")  # absent in files before it was written
                if digest is not None and file_sha256(path) != digest:
                    raise Da3Error(
                        f"{path}: damaged (its SHA-256 differs from the one in {json_path.name})"
                    )
                return meta, tensors
        read_tensors(tensors_path)  # a damaged file gets its own message
        raise Da3Error(
            f"{tensors_path}: does not belong to {json_path.name} (files from different saves)"
        )

    def write(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Tensors, then JSON, each atomically. Until the JSON is in place the previous
        tensors stay on disk (restored if the JSON cannot be written, found by ``read``
        after a crash between the two), so a saved domain is never lost."""
        tensors_path, json_path = self.paths(meta["name"])
        meta = dict(meta, build_id=secrets.token_hex(8))
        previous = self._previous(meta["name"])
        try:
            previous.unlink(missing_ok=True)
            if tensors_path.is_file() and json_path.is_file():
                try:
                    os.link(tensors_path, previous)
                except OSError:  # no hard links on this file system
                    shutil.copyfile(tensors_path, previous)
        except OSError as err:
            raise Da3Error(f"{self.root}: cannot write here ({err.strerror})") from None
        try:
            meta["tensors_sha256"] = write_tensors(
                tensors_path, tensors, {"build_id": meta["build_id"], "format": FORMAT}
            )
        except BaseException:
            previous.unlink(missing_ok=True)  # the old tensors file is still in place
            raise
        try:
            write_json(json_path, meta)
        except BaseException:
            if previous.is_file():
                os.replace(previous, tensors_path)
            raise
        previous.unlink(missing_ok=True)

    def delete(self, name: str) -> list[Path]:
        """Remove domain ``name``: its two files, its run folder (``runs/NAME``: settings,
        history, curves, checkpoints) and what ``da3 export`` wrote for it under
        ``exports/`` (found by their sidecars, which name the domain). Returns what was
        removed besides the two files (an export written elsewhere with ``--out`` stays)."""
        self.require(name)
        removed: list[Path] = []
        for p in (*self.paths(name), self._previous(name)):
            p.unlink(missing_ok=True)
        run = self.run_dir(name)
        if run.is_dir():
            shutil.rmtree(run, ignore_errors=True)
            removed.append(run)
        for model, sidecar in self.exports(name):
            for p in (model, sidecar):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p)
        return removed

    def exports(self, name: str) -> list[tuple[Path, Path]]:
        """(model file, JSON sidecar) of each export of ``name`` under ``exports/``."""
        folder = self.root / "exports"
        if not folder.is_dir():
            return []
        found = []
        for sidecar in sorted(folder.glob("*.json")):
            try:
                meta = read_json(sidecar, MAX_DOMAIN_JSON_BYTES)
            except Da3Error:
                continue
            if meta.get("format") == "da3-export" and meta.get("domain") == name:
                found.append((sidecar.with_name(sidecar.name[: -len(".json")]), sidecar))
        return found

    def disk_bytes(self, path: Path) -> int:
        """Bytes of a file, or of every file under a folder."""
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    def size_bytes(self, name: str) -> int:
        return self.paths(name)[0].stat().st_size

    # -- writers: one at a time per name ----------------------------------------------------

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold domain ``name`` for writing until the block ends.

        An exclusive ``flock`` on ``ROOT/.locks/NAME.lock``, which records who holds it
        (process id, host, command line, start time). Another holder of the same name makes
        this raise :class:`DomainLocked` at once, naming that process: no waiting, nothing
        of theirs touched. The kernel drops the lock when the holding process ends, however
        it ends (``kill -9`` included), so a lock is never left stale. Readers take no lock.
        """
        check_name(name)
        if fcntl is None:
            raise Da3Error("locking a domain needs fcntl.flock (Linux, macOS); not available")
        path = self.root / ".locks" / f"{name}.lock"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise Da3Error(f"{self.root}: cannot write here ({err.strerror})") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DomainLocked(self._locked_message(name, fd)) from None
            holder = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": _command_line(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            with contextlib.suppress(OSError):  # the record only informs (a full disk...)
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(holder).encode(), 0)
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)  # the record goes with the lock
        finally:
            os.close(fd)  # releases the lock

    def _locked_message(self, name: str, fd: int) -> str:
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode())
            who = f"process {int(holder['pid'])} on {holder['host']}"
            what = f" ({' '.join(str(holder['command']).split())}, started {holder['started']})"
        except (OSError, ValueError, KeyError, TypeError):  # taken a moment ago, not yet written
            who, what = "another process", ""
        return (
            f"domain {name!r} in {self.root} is being written by {who}{what}; "
            "wait for it to finish or use another name"
        )

    # -- training runs ------------------------------------------------------------------------

    def run_dir(self, name: str) -> Path:
        """``ROOT/runs/NAME``: the settings, history and curves of the name's last run."""
        return self.root / "runs" / check_name(name)

    def checkpoint_dir(self, name: str, resume: bool = False) -> Path:
        """Where a run of ``name`` keeps its checkpoints: a new folder of its own,
        ``runs/NAME/checkpoints/<UTC start time>-<pid>`` (created by the first write), or
        with ``resume`` the folder of the most recently started run that left a checkpoint.
        A run folder from before these existed (``runs/NAME/checkpoint.json``) resumes too."""
        if resume:
            found = self.checkpoint_dirs(name)
            if found:
                return found[-1]
            legacy = self.run_dir(name)
            if (legacy / "checkpoint.json").is_file():
                return legacy
            raise Da3Error(f"{legacy}: no checkpoint to resume from")
        now = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
        return (
            self.run_dir(name) / "checkpoints" / f"{stamp}.{int(now % 1 * 1e6):06d}Z-{os.getpid()}"
        )

    def unfinished_run(self, name: str) -> tuple[Path, int, int] | None:
        """(checkpoint folder, epochs done, epochs asked for) of the most recent run of
        ``name`` that stopped before its last epoch, or None."""
        found = self.checkpoint_dirs(name)
        if not found:
            return None
        try:
            meta = read_json(found[-1] / "checkpoint.json")
            done, total = int(meta["epoch"]) + 1, int(meta["identity"]["train"]["epochs"])
        except (Da3Error, KeyError, TypeError, ValueError):
            return None
        return (found[-1], done, total) if done < total else None

    def checkpoint_dirs(self, name: str) -> list[Path]:
        """The checkpoint folders of ``name`` that hold a checkpoint, oldest first."""
        folder = self.run_dir(name) / "checkpoints"
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if (p / "checkpoint.json").is_file())

    def prune_checkpoints(self, name: str, keep: Path) -> None:
        """Remove the checkpoints of ``name``'s other runs (call it holding the lock, once
        the run that wrote ``keep`` has saved the domain: the others are superseded)."""
        folder = self.run_dir(name) / "checkpoints"
        try:
            others = [p for p in folder.iterdir() if p != keep] if folder.is_dir() else []
        except OSError:  # tidying only: the domain is saved
            others = []
        for p in others:
            shutil.rmtree(p, ignore_errors=True)
        if keep != self.run_dir(name):  # a legacy checkpoint beside the run's other files
            for p in ("checkpoint.safetensors", "checkpoint.json"):
                with contextlib.suppress(OSError):  # tidying only: the domain is saved
                    (self.run_dir(name) / p).unlink(missing_ok=True)


_JSON_NAMES = {str: "string", int: "integer", dict: "object", list: "array"}


def _command_line() -> str:
    """This process's command line, for the lock record (``da3 ...`` for da3's command)."""
    argv = sys.argv or ["python"]
    program = Path(argv[0]).name or "python"
    if program in ("da3", "cli.py") and Path(argv[0]).parent.name in ("bin", "da3", "Scripts"):
        program = "da3"
    return " ".join([program, *argv[1:]])[:300]


def _build_id(path: Path) -> str | None:
    try:
        return read_safetensors_header(path).get("__metadata__", {}).get("build_id")
    except Da3Error:  # unreadable: no id
        return None
