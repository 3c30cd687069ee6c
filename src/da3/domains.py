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
same bit for bit. The store itself (:class:`DomainStore`: files, the lock per name, run
folders) is :mod:`da3.store`, which needs no torch.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from da3 import __version__
from da3.backbones import Backbone, create_backbone
from da3.data import DEFAULT_IMAGE_SIZE
from da3.errors import Da3Error
from da3.methods import (
    AdaptedModel,
    FrozenBackbone,
    MethodConfig,
    build_model,
    get_method,
    parse_config,
    with_legacy,
)
from da3.store import (  # noqa: F401 - the store is part of this module's interface
    FORMAT,
    FORMAT_VERSION,
    MAX_DOMAIN_JSON_BYTES,
    DomainLocked,
    DomainStore,
    check_name,
)

if TYPE_CHECKING:
    from da3.data import DomainData


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
    trained_frozen_bits: int | None = None  # as its file records; None: trained here

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class MultiDomainModel:
    """One frozen backbone shared by many domains, each with its own trained tensors."""

    def __init__(
        self,
        backbone: Backbone | FrozenBackbone,
        device: str = "cpu",
        forms: str = "both",
        frozen_bits: int = 32,
    ) -> None:
        """``forms``: which forms of the frozen backbone to hold (see
        :class:`~da3.methods.FrozenBackbone`); a process that trains one method holds only
        the one it needs. ``frozen_bits``: the precision of the frozen weights of the lean
        form, 32, 16 or 8 (given a FrozenBackbone, its own)."""
        if not isinstance(backbone, FrozenBackbone):
            backbone = FrozenBackbone(backbone, forms, frozen_bits)
        self.frozen = backbone.to(device)
        self.device = device
        self.domains: dict[str, Domain] = {}
        self.active: str | None = None

    @property
    def preprocess(self):
        return self.frozen.preprocess

    @property
    def frozen_bits(self) -> int:
        return self.frozen.frozen_bits

    def backbone_record(self) -> dict:
        """What a domain file records of the backbone: its name, weights, the fingerprint of
        its float32 weights and the precision the frozen weights were held in."""
        return {
            "name": self.frozen.name,
            "weights": self.frozen.weights,
            "fingerprint": self.frozen.fingerprint,
            "frozen_bits": self.frozen.frozen_bits,
        }

    # -- lifecycle ------------------------------------------------------------------------

    def add_domain(
        self,
        name: str,
        classes: Sequence[str] | DomainData,
        method: str = "da3",
        config: MethodConfig | dict | None = None,
        image_size: int | None = None,
        seed: int = 0,
    ) -> Domain:
        """A new domain over the shared backbone, untrained. ``classes``: its class names,
        or better the :class:`~da3.data.DomainData` it will be trained on, which gives the
        classes, the image size and the data source the saved domain records (``da3 eval``
        and ``da3 export`` use them). ``image_size``: without data, the size of the images
        it takes (default 96); with data, it must be the data's."""
        data = classes if hasattr(classes, "image_size") and hasattr(classes, "train") else None
        if data is not None:
            if image_size is not None and image_size != data.image_size:
                raise Da3Error(
                    f"domain {name!r}: image_size={image_size}, but the data was loaded at "
                    f"{data.image_size} px; load it at the size the domain should take"
                )
            classes, image_size = data.classes, data.image_size
        image_size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
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
        if data is not None:
            domain.source = data_source(data)
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

    def _check_size(self, d: Domain, images: torch.Tensor) -> None:
        size = tuple(images.shape[-2:])
        if size != (d.image_size, d.image_size):
            raise Da3Error(
                f"domain {d.name!r} takes {d.image_size} x {d.image_size} px images (its "
                f"image_size), got {size[0]} x {size[1]}; load the data at {d.image_size} px"
                + (
                    ", or add the domain with the data it trains on (add_domain(name, data))"
                    if not d.metrics
                    else ""
                )
            )

    @torch.no_grad()
    def logits(self, images: torch.Tensor, domain: str | None = None) -> torch.Tensor:
        """Logits of uint8 (or float 0-255) images for one domain; the images must have
        the domain's size (:attr:`Domain.image_size`)."""
        d = self.get(domain)
        self._check_size(d, images)
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
        self._check_size(d, images)
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
        # a file from before frozen_bits existed was trained on float32 weights
        domain.trained_frozen_bits = int(theirs.get("frozen_bits", 32))
        return domain

    def precision_note(self, name: str | None = None) -> str:
        """A line saying so when domain ``name`` was trained with its frozen weights in
        another precision than this model holds them ("" otherwise): allowed, the domain's
        tensors are the same; its outputs differ as the dequantized weights do."""
        d = self.get(name)
        trained = d.trained_frozen_bits
        if trained is None or trained == self.frozen_bits:
            return ""
        return (
            f"note: domain {d.name!r} was trained with {trained}-bit frozen weights; this model "
            f"holds them in {self.frozen_bits} bits (allowed; its outputs differ slightly)"
        )


def data_source(data) -> str:
    """What a domain records as its data: a benchmark's name, or a folder's absolute path
    (what ``da3 eval`` and ``da3 train --data`` take)."""
    from da3.data import BENCHMARK_DOMAINS

    if data.name in BENCHMARK_DOMAINS and not data.layout:  # a folder's data has a layout
        return data.name
    return str(Path(data.source).absolute()) if data.source else data.name


def open_domain(
    store, name: str, device: str = "cpu", frozen_bits: int | None = None, forms: str = "both"
):
    """A saved domain, ready to use: (a :class:`MultiDomainModel` on the backbone the domain
    was trained on, holding the domain ``name``; the :class:`DomainStore`). ``store``: the
    store or its folder. ``frozen_bits``: the frozen weights' precision (default: the one the
    domain was trained with; another is allowed, see ``model.precision_note(name)``).
    ``forms``: the forms of the frozen backbone to hold (see
    :class:`~da3.methods.FrozenBackbone`); ``"own"``: only the one the domain's method
    reads (the frozen weights held once, read a layer at a time; other methods' domains
    cannot then be added to this model)."""
    store = store if isinstance(store, DomainStore) else DomainStore(store)
    model = open_backbone_for(store, name, device, frozen_bits, forms)
    model.load(name, store)
    return model, store


def open_backbone_for(
    store: DomainStore,
    name: str,
    device: str = "cpu",
    frozen_bits: int | None = None,
    forms: str = "both",
) -> MultiDomainModel:
    """A model over the backbone that domain ``name`` of ``store`` was trained on, its frozen
    weights in ``frozen_bits`` (default: the precision the domain was trained with), holding
    the backbone in ``forms`` (see :func:`open_domain`)."""
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
    bits = b.get("frozen_bits", 32) if frozen_bits is None else frozen_bits
    if bits not in (32, 16, 8):
        raise Da3Error(f"{json_path}: frozen_bits must be 32, 16 or 8, got {str(bits)[:20]}")
    if forms == "own":
        try:
            forms = get_method(meta.get("method", "")).frozen_form
        except Da3Error:
            forms = "both"  # an unknown method is reported by load(), naming the file
    try:
        backbone = create_backbone(b.get("name", ""), weights, lazy=forms == "lean")
        return MultiDomainModel(backbone, device, forms=forms, frozen_bits=bits)
    except Da3Error as err:
        raise Da3Error(f"{json_path}: {err}") from None
