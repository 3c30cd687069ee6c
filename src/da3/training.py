"""Train one domain end to end: the library call behind ``da3 train``, the demo and the bench.

    >>> from da3 import TrainSettings, train_domain
    >>> settings = TrainSettings(domain="digits", data="digits", image_size=64, epochs=1)
    >>> result = train_domain(settings, "da3-store")          # doctest: +SKIP
    >>> result.metrics["test_accuracy"], result.file          # doctest: +SKIP

Settings in (:class:`TrainSettings`: the run's own settings plus the method's), a saved domain
and its run record out (:class:`TrainedDomain`). In between: the backbone is loaded in the one
form the method reads (:class:`~da3.methods.FrozenBackbone`), the memory plan is made and
checked against ``memory_budget`` before any work, the data is read a batch at a time, the
model is fitted with a checkpoint per epoch in the run folder, the best epoch is evaluated on
the test split and saved in the store, and the run folder gets ``config.yaml`` (a valid
``--config``), ``history.json`` (per-epoch figures and the memory record) and ``curves.png``.

The memory record (``TrainedDomain.memory``) is what the device saw: the resident size of
the process after its imports (the runtime), its peak and the phase that set it, and the
parts held during training, counted: frozen weights, trainable state (weights, gradients,
optimizer moments), data held (one batch; the images stay in the cache file).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from da3.errors import Da3Error
from da3.memory import ProcessMemory, release_memory, tensor_bytes
from da3.methods import get_method, parse_config
from da3.methods.base import coerce_setting

MiB = 2**20


# ---------------------------------------------------------------------------------------
# settings


def parse_bytes(text: str | int | float, what: str = "memory_budget") -> int:
    """``48MB``, ``48MiB``, ``0.5GB``, ``2000000`` (bytes) -> bytes; Da3Error otherwise."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value, unit = float(text), "B"
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]i?B|B)?\s*", str(text), re.IGNORECASE)
        if not m:
            raise Da3Error(f"setting {what!r}: {text!r} is not a size (e.g. 48MB, 64MiB)")
        value, unit = float(m.group(1)), (m.group(2) or "B")
    unit = unit[0].upper() + unit[1:].lower() if len(unit) > 1 else "B"
    factor = {
        "B": 1,
        "Kb": 10**3,
        "Mb": 10**6,
        "Gb": 10**9,
        "Kib": 2**10,
        "Mib": 2**20,
        "Gib": 2**30,
    }[unit]
    return int(value * factor)


