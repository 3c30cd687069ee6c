"""What every method shares: the frozen backbone, the adapted model, the registry."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar

import torch
from torch import nn

from da3.backbones import Backbone, weights_fingerprint
from da3.backbones.lazy import materialize
from da3.errors import Da3Error
from da3.lean import FROZEN_BITS, to_lean

FROZEN_FORMS = ("both", "lean", "stock")


class FrozenBackbone:
    """One pretrained backbone, frozen, shared by every domain.

    ``stock`` is the network as built; ``lean`` its memory-lean form (built on first use).
    Methods never modify either: they clone structure and add their own tensors.

    ``forms`` says which forms this process may hold, and so how much memory the frozen
    weights take:

    * ``"both"`` (the default, for a library user who mixes methods): the stock form is
      kept, and the lean form built beside it when a method asks for it;
    * ``"lean"``: the stock network is converted into the lean form at once, part by part,
      and released: the frozen weights are held once (what a run of any method but
      ``finetune`` needs);
    * ``"stock"``: no lean form; the stock network may be handed, without a copy, to the one
      model that trains it (:meth:`trainable_copy`, ``finetune`` in a run of its own).

    ``frozen_bits`` (32, 16 or 8): the precision the lean form stores its convolution
    weights in (float32, float16, int8 with a scale per output channel; see
    :mod:`da3.lean.ops`). The stock form stays float32 (``finetune`` trains it).

    The fingerprint is always that of the float32 stock weights as loaded (for ``"lean"``
    and ``"stock"``, taken before they are converted or trained), whatever ``frozen_bits``.
    """

    def __init__(self, backbone: Backbone, forms: str = "both", frozen_bits: int = 32) -> None:
        if forms not in FROZEN_FORMS:
            raise Da3Error(f"frozen forms {forms!r}: choose from {', '.join(FROZEN_FORMS)}")
        if isinstance(frozen_bits, bool) or frozen_bits not in FROZEN_BITS:
            raise Da3Error(f"frozen_bits must be 32, 16 or 8, got {frozen_bits!r}")
        if forms != "lean":
            materialize(backbone)  # a lazy backbone (da3.backbones.lazy) read whole
        backbone.requires_grad_(False).eval()
        self.forms = forms
        self.frozen_bits = int(frozen_bits)
        self.name = backbone.name
        self.feature_dim = backbone.feature_dim
        self.preprocess = backbone.preprocess
        self.weights = backbone.weights
        self._stock: Backbone | None = backbone
        self._lean: Backbone | None = None
        self._given_away = False
        if forms != "both":
            self.__dict__["fingerprint"] = weights_fingerprint(backbone)  # before it changes
        if forms == "lean":
            self._lean = to_lean(backbone, consume=True, frozen_bits=self.frozen_bits)
            self._stock = None

    @property
    def stock(self) -> Backbone:
        if self._stock is None:
            why = "handed to the model that trains it" if self._given_away else "released"
            raise Da3Error(
                f"the stock form of backbone {self.name} was {why} in this process "
                f"(frozen forms {self.forms!r}); create the model with forms='both' to use it"
            )
        return self._stock

    @property
    def lean(self) -> Backbone:
        if self._lean is None:
            if self.forms == "stock":
                raise Da3Error(
                    f"backbone {self.name} is held in its stock form only in this process "
                    "(frozen forms 'stock'); create the model with forms='both' to use a "
                    "method that needs the lean form"
                )
            self._lean = to_lean(self.stock, frozen_bits=self.frozen_bits)
        return self._lean

    def trainable_copy(self) -> Backbone:
        """A stock network to train in full: with forms ``"stock"`` the network itself
        (once; nothing else in the process reads it after), otherwise a deep copy."""
        if self.forms == "stock" and self._stock is not None:
            backbone, self._stock, self._given_away = self._stock, None, True
            return backbone
        return copy.deepcopy(self.stock)

    @cached_property
    def fingerprint(self) -> str:
        return weights_fingerprint(self.stock)  # forms "both": when first asked for

    def held(self) -> list[Backbone]:
        """The forms in memory now."""
        return [b for b in (self._stock, self._lean) if b is not None]

    def weight_bytes(self, form: str | None = None) -> int:
        """Bytes of the frozen tensors held (each storage once): of every form held, or of
        one (``"lean"``, ``"stock"``; 0 if that one is not held)."""
        held = self.held()
        if form is not None:
            held = [b for b in (self._lean if form == "lean" else self._stock,) if b is not None]
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for b in held
            for t in list(b.parameters()) + list(b.buffers())
        }
        return sum(storages.values())

    def to(self, device: str) -> FrozenBackbone:
        for b in self.held():
            b.to(device)
        return self


class CacheableFeatures(nn.Module):
    """Features in two parts: :meth:`taps`, computed by the frozen backbone alone and without
    gradient (so, for a given image, the same whatever the domain's state), and
    :meth:`from_taps`, the domain's trainable part. Training may compute the taps of each
    image once and reuse them in later epochs (``TrainConfig.cache_features``).

    The frozen backbone is held in eval mode whatever the model's mode: its output must not
    depend on anything but the input.
    """

    backbone: Backbone

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The frozen backbone's outputs the trainable part reads (no graph is built)."""
        raise NotImplementedError

    def from_taps(self, taps: list[torch.Tensor]) -> torch.Tensor:
        """N x ``feature_dim`` features from the taps."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_taps(self.taps(x))

    def train(self, mode: bool = True) -> CacheableFeatures:
        super().train(mode)
        self.backbone.eval()
        return self


def _storage_ptrs(module: nn.Module) -> set[int]:
    tensors = list(module.parameters()) + list(module.buffers())
    return {t.untyped_storage().data_ptr() for t in tensors}


@dataclass
class GateUsage:
    """What a model's dynamic gates executed over the images it saw at inference
    (:meth:`AdaptedModel.count_gates`): per gated branch, its share of the model's FLOPs and
    how often it ran."""

    shares: list[float]  # each gated branch's FLOPs as a fraction of the whole model's
    ran: list[int] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)
    detach: Callable[[], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.ran = self.ran or [0] * len(self.shares)
        self.seen = self.seen or [0] * len(self.shares)

    def stop(self) -> dict[str, float]:
        """Stop counting; what was counted (:meth:`as_dict`)."""
        if self.detach is not None:
            self.detach()
            self.detach = None
        return self.as_dict()

    def add(self, branch: int, ran: int, seen: int) -> None:
        self.ran[branch] += ran
        self.seen[branch] += seen

    @property
    def branches_run(self) -> float:
        """The fraction of (image, gated branch) pairs whose branch ran."""
        return sum(self.ran) / max(1, sum(self.seen))

    @property
    def flops_kept(self) -> float:
        """The fraction of the model's FLOPs executed: every branch's share, times how
        often it ran (an estimate from each branch's share, not a count of the graph)."""
        skipped = sum(
            share * (1 - ran / seen)
            for share, ran, seen in zip(self.shares, self.ran, self.seen, strict=True)
            if seen
        )
        return 1.0 - skipped

    def as_dict(self) -> dict[str, float]:
        return {"gate_branches_run": self.branches_run, "gate_flops_kept": self.flops_kept}

    @staticmethod
    def describe(record: dict) -> str:
        """``gates run 43% of branches, 71% of FLOPs`` from a record with the keys of
        :meth:`as_dict`, or "" without them."""
        if "gate_branches_run" not in record:
            return ""
        return (
            f"gates run {100 * record['gate_branches_run']:.0f}% of branches, "
            f"{100 * record['gate_flops_kept']:.0f}% of FLOPs"
        )


class AdaptedModel(nn.Module):
    """A domain's network: (shared frozen backbone + the method's modules) -> head.

    ``features`` maps a normalised image batch to N x ``feature_dim``; ``head`` is the
    domain's classifier. Everything in ``state_dict()`` whose storage is not the shared
    backbone's is the domain's own state (:meth:`domain_state`).
    """

    def __init__(
        self, features: nn.Module, head: nn.Linear, frozen: FrozenBackbone, method: str
    ) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.method = method
        self._shared = set().union(*(_storage_ptrs(b) for b in frozen.held()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @property
    def cacheable(self) -> bool:
        """Whether the backbone's part of the features is frozen and input-only (see
        :class:`CacheableFeatures`), so it can be cached across epochs."""
        return isinstance(self.features, CacheableFeatures)

    def forward_taps(self, taps: list[torch.Tensor]) -> torch.Tensor:
        """Logits from (cached) taps: ``forward(x)`` given ``features.taps(x)``."""
        return self.head(self.features.from_taps(taps))

    def auxiliary_loss(self) -> torch.Tensor | None:
        """A method's extra training loss from the last forward (e.g. a compute budget)."""
        return None

    def batch_coupling(self) -> str | None:
        """What, besides batch norm in training mode, makes a sample's gradient depend on
        the other samples of its batch (so micro-batches are not exact), or None."""
        return None

    def count_gates(self) -> GateUsage | None:
        """Count what the model's dynamic gates execute in its inference passes from now
        until :meth:`GateUsage.stop` (a new count replaces an unfinished one): a
        :class:`GateUsage` filled as they run, or None for a model without gates."""
        return None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def param_lrs(self, config: MethodConfig) -> list[tuple[list[nn.Parameter], float]]:
        """Trainable parameters (not the head's) that learn at their own rate, as
        (parameters, learning rate) groups; the others learn at ``config.lr``."""
        return []

    def domain_state(self) -> dict[str, torch.Tensor]:
        """The tensors that make up this domain (nothing of the shared backbone)."""
        return {
            k: v
            for k, v in self.state_dict().items()
            if v.untyped_storage().data_ptr() not in self._shared
        }

    @torch.no_grad()
    def load_domain_state(
        self, state: Mapping[str, torch.Tensor], strict: bool = True
    ) -> list[str]:
        """Copy ``state`` into this domain's tensors. ``strict=False`` copies the keys both
        have (a warm start, e.g. adding gates to a trained adaptor) and returns the keys of
        this model that were left as they were."""
        own = self.domain_state()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if strict and (missing or unexpected):
            raise Da3Error(
                f"domain state does not fit the {self.method} model "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        for k, t in own.items():
            if k not in state:
                continue
            value = state[k]  # once: ``state`` may read it from a file (da3.io.LazyTensors)
            if t.shape != value.shape:
                raise Da3Error(f"domain state {k}: shape {tuple(value.shape)} != {tuple(t.shape)}")
            if t.dtype != value.dtype:  # copy_ would convert it silently
                raise Da3Error(f"domain state {k}: dtype {value.dtype} != {t.dtype}")
            t.copy_(value)
        return missing

    def training_state(self) -> dict[str, torch.Tensor]:
        """What a training checkpoint holds to resume exactly: the domain state, unless the
        method stores a reduced form of what it trains (piggyback: mask bits, not scores)."""
        return self.domain_state()

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`training_state`."""
        self.load_domain_state(state)


@dataclass(frozen=True)
class ExportContext:
    """What a module's ``export_form(ctx) -> nn.Module`` is told when a domain is exported
    (:func:`da3.export.core.inference_module` replaces every module that has one by what it
    returns): the format (``onnx``, ``torchscript``), the gate mode (``static``: every
    branch computed; ``dynamic``: skipped where a gate closes) and this module's input in an
    example forward pass (its shapes)."""

    fmt: str
    gates: str
    example: torch.Tensor


class BackboneFeatures(nn.Module):
    """The pooled features of a (cloned, adapted) backbone: what most methods put under
    their head (``AdaptedModel.features``)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)


def new_head(feature_dim: int, num_classes: int) -> nn.Linear:
    return nn.Linear(feature_dim, num_classes)


OPTIMIZERS = ("adamw", "sgd")


@dataclass
class MethodConfig:
    """Settings every method has. Subclasses add their own, each with a help text."""

    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay"})
    head_lr: float = field(
        default=0.0, metadata={"help": "learning rate of the new head (0: the same as lr)"}
    )
    optimizer: str = field(
        default="adamw",
        metadata={
            "help": "'adamw' (decoupled weight decay), or 'sgd' with momentum: half the "
            "trainable state (the weights and one buffer, no gradient beside it; "
            "da3.optim.SGD), usually with a larger lr"
        },
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD's momentum"})

    # Fraction of the training steps, or number of steps, during which only the head learns
    # (the longer of the two; see da3.train.head_only_steps). Not settings of every method
    # (class attributes, not fields): DA3Config makes them ones.
    head_warmup = 0.0
    head_warmup_steps = 0

    # Settings added after results and domain files were written whose default changes what
    # the method does, with the value that reproduces what it did before (see
    # :func:`with_legacy`). A setting whose default keeps the old behaviour needs no entry.
    legacy: ClassVar[dict[str, object]] = {}

    def __post_init__(self) -> None:
        self.check(
            lr=self.lr > 0,
            weight_decay=self.weight_decay >= 0,
            head_lr=self.head_lr >= 0,
            optimizer=self.optimizer in OPTIMIZERS,
            momentum=0 <= self.momentum < 1,
        )

    def check(self, **conditions: bool) -> None:
        """Raise a one-line Da3Error for the first key whose condition fails (or is NaN)."""
        for key, ok in conditions.items():
            value = getattr(self, key)
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise Da3Error(f"{type(self).__name__}: {key}={value!r} is out of range")


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config_class: type[MethodConfig]
    build: Callable[[FrozenBackbone, int, MethodConfig], AdaptedModel]
    summary: str
    frozen_form: str = "lean"  # the form of the frozen backbone it reads (FrozenBackbone)


_METHODS: dict[str, MethodEntry] = {}


def register_method(
    name: str, config_class: type[MethodConfig], summary: str, *, frozen_form: str = "lean"
):
    """Register ``build(frozen, num_classes, config) -> AdaptedModel`` under ``name``.

    ``frozen_form``: which form of the frozen backbone the method reads, ``"lean"`` (the
    memory-lean engine) or ``"stock"``; a run of the method alone holds only that one."""

    def deco(fn):
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered already ({_METHODS[name].build})")
        _METHODS[name] = MethodEntry(name, config_class, fn, summary, frozen_form)
        return fn

    return deco


def list_methods() -> list[str]:
    return list(_METHODS)


def get_method(name: str) -> MethodEntry:
    if name not in _METHODS:
        raise Da3Error(f"unknown method {name!r}; choose from {', '.join(_METHODS)}")
    return _METHODS[name]


def with_legacy(method: str, recorded: dict) -> dict:
    """A config as recorded (in a result or a domain file), completed with the values that
    settings added since then had before they existed (:attr:`MethodConfig.legacy`)."""
    return {**get_method(method).config_class.legacy, **recorded}


def make_config(method: str, overrides: dict | None = None) -> MethodConfig:
    """The method's config with ``overrides`` applied (see :func:`parse_config`)."""
    return parse_config(method, overrides or {})


_KIND_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "text"}


def coerce_setting(owner: str, f: dataclasses.Field, value):
    """``value`` (from JSON, YAML or a ``key=value`` string) as the type of setting ``f``
    (of ``owner``: a method's config, or the run's settings); one-line Da3Error if it is
    not one. The one place settings are coerced."""
    kind = (
        f.type
        if isinstance(f.type, type)
        else {"int": int, "float": float, "bool": bool, "str": str}.get(str(f.type))
    )
    text = value if isinstance(value, str) else None
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if text is not None and text.lower() in ("true", "1", "yes", "on"):
                return True
            if text is not None and text.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    raise Da3Error(f"{owner}: setting {f.name!r} expects {_KIND_WORDS[kind]}, got {shown}")


def parse_config(method: str, values: dict) -> MethodConfig:
    """The method's config from untyped values (strings from the command line, or JSON)."""
    cls = get_method(method).config_class
    fields = {f.name: f for f in dataclasses.fields(cls)}
    typed = {}
    for key, value in values.items():
        if key not in fields:
            raise Da3Error(f"{method}: unknown config key {key!r}; known: {', '.join(fields)}")
        typed[key] = coerce_setting(method, fields[key], value)
    return cls(**typed)


def config_help(method: str) -> list[tuple[str, str, str]]:
    """(name, default, help) of each config key of ``method``."""
    cls = get_method(method).config_class
    return [(f.name, repr(f.default), f.metadata.get("help", "")) for f in dataclasses.fields(cls)]


def build_model(
    method: str, frozen: FrozenBackbone, num_classes: int, config: MethodConfig | None = None
) -> AdaptedModel:
    entry = get_method(method)
    config = config if config is not None else entry.config_class()
    return entry.build(frozen, num_classes, config)
