"""Many domains over one frozen backbone: add, train, switch, predict, save, load.

A domain is a name, its classes, its method and config, its own tensors (adaptor, gates,
head, ...), its metrics, and the fingerprint of the backbone weights it was trained on. On
disk it is two files in a store folder (format in docs/format.md):

* ``NAME.safetensors``: the domain's tensors, nothing of the backbone;
* ``NAME.json``: everything else, including a ``build_id`` also written into the
  safetensors metadata, so that a pair from two different saves is recognised.

Both are written atomically (temporary file, fsync, rename), tensors first; the JSON
records the SHA-256 of the tensors file, so a damaged one is refused. Nothing is pickled.
Training or adding a domain never touches another domain's tensors: their outputs stay the
same bit for bit.

One store, many processes: a writer holds the domain's name (:meth:`DomainStore.lock`, a
``flock`` on ``.locks/NAME.lock`` that the kernel drops when the process ends, however it
ends) for its whole run; a second writer of the same name is refused at once, naming the
first. Readers take no lock: the atomic renames mean they see the old domain or the new
one, never half of one. Each training run keeps its checkpoints in a folder of its own
(:meth:`DomainStore.checkpoint_dir`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from da3 import __version__
from da3.backbones import Backbone, create_backbone
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
from da3.methods import (
    AdaptedModel,
    FrozenBackbone,
    MethodConfig,
    build_model,
    parse_config,
    with_legacy,
)

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
            f"domain name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (not first)"
        )
    return name


@dataclass
class Domain:
    """One domain in memory."""

    name: str
    classes: list[str]
    method: str
    config: MethodConfig
    model: AdaptedModel
    image_size: int
    metrics: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)


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
            known = ", ".join(self.names()) or "none"
            raise Da3Error(f"unknown domain {name!r} in store {self.root} (domains: {known})")

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

    def delete(self, name: str) -> None:
        self.require(name)
        for p in (*self.paths(name), self._previous(name)):
            p.unlink(missing_ok=True)

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


class MultiDomainModel:
    """One frozen backbone shared by many domains, each with its own trained tensors."""

    def __init__(
        self, backbone: Backbone | FrozenBackbone, device: str = "cpu", forms: str = "both"
    ) -> None:
        """``forms``: which forms of the frozen backbone to hold (see
        :class:`~da3.methods.FrozenBackbone`); a process that trains one method holds only
        the one it needs."""
        if not isinstance(backbone, FrozenBackbone):
            backbone = FrozenBackbone(backbone, forms)
        self.frozen = backbone.to(device)
        self.device = device
        self.domains: dict[str, Domain] = {}
        self.active: str | None = None

    @property
    def preprocess(self):
        return self.frozen.preprocess

    def backbone_record(self) -> dict:
        return {
            "name": self.frozen.name,
            "weights": self.frozen.weights,
            "fingerprint": self.frozen.fingerprint,
        }

    # -- lifecycle ------------------------------------------------------------------------

    def add_domain(
        self,
        name: str,
        classes: Sequence[str],
        method: str = "da3",
        config: MethodConfig | dict | None = None,
        image_size: int = 96,
        seed: int = 0,
    ) -> Domain:
        check_name(name)
        if name in self.domains:
            raise Da3Error(f"domain {name!r} exists already; remove it first")
        if len(classes) < 2:
            raise Da3Error(f"domain {name!r}: needs at least 2 classes")
        if not isinstance(config, MethodConfig):
            config = parse_config(method, config or {})
        torch.manual_seed(seed)
        model = build_model(method, self.frozen, len(classes), config).to(self.device)
        domain = Domain(name, list(classes), method, config, model.eval(), image_size)
        self.domains[name] = domain
        if self.active is None:
            self.active = name
        return domain

    def get(self, name: str | None = None) -> Domain:
        name = name or self.active
        if name not in self.domains:
            known = ", ".join(self.domains) or "none"
            raise Da3Error(f"unknown domain {name!r} (loaded: {known})")
        return self.domains[name]

    def switch(self, name: str) -> Domain:
        domain = self.get(name)
        self.active = name
        return domain

    def remove(self, name: str) -> None:
        self.get(name)
        del self.domains[name]
        if self.active == name:
            self.active = next(iter(self.domains), None)

    def list(self) -> list[str]:
        return list(self.domains)

    # -- inference ------------------------------------------------------------------------

    @torch.no_grad()
    def logits(self, images: torch.Tensor, domain: str | None = None) -> torch.Tensor:
        """Logits of uint8 (or float 0-255) images for one domain."""
        d = self.get(domain)
        d.model.eval()
        return d.model(self.preprocess(images.to(self.device)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, domains: str | Sequence[str] | None = None):
        """Logits per sample. With one domain name: an N x C tensor. With one name per
        sample (a mixed batch): a list of 1-d tensors, each from its own domain's head."""
        if domains is None or isinstance(domains, str):
            return self.logits(images, domains)
        if len(domains) != len(images):
            raise Da3Error(f"mixed batch: {len(images)} images but {len(domains)} domain names")
        out: list[torch.Tensor | None] = [None] * len(images)
        for name in dict.fromkeys(domains):
            idx = [i for i, d in enumerate(domains) if d == name]
            logits = self.logits(images[idx], name)
            for row, i in zip(logits, idx, strict=True):
                out[i] = row
        return out

    def top_k(self, images: torch.Tensor, domain: str | None = None, k: int = 5) -> list[list]:
        d = self.get(domain)
        probs = self.logits(images, domain).softmax(1)
        k = min(k, d.num_classes)
        values, indices = probs.topk(k, dim=1)
        return [
            [(d.classes[int(i)], float(p)) for p, i in zip(pv, iv, strict=True)]
            for pv, iv in zip(values, indices, strict=True)
        ]

    def evaluate(self, name: str, images: torch.Tensor, labels: torch.Tensor) -> dict:
        from da3.train import evaluate

        d = self.get(name)
        return evaluate(d.model, images, labels, self.preprocess, device=self.device)

    # -- files ----------------------------------------------------------------------------

    def save(self, name: str, store: DomainStore) -> Path:
        d = self.get(name)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": d.name,
            "method": d.method,
            "config": dataclasses.asdict(d.config),
            "classes": d.classes,
            "image_size": d.image_size,
            "preprocess": self.preprocess.to_dict(),
            "backbone": self.backbone_record(),
            "metrics": d.metrics,
            "train": d.train,
            "source": d.source,
            "library_version": __version__,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        store.write(meta, d.model.domain_state())
        return store.paths(name)[0]

    def load(self, name: str, store: DomainStore) -> Domain:
        """Load domain ``name`` from ``store``; refuses one trained on other weights."""
        meta, tensors = store.read(name)
        json_path = store.paths(name)[1]
        mine = self.backbone_record()
        theirs = meta["backbone"]
        if theirs.get("fingerprint") != mine["fingerprint"]:
            raise Da3Error(
                f"{json_path}: trained on backbone {theirs.get('name')} "
                f"({theirs.get('weights')}, weights {str(theirs.get('fingerprint'))[:12]}), "
                f"not on this {mine['name']} ({mine['weights']}, weights "
                f"{mine['fingerprint'][:12]})"
            )
        previous = self.domains.pop(name, None)  # put back if the new one fails to load
        try:
            # a file from before a setting existed reads as what the method did then
            config = parse_config(meta["method"], with_legacy(meta["method"], meta["config"]))
            # The tensors must fit the model the JSON describes before that model is built
            # for real: built on the meta device it costs no memory, so a config or class
            # list declaring a huge model is refused without allocating it.
            with torch.device("meta"):
                probe = build_model(meta["method"], self.frozen, len(meta["classes"]), config)
            probe.load_domain_state(tensors)
            domain = self.add_domain(
                name, meta["classes"], meta["method"], config, meta.get("image_size", 96)
            )
            domain.model.load_domain_state(tensors)
        except Da3Error as err:
            self.domains.pop(name, None)
            if previous is not None:
                self.domains[name] = previous
            raise Da3Error(f"{json_path}: {err}") from None
        domain.metrics, domain.train = meta.get("metrics", {}), meta.get("train", {})
        domain.source = meta.get("source", "")
        return domain


def open_backbone_for(store: DomainStore, name: str, device: str = "cpu") -> MultiDomainModel:
    """A model over the backbone that domain ``name`` of ``store`` was trained on."""
    meta = store.read_meta(name)
    json_path = store.paths(name)[1]
    b = meta["backbone"]
    recorded = b.get("weights", "imagenet")
    if recorded.startswith("file:"):
        raise Da3Error(f"{json_path}: trained on a local weights file; load it in Python")
    # Only the records da3 writes: a path here would make reading a domain open that file.
    if recorded == "random":
        weights = None
    elif recorded == "imagenet" or recorded.startswith("imagenet:"):
        weights = "imagenet"
    else:
        raise Da3Error(f"{json_path}: unknown backbone weights record {recorded[:60]!r}")
    try:
        return MultiDomainModel(create_backbone(b.get("name", ""), weights), device)
    except Da3Error as err:
        raise Da3Error(f"{json_path}: {err}") from None