@dataclass
class TrainSettings:
    """Everything one training run needs. ``method_config``: the method's own settings
    (see ``da3 train --help`` / :func:`da3.methods.config_help`), by name."""

    domain: str
    data: str
    method: str = "da3"
    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"
    image_size: int = 96
    epochs: int = 5
    batch_size: int = 32
    micro_batch: int = 0
    memory_budget: int = 0  # bytes above the runtime; 0: no budget
    seed: int = 0
    augment: bool = True
    device: str = "cpu"
    cache_features: bool = False
    cache_dtype: str = "float32"
    frozen_bits: int = 32  # the frozen backbone's weights in 32, 16 or 8 bits (lean methods)
    method_config: dict = field(default_factory=dict)

    @property
    def memory_first(self) -> bool:
        """Whether this run puts memory before speed: it trains in micro-batches, or within
        a memory budget (see :func:`_memory_first`)."""
        return bool(self.memory_budget) or 0 < self.micro_batch < self.batch_size

    # the names TrainConfig takes from here
    TRAIN_KEYS = (
        "epochs",
        "batch_size",
        "micro_batch",
        "seed",
        "augment",
        "device",
        "cache_features",
        "cache_dtype",
    )

    def __post_init__(self) -> None:
        self.check()

    @classmethod
    def run_keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "method_config"]

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> TrainSettings:
        """Settings from untyped values (YAML, ``key=value`` strings): the run's keys by
        name, every other key a setting of the method. Coerced and checked here, once."""
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        nested = values.pop("method_config", None) or {}
        if not isinstance(nested, dict):
            raise Da3Error("setting 'method_config' must be a mapping of the method's settings")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "method_config"}
        run: dict[str, Any] = {}
        for key in list(values):
            if key in fields:
                value = values.pop(key)
                if value is None:  # an empty entry in a settings file: the default
                    continue
                if fields[key].type == "str" and not isinstance(value, str):
                    raise Da3Error(f"setting {key!r} expects a word, got {str(value)[:60]!r}")
                if key == "memory_budget" and isinstance(value, str):
                    value = parse_bytes(value)
                run[key] = coerce_setting("train", fields[key], value)
        for key in ("domain", "data"):
            if run.get(key) in (None, ""):
                raise Da3Error(f"train: --{key} is required")
        method = run.get("method", "da3")
        known = {f.name for f in dataclasses.fields(get_method(method).config_class)}
        method_values = {**nested, **values}
        unknown = sorted(set(method_values) - known)
        if unknown:
            raise Da3Error(
                f"unknown setting {unknown[0]!r}; run settings: {', '.join(fields)}; "
                f"{method} config: {', '.join(sorted(known))}"
            )
        return cls(**run, method_config=method_values)

    def check(self) -> None:
        from da3.backbones import list_backbones
        from da3.data.imaging import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE

        for key in ("domain", "data", "method", "backbone", "weights", "device", "cache_dtype"):
            if "\0" in getattr(self, key):
                raise Da3Error(f"setting {key!r}: a NUL character is not allowed")
        get_method(self.method)
        if self.backbone not in list_backbones():  # before any data is loaded
            raise Da3Error(
                f"unknown backbone {self.backbone[:60]!r}; choose from "
                f"{', '.join(list_backbones())}"
            )
        if not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            raise Da3Error(
                f"setting 'image_size' must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE}, "
                f"got {self.image_size}"
            )
        for key in ("epochs", "batch_size", "image_size"):
            if getattr(self, key) < 1:
                raise Da3Error(f"setting {key!r} must be positive, got {getattr(self, key)}")
        for key in ("seed", "micro_batch", "memory_budget"):
            if getattr(self, key) < 0:
                raise Da3Error(f"setting {key!r} must be 0 or more, got {getattr(self, key)}")
        if self.device not in ("cpu", "cuda"):
            raise Da3Error(f"setting 'device' must be cpu or cuda, got {self.device!r}")
        if self.frozen_bits not in (32, 16, 8):
            raise Da3Error(f"setting 'frozen_bits' must be 32, 16 or 8, got {self.frozen_bits}")
        if self.frozen_bits != 32 and get_method(self.method).frozen_form != "lean":
            raise Da3Error(
                f"setting 'frozen_bits' {self.frozen_bits}: method {self.method} trains the "
                "backbone's own weights, which stay float32; use frozen_bits 32"
            )
        self.method_config = dataclasses.asdict(self.config())  # checked, and complete
        self.train_config()  # checks that need no data (cache vs augment)

    def config(self):
        """The method's config (a :class:`~da3.methods.MethodConfig`)."""
        return parse_config(self.method, self.method_config)

    def train_config(self):
        from da3.train import TrainConfig

        return TrainConfig(**{k: getattr(self, k) for k in self.TRAIN_KEYS})

    def to_values(self) -> dict[str, Any]:
        """Flat settings, as ``config.yaml`` holds them (a valid ``--config``)."""
        run = {k: getattr(self, k) for k in self.run_keys()}
        return {**run, **self.method_config}


# ---------------------------------------------------------------------------------------
# the memory plan


@dataclass
class MemoryPlan:
    """What a run will hold above its runtime, counted before it starts.

    ``fixed_bytes``: frozen weights + trainable state (weights, gradients, AdamW's two
    moments; or weights and SGD's momentum buffers) + one batch of uint8 images.
    ``per_image_bytes``: what one more image in a forward/backward pass adds: the bytes
    autograd keeps for it (counted on a real forward pass) and the forward's largest live
    tensors (its biggest layer's input and output, counted on a real forward pass; twice,
    for their gradients in the backward).
    """

    frozen_bytes: int
    trainable_bytes: int
    batch_bytes: int
    kept_per_image: int
    transient_per_image: int
    micro_batch: int
    budget: int = 0

    @property
    def fixed_bytes(self) -> int:
        return self.frozen_bytes + self.trainable_bytes + self.batch_bytes

    @property
    def per_image_bytes(self) -> int:
        return self.kept_per_image + self.transient_per_image

    def estimate(self, micro_batch: int | None = None) -> int:
        return self.fixed_bytes + (micro_batch or self.micro_batch) * self.per_image_bytes

    def describe(self) -> str:
        return (
            f"frozen weights {self.frozen_bytes / MiB:.1f} MiB + trainable state "
            f"{self.trainable_bytes / MiB:.1f} MiB + a batch of images "
            f"{self.batch_bytes / MiB:.1f} MiB + {self.per_image_bytes / MiB:.1f} MiB per image "
            f"of a micro-batch"
        )


def _largest_layer_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """The largest input + output of one leaf module in a forward pass of ``x``."""
    largest = 0

    def hook(m, inputs, output) -> None:
        nonlocal largest
        size = sum(t.numel() * t.element_size() for t in inputs if torch.is_tensor(t))
        if torch.is_tensor(output):
            size += output.numel() * output.element_size()
        largest = max(largest, size)

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return largest


def plan_memory(
    model, frozen, image_size: int, batch_size: int, device: str, optimizer: str = "adamw"
) -> MemoryPlan:
    """Count what training ``model`` will hold (see :class:`MemoryPlan`)."""
    from da3.memory import saved_activation_bytes

    trainable = model.trainable_parameters()
    # for what trains and the new head: weights + gradients + AdamW's two moments, or
    # weights + SGD's momentum buffers (the gradients add into them) or plain gradients
    copies = 4 if optimizer == "adamw" else 2
    trainable_bytes = copies * tensor_bytes(trainable)
    was = model.training
    model.train()
    kept = []
    for n in (1, 2):
        x = torch.zeros(n, 3, image_size, image_size, device=device)
        y = torch.zeros(n, dtype=torch.long, device=device)
        kept.append(
            saved_activation_bytes(
                model,
                lambda x=x, y=y: torch.nn.functional.cross_entropy(model(x), y),
                exclude=None,
            )
        )
    for p in trainable:
        p.grad = None
    largest = _largest_layer_bytes(model, torch.zeros(1, 3, image_size, image_size, device=device))
    model.train(was)
    return MemoryPlan(
        frozen_bytes=frozen.weight_bytes(),
        trainable_bytes=trainable_bytes,
        batch_bytes=batch_size * 3 * image_size * image_size,
        kept_per_image=max(0, kept[1] - kept[0]),
        transient_per_image=2 * largest,
        micro_batch=batch_size,
    )


def fit_budget(plan: MemoryPlan, budget: int, batch_size: int, requested: int) -> MemoryPlan:
    """The largest micro-batch (at most the batch, or ``requested``) whose estimate fits
    ``budget``; Da3Error naming what does not fit when even one image does not."""
    top = min(requested or batch_size, batch_size)
    if plan.estimate(1) > budget:
        raise Da3Error(
            f"--memory-budget {budget / MiB:.1f} MiB is too small for this run: "
            f"{plan.describe()} need {plan.estimate(1) / MiB:.1f} MiB at micro-batch 1"
            + (
                " (the frozen weights alone do not fit)"
                if plan.frozen_bytes > budget
                else " (the frozen weights and trainable state alone do not fit)"
                if plan.frozen_bytes + plan.trainable_bytes > budget
                else ""
            )
        )
    best = max(b for b in range(1, top + 1) if plan.estimate(b) <= budget)
    return dataclasses.replace(plan, micro_batch=best, budget=budget)


# ---------------------------------------------------------------------------------------
# the run


@dataclass
class TrainedDomain:
    """What :func:`train_domain` returns: the saved domain and its run record."""

    name: str
    file: Path
    run_dir: Path
    metrics: dict
    history: list[dict]
    memory: dict
    settings: TrainSettings


def parse_overrides(items: list[str]) -> dict:
    """``key=value`` strings (the command line's trailing settings) as a dict of strings;
    ``-`` in a key reads as ``_``. Types are TrainSettings.from_values's business."""
    out = {}
    for item in items:
        if "=" not in item:
            raise Da3Error(f"{item!r}: expected key=value")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def _say(progress: bool) -> Callable[[str], None]:
    return print if progress else (lambda line: None)


def train_domain(
    settings: TrainSettings,
    store,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    model=None,
    checkpoints: bool = True,
    plot: bool = True,
    warm_start=None,
) -> TrainedDomain:
    """Train domain ``settings.domain`` on ``settings.data`` and save it in ``store`` (a
    :class:`~da3.domains.DomainStore` or its folder). ``model``: a
    :class:`~da3.domains.MultiDomainModel` to add it to (the demo and the benchmark share
    one backbone across domains; the trained domain is ``model.get(name)`` after); by
    default a new one holding the backbone in the form the method needs. ``echo``: where
    the run's lines go (default: print, unless ``progress`` is off). ``checkpoints``: a
    checkpoint per epoch (for ``resume``; the best epoch's state waits on disk);
    ``plot``: ``curves.png`` in the run folder. ``warm_start``: a domain state (tensors by
    name) the new domain starts from where its tensors have the same names (e.g. a trained
    adaptor and head, before gates are added); the others start as the method makes them.
    """
    from da3.domains import DomainStore, check_name
    from da3.io import write_json
    from da3.plots import plot_curves

    meter = ProcessMemory()
    say = echo or _say(progress)
    name = check_name(settings.domain)
    store = store if isinstance(store, DomainStore) else DomainStore(store)
    # The name is locked in the store for the whole run, before anything is written: a
    # second writer of the same name, overwrite or not, is refused at once.
    with store.lock(name):
        if store.exists(name) and not (overwrite or resume):
            raise Da3Error(f"domain {name!r} exists in {store.root}; use --overwrite to replace it")
        # this run's own checkpoint folder (none: nothing to resume from, best state in memory)
        checkpoints = store.checkpoint_dir(name, resume=resume) if checkpoints else None
        run_dir = store.run_dir(name)
        # Everything the run holds lives in _fit_and_save and is gone when it returns:
        # what comes after (the plot) starts from the runtime, not on top of training.
        with _memory_first(settings):
            record = _fit_and_save(
                settings,
                store,
                run_dir,
                checkpoints,
                model,
                meter,
                say,
                resume,
                progress,
                warm_start,
            )
        if checkpoints is not None:
            store.prune_checkpoints(name, keep=checkpoints)  # the other runs' are superseded
        release_memory()
        if plot:
            with meter.phase("plot"):
                plot_curves(
                    record["history"],
                    run_dir / "curves.png",
                    title=f"{name} ({settings.method})",
                    best_epoch=record["metrics"]["best_epoch"],
                    test_accuracy=record["metrics"]["test_accuracy"],
                )
        memory = {**meter.record(), **record["parts"]}
        plan = record["plan"]
        if plan is not None:
            memory["plan"] = dataclasses.asdict(plan) | {"estimate_bytes": plan.estimate()}
        write_json(
            run_dir / "history.json",
            {"history": record["history"], "metrics": record["metrics"], "memory": memory},
        )
    if plan is not None and memory["peak_above_runtime_bytes"] > plan.budget:
        say(
            f"warning: the run went over its memory budget: peak "
            f"{memory['peak_above_runtime_bytes'] / MiB:.1f} MiB above the runtime, budget "
            f"{plan.budget / MiB:.1f} MiB"
        )
    return TrainedDomain(
        name=name,
        file=store.paths(name)[0],
        run_dir=run_dir,
        metrics=record["metrics"],
        history=record["history"],
        memory=memory,
        settings=settings,
    )


def _memory_first(settings):
    """A run in micro-batches or within a budget puts memory before speed from its start:
    its convolutions run on PyTorch's own CPU kernels, not oneDNN's
    (:func:`da3.lean.ops.native_kernels`; the same numbers to float rounding), and the CLI
    maps larger blocks alone (:data:`da3.memory.MEMORY_FIRST_MMAP_THRESHOLD`). Together they
    took a micro-batch-1 DA3 run on EfficientNet-Lite0 at 8 bits from 62.6 to 47.7 MiB
    above the runtime (benchmarks/process_memory.py, docs/benchmark.md)."""
    from da3.lean.ops import native_kernels

    return native_kernels() if settings.memory_first else contextlib.nullcontext()


def _sliced(tc):
    """In micro-batches, memory comes before speed: the widest convolutions run in slices
    of channels (:func:`da3.lean.ops.sliced_convolutions`: the same numbers, steps about
    1.1x slower)."""
    from da3.lean.ops import sliced_convolutions

    return sliced_convolutions() if tc.step_batch < tc.batch_size else contextlib.nullcontext()


def _fit_and_save(
    settings, store, run_dir, checkpoints, model, meter, say, resume, progress, warm_start
) -> dict:
    from da3.backbones import create_backbone
    from da3.data import class_count, load_domain
    from da3.domains import MultiDomainModel
    from da3.io import write_text
    from da3.train import check_cacheable, evaluate, fit_domain, micro_batch_coupling

    name = settings.domain
    config, tc = settings.config(), settings.train_config()
    entry = get_method(settings.method)
    count = class_count(settings.data, settings.image_size)
    with meter.phase("backbone"):
        if model is None:
            # read a part at a time when only the lean form is held (see FrozenBackbone)
            lazy = entry.frozen_form == "lean"
            backbone = create_backbone(settings.backbone, settings.weights, lazy=lazy)
            model = MultiDomainModel(
                backbone,
                settings.device,
                forms=entry.frozen_form,
                frozen_bits=settings.frozen_bits,
            )
            del backbone
        elif entry.frozen_form == "lean" and model.frozen.frozen_bits != settings.frozen_bits:
            raise Da3Error(
                f"setting 'frozen_bits' {settings.frozen_bits}: the model given holds its frozen "
                f"weights in {model.frozen.frozen_bits} bits"
            )
        if name in model.domains:
            model.remove(name)
        domain = model.add_domain(
            name,
            [f"class {i}" for i in range(count)],  # named from the data below
            settings.method,
            config,
            settings.image_size,
            seed=settings.seed,
        )
        if warm_start is not None:
            fresh = domain.model.load_domain_state(warm_start, strict=False)
            say(f"warm start: {len(fresh)} of the domain's tensors start fresh, the rest given")
        release_memory()  # what loading and converting the weights freed
    if tc.cache_features:
        check_cacheable(domain.model)  # before anything of the run is written
    plan = None
    if settings.memory_budget:
        plan = plan_memory(
            domain.model,
            model.frozen,
            settings.image_size,
            settings.batch_size,
            settings.device,
            config.optimizer,
        )
        plan = fit_budget(plan, settings.memory_budget, settings.batch_size, settings.micro_batch)
        tc = dataclasses.replace(tc, micro_batch=plan.micro_batch)
        say(
            f"memory plan: budget {plan.budget / MiB:.1f} MiB above the runtime; micro-batch "
            f"{plan.micro_batch} of {settings.batch_size}: estimate "
            f"{plan.estimate() / MiB:.1f} MiB ({plan.describe()})"
        )
    if tc.step_batch < tc.batch_size:
        coupled = micro_batch_coupling(domain.model)
        say(
            f"micro-batches of {tc.step_batch} (batches of {tc.batch_size}): "
            + (
                f"not exactly the full batch's gradient, since {coupled}"
                if coupled
                else "the same gradient as the full batch, to float rounding"
            )
            + "; memory first: the widest convolutions run in slices of channels, all on "
            "PyTorch's own CPU kernels rather than oneDNN's"
        )
    with meter.phase("data"):
        data = load_domain(settings.data, settings.image_size, progress=progress)
    if data.num_classes != count:
        raise Da3Error(f"{settings.data}: found {data.num_classes} classes, expected {count}")
    domain.classes = list(data.classes)
    domain.source = settings.data
    say(describe_data(data))
    say(f"  {data.describe_classes()}")
    for note in data.warnings():  # few images, a split lacking a class, the folder's layout
        say(f"warning: {note}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise Da3Error(f"{run_dir}: cannot write here ({err.strerror})") from None
    import yaml

    write_text(run_dir / "config.yaml", yaml.safe_dump(settings.to_values(), sort_keys=False))
    with meter.phase("training"), _sliced(tc):
        result = fit_domain(
            domain.model,
            data,
            model.preprocess,
            config,
            tc,
            run_dir=checkpoints,
            resume=resume,
            progress=progress,
            echo=say,
            fingerprint={
                "domain": name,
                "data": settings.data,
                "method": settings.method,
                "config": dataclasses.asdict(config),
                "backbone": model.backbone_record(),
                "image_size": settings.image_size,
            },
        )
    parts = {
        "frozen_weights_bytes": model.frozen.weight_bytes(),
        "trainable_bytes": tensor_bytes(domain.model.trainable_parameters()),
        "gradient_bytes": tensor_bytes(
            p.grad for p in domain.model.trainable_parameters() if p.grad is not None
        ),
        "optimizer_bytes": result.optimizer_bytes,
        # the images of one batch, or of one micro-batch (read when it runs)
        "data_held_bytes": data.bytes_in_memory() + tc.step_batch * data.image_bytes,
        "micro_batch": tc.step_batch,
        "batch_size": tc.batch_size,
    }
    release_memory()
    with meter.phase("test"), _sliced(tc):
        domain.model.load_domain_state(result.best_state)
        test = evaluate(
            domain.model,
            data.test.images,
            data.test.labels,
            model.preprocess,
            tc.eval_batch,
            device=settings.device,
        )
    domain.metrics = {
        "val_accuracy": result.best_val_accuracy,
        "test_accuracy": test["accuracy"],
        "best_epoch": result.best_epoch,
        "train_seconds": result.seconds,
        "train_images": len(data.train),
        **{k: v for k, v in test.items() if k.startswith("gate_")},  # on test, at inference
    }
    domain.train = {k: getattr(settings, k) for k in settings.TRAIN_KEYS} | {"data": settings.data}
    with meter.phase("save"):
        model.save(name, store)
    return {"metrics": domain.metrics, "history": result.history, "parts": parts, "plan": plan}


def describe_data(data) -> str:
    """One line: where the data came from, its layout and the images per split."""
    counts = data.counts()
    where = f" ({data.layout})" if data.layout else ""
    return (
        f"data: {data.source or data.name}{where}: {len(data.classes)} classes, "
        f"{counts['train']} train / {counts['val']} val / {counts['test']} test images "
        f"at {data.image_size} px"
    )


def describe_memory(memory: dict) -> list[str]:
    """The memory record as the last lines of a run."""
    if not memory.get("peak_bytes"):
        return ["memory: not measured here (no /proc)"]
    state = memory["trainable_bytes"] + memory["gradient_bytes"] + memory["optimizer_bytes"]
    return [
        f"memory: peak {memory['peak_bytes'] / MiB:.0f} MiB resident, "
        f"{memory['peak_above_runtime_bytes'] / MiB:.1f} MiB above the runtime "
        f"({memory['runtime_bytes'] / MiB:.0f} MiB: interpreter, torch, libraries), "
        f"reached during {memory['peak_phase'] or 'start-up'}",
        f"  held while training: frozen weights {memory['frozen_weights_bytes'] / MiB:.1f} MiB, "
        f"trainable state {state / MiB:.1f} MiB (weights, gradients, optimizer), data "
        f"{memory['data_held_bytes'] / MiB:.1f} MiB; micro-batch {memory['micro_batch']} "
        f"of {memory['batch_size']}",
    ]
