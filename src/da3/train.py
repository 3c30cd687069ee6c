"""Training: one step (shared with the profiler) and the loop.

The loop trains one domain: a progress bar per epoch (loss, accuracy, images/s, memory),
validation after each epoch, the best epoch's state kept, a checkpoint after every epoch.
Shuffling and augmentation draw from generators seeded by ``(seed, epoch)``, so a run
resumed from its last checkpoint reaches bit for bit the result of an uninterrupted one.
A loss that is not finite stops training; the last good checkpoint stays on disk.

What a run holds at once is bounded, whatever the size of the domain:

==================  ==================================================================
images              one batch of uint8 images, read from the cache file (``images[idx]``);
                    in micro-batches, one micro-batch's, read when it runs
step                one micro-batch's forward and backward (``micro_batch``; default the
                    whole batch): gradients accumulate over the micro-batches of a batch
evaluation          batches of ``eval_batch_size`` (default: the micro-batch, else the
                    training batch), never the whole split
==================  ==================================================================

Micro-batches give the full batch's gradient (to float rounding) when nothing in the model
couples the samples of a batch; batch norm in training mode (``finetune``, the residual
adapters' domain batch norms) and DA3's gate budget (a function of the batch's mean gate)
do, so there a micro-batch is a smaller batch for those parts
(:func:`micro_batch_coupling` says which, and training says so).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from da3.backbones.base import Preprocess
from da3.errors import Da3Error
from da3.feature_cache import CACHE_DTYPES, FeatureCache
from da3.io import LazyTensors, read_json, read_tensors, write_json, write_tensors
from da3.memory import optimizer_state_bytes, process_memory_bytes
from da3.methods.base import AdaptedModel, GateUsage, MethodConfig
from da3.optim import SGD, AdamW, LambdaSchedule


@dataclass
class TrainConfig:
    """How a domain is trained (the same for every method in a comparison)."""

    epochs: int = field(default=5, metadata={"help": "passes over the training split"})
    batch_size: int = field(default=32, metadata={"help": "images per step"})
    seed: int = field(default=0, metadata={"help": "seed of init, shuffling, augmentation"})
    augment: bool = field(default=True, metadata={"help": "random translations of +-1/12"})
    micro_batch: int = field(
        default=0,
        metadata={
            "help": "images per forward/backward pass; gradients accumulate over the "
            "micro-batches of a batch (0: the whole batch at once)"
        },
    )
    eval_batch_size: int = field(
        default=0,
        metadata={"help": "images per evaluation batch (0: the micro-batch, else the batch)"},
    )
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    cache_features: bool = field(
        default=False,
        metadata={
            "help": "compute the frozen backbone features of each image once and reuse them "
            "(methods whose backbone part is frozen: udta, linear; needs augment=false)"
        },
    )
    cache_dtype: str = field(
        default="float32",
        metadata={"help": "storage of cached features: float32 (exact) or float16 (half)"},
    )

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise Da3Error(f"setting {key!r} must be at least 1, got {getattr(self, key)}")
        for key in ("micro_batch", "eval_batch_size"):
            if getattr(self, key) < 0:
                raise Da3Error(f"setting {key!r} must be 0 (off) or more, got {getattr(self, key)}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise Da3Error(
                f"cache_dtype={self.cache_dtype!r}: choose from {', '.join(CACHE_DTYPES)}"
            )
        if self.cache_features and self.augment:
            raise Da3Error(
                "cache_features=true needs augment=false: augmented images change every "
                "epoch, so their features cannot be reused"
            )

    @property
    def step_batch(self) -> int:
        """Images in one forward/backward pass."""
        return min(self.micro_batch or self.batch_size, self.batch_size)

    @property
    def eval_batch(self) -> int:
        return self.eval_batch_size or self.step_batch


def make_optimizer(model: AdaptedModel, config: MethodConfig) -> AdamW | SGD:
    """AdamW, or SGD with momentum (``config.optimizer``); parameters with a rate of their
    own (:meth:`AdaptedModel.param_lrs`) in groups of their own, and the head in its own
    group (the last) when the config gives it its own learning rate or a head-only warm-up,
    or there are such groups."""

    def build(params) -> AdamW | SGD:
        if config.optimizer == "sgd":
            return SGD(
                params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
            )
        return AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    params = model.trainable_parameters()
    own = [([p for p in ps if p.requires_grad], lr) for ps, lr in model.param_lrs(config)]
    if not own and not config.head_lr and not config.head_warmup and not config.head_warmup_steps:
        return build(params)
    apart = {id(p) for p in model.head.parameters()} | {id(p) for ps, _ in own for p in ps}
    groups = [
        {"params": [p for p in params if id(p) not in apart]},
        *({"params": ps, "lr": lr} for ps, lr in own),
        {
            "params": [p for p in model.head.parameters() if p.requires_grad],
            "lr": config.head_lr or config.lr,
        },
    ]
    groups = [g for g in groups if g["params"]]
    return build(groups)


def add_proximal_term(optimizer, mu: float) -> Callable[[], None]:
    """Give every step of ``optimizer`` the gradient of ``mu / 2 * ||w - w0||^2`` (FedProx's
    proximal term), ``w0`` the parameters' values now; added to each parameter's gradient
    just before the step (whatever the micro-batches), so the loss and its graph are as
    without it. Returns a function that ends it."""
    if not mu >= 0.0:
        raise Da3Error(f"the proximal term's weight must be 0 or more, got {mu}")
    anchor = {p: p.detach().clone() for group in optimizer.param_groups for p in group["params"]}
    step = optimizer.step

    def pulled_step(*args, **kwargs):
        with torch.no_grad():
            for p, w0 in anchor.items():
                if p.grad is not None:
                    p.grad.add_(p.detach() - w0, alpha=mu)
        return step(*args, **kwargs)

    optimizer.step = pulled_step
    return lambda: setattr(optimizer, "step", step)


def micro_batch_coupling(model: AdaptedModel) -> str | None:
    """Why micro-batches would not give the full batch's gradient for ``model`` (in
    training mode), or None when they do (to float rounding)."""
    was = model.training
    model.train()
    bn = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    bn = [n for n in bn if model.get_submodule(n).training]
    model.train(was)
    if bn:
        return f"{len(bn)} batch norms use the statistics of each micro-batch"
    return model.batch_coupling()


def train_step(
    model: AdaptedModel,
    optimizer: AdamW | SGD,
    x: torch.Tensor | Callable[[slice], torch.Tensor] | None,
    y: torch.Tensor,
    *,
    taps: list[torch.Tensor] | None = None,
    micro_batch: int = 0,
    classes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward, optimizer step on one batch; returns (loss, logits), detached.

    ``x`` is the batch's input, or a function giving the input of a slice of the batch
    (so only one micro-batch's input exists at a time). With ``micro_batch`` smaller than
    the batch, the forward and backward passes run a micro-batch at a time and the
    gradients add up to the batch's (each micro-batch's loss weighted by its share).
    Given ``taps`` (the frozen ``model.features.taps(x)``, e.g. cached), ``x`` is not used.
    ``classes``: a boolean mask of the classes the loss reads (the softmax runs over these
    logits only; the others get no gradient), e.g. the classes a fleet's device has images
    of; the logits returned are masked the same way.
    """
    n = len(y)
    size = n if micro_batch <= 0 else min(micro_batch, n)
    optimizer.zero_grad(set_to_none=True)
    losses, outputs = [], []
    for start in range(0, n, size):
        part = slice(start, min(start + size, n))
        try:
            if taps is not None:
                logits = model.forward_taps([t[part] for t in taps])
            else:
                logits = model(x(part) if callable(x) else x[part] if size < n else x)
        except ValueError as err:
            if "more than 1 value per channel" not in str(err):
                raise
            raise Da3Error(
                f"batch norm in training mode needs more than one value per channel: "
                f"{part.stop - part.start} image(s) per pass leave it one at this image "
                "size; use a larger --micro-batch or batch"
            ) from None
        if classes is not None:
            logits = logits.masked_fill(~classes, float("-inf"))
        loss = F.cross_entropy(logits, y[part])
        aux = model.auxiliary_loss()
        total = loss if aux is None else loss + aux
        if size < n:  # the batch's mean loss is the share-weighted sum of the parts'
            share = (part.stop - part.start) / n
            total, loss = total * share, loss.detach() * share
        total.backward()
        losses.append(loss.detach())
        outputs.append(logits.detach())
    optimizer.step()
    if len(losses) == 1:
        return losses[0], outputs[0]
    return torch.stack(losses).sum(), torch.cat(outputs)


def draw_shifts(n: int, side: int, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """The random translations of a batch of ``n`` images (see :func:`augment_batch`)."""
    p = max(1, side // 12)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=generator).tolist()
    dx = torch.randint(0, 2 * p + 1, (n,), generator=generator).tolist()
    return dy, dx


def shift_images(x: torch.Tensor, dy: list[int], dx: list[int]) -> torch.Tensor:
    """Translate each image of ``x`` by its ``(dy, dx)`` from :func:`draw_shifts`."""
    _, _, h, w = x.shape
    p = max(1, h // 12)
    padded = F.pad(x, (p, p, p, p), mode="replicate")
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(len(x))])


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to 1/12 of the side, edges replicated."""
    return shift_images(x, *draw_shifts(len(x), x.shape[2], generator))


@torch.no_grad()
def evaluate(
    model: AdaptedModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    preprocess: Preprocess,
    batch_size: int = 32,
    device: str = "cpu",
    cache: FeatureCache | None = None,
) -> dict:
    """Top-1 accuracy and mean loss of ``model`` on uint8 ``images`` (a tensor, or images
    read from disk a batch at a time), ``batch_size`` images at a time (with ``cache``:
    the frozen taps of ``images``, reused where already computed). A model with dynamic
    gates adds what they executed: ``gate_branches_run``, ``gate_flops_kept``."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    gates = model.count_gates()  # None without dynamic gates
    for i in range(0, len(images), batch_size):
        y = labels[i : i + batch_size].to(device)
        if cache is None:
            logits = model(preprocess(images[i : i + batch_size].to(device)))
        else:
            idx = torch.arange(i, min(i + batch_size, len(images)))
            taps = cache.get(
                idx,
                lambda i=i: model.features.taps(preprocess(images[i : i + batch_size].to(device))),
            )
            logits = model.forward_taps(taps)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    model.train(was_training)
    n = max(1, len(images))
    result = {"accuracy": correct / n, "loss": loss_sum / n}
    return result if gates is None else result | gates.stop()


def memory_in_use(device: str) -> int:
    """Resident memory of this process (CPU) or the CUDA allocator's peak, in bytes."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    try:
        return process_memory_bytes("VmRSS")
    except OSError:
        return 0


# ---------------------------------------------------------------------------------------
# checkpoints


def _optimizer_tensors(optimizer: AdamW | SGD) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors = {
        f"optimizer.{idx}.{key}": value
        for idx, state in sd["state"].items()
        for key, value in state.items()
    }
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(optimizer: AdamW | SGD, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


@dataclass
class FitResult:
    history: list[dict]
    best_epoch: int
    best_val_accuracy: float
    best_state: Mapping[str, torch.Tensor]  # a dict, or the best epoch's file (LazyTensors)
    seconds: float
    resumed_from: int | None = None
    cache_bytes: int = 0  # cached features of the train and validation images
    optimizer_bytes: int = 0  # the optimizer's state at the end (AdamW: two moments)


def fit_domain(
    model: AdaptedModel,
    data,
    preprocess: Preprocess,
    method_config: MethodConfig,
    config: TrainConfig,
    **kwargs,
) -> FitResult:
    """:func:`fit` on the train and validation splits of a :class:`da3.data.DomainData`."""
    return fit(
        model,
        data.train.images,
        data.train.labels,
        data.val.images,
        data.val.labels,
        preprocess,
        method_config,
        config,
        **kwargs,
    )


def _lr_lambda(total_steps: int):
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def head_only_steps(config: MethodConfig, total_steps: int) -> int:
    """How many of the first steps only the head learns: ``head_warmup`` of ``total_steps``
    or ``head_warmup_steps``, the longer, but the steps at most a third of the run (so a
    short run still trains its adaptors for most of it)."""
    by_fraction = round(config.head_warmup * total_steps)
    by_steps = min(config.head_warmup_steps, total_steps // 3)
    return max(by_fraction, by_steps)


def lr_schedule(optimizer: AdamW | SGD, total_steps: int, wait: int) -> list:
    """Per parameter group, the factor on its learning rate at each step: cosine decay to zero
    over ``total_steps``; with ``wait`` > 0, every group but the head (the last, see
    :func:`make_optimizer`) stays at zero for the first ``wait`` steps, so the head learns
    alone first (then the cosine goes on where it is)."""
    cosine = _lr_lambda(total_steps)
    if not wait or len(optimizer.param_groups) < 2:
        return [cosine] * len(optimizer.param_groups)

    def after_warmup(step: int) -> float:
        return 0.0 if step < wait else cosine(step)

    return [after_warmup] * (len(optimizer.param_groups) - 1) + [cosine]


def check_cacheable(model: AdaptedModel) -> None:
    """Refuse ``cache_features`` for a method whose backbone output depends on what trains."""
    if not model.cacheable:
        raise Da3Error(
            f"cache_features=true: method {model.method!r} cannot cache features (its "
            "trainable state changes what the backbone computes); methods that can: "
            "udta, linear"
        )


def fit(
    model: AdaptedModel,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    preprocess: Preprocess,
    method_config: MethodConfig,
    config: TrainConfig,
    run_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    fingerprint: dict | None = None,
    echo: Callable[[str], None] | None = None,
    classes: torch.Tensor | None = None,
    schedule: tuple[int, int] | None = None,
    proximal: float = 0.0,
) -> FitResult:
    """Train ``model`` on one domain; see the module docstring.

    ``classes``: the loss reads only these classes' logits (a boolean mask; see
    :func:`train_step`): a device of a fleet holding images of some of the classes trains
    the head's rows of those and leaves the others to the devices that have them.
    ``schedule``: ``(start, total)``: this run is steps ``start`` onwards of a learning-rate
    schedule (and head warm-up) spread over ``total`` steps, instead of its own steps (a
    fleet's device, one round of many: the decay goes on across rounds, not over again).
    ``proximal``: FedProx's term (Li et al. 2020), ``proximal / 2 * ||w - w0||^2`` over the
    trainable parameters, ``w0`` their values when the fit starts (the global state a
    fleet's device received): each step's gradient gets ``proximal * (w - w0)``
    (:func:`add_proximal_term`), which holds a device near the fleet's state.

    With ``run_dir`` a checkpoint (``checkpoint.safetensors`` + ``checkpoint.json``) is
    written after each epoch; ``resume=True`` continues from it. ``fingerprint`` is any
    JSON that must match for a resume to be allowed (method, config, data, backbone).

    ``config.cache_features``: the frozen taps of the train and validation images are computed
    in the first epoch and reused after (see :mod:`da3.feature_cache`); each epoch's record
    gives the cache's size (``cache_bytes``) and the training pass's own time
    (``train_seconds``, validation excluded).
    """
    from tqdm import tqdm

    device = config.device
    model.to(device).train()
    classes = None if classes is None else classes.to(device)
    optimizer = make_optimizer(model, method_config)
    if proximal:
        add_proximal_term(optimizer, proximal)
    steps_per_epoch = math.ceil(len(train_images) / config.batch_size)
    total_steps = max(1, steps_per_epoch * config.epochs)
    start, span = schedule if schedule is not None else (0, total_steps)
    factors = lr_schedule(optimizer, span, head_only_steps(method_config, span))
    if start:
        factors = [lambda step, f=f: f(step + start) for f in factors]
    scheduler = LambdaSchedule(optimizer, factors)
    train_cache = val_cache = None
    if config.cache_features:
        check_cacheable(model)
        train_cache = FeatureCache(len(train_images), config.cache_dtype)
        val_cache = FeatureCache(len(val_images), config.cache_dtype)
    history: list[dict] = []
    best = {"epoch": -1, "accuracy": -1.0, "state": {}}
    start_epoch, resumed_from, elapsed = 0, None, 0.0
    ckpt_t = run_dir / "checkpoint.safetensors" if run_dir else None
    ckpt_j = run_dir / "checkpoint.json" if run_dir else None
    identity = {
        "fingerprint": fingerprint or {},
        "train": asdict(config),
        "method_config": asdict(method_config),
    }

    if resume:
        if ckpt_t is None or not ckpt_j.is_file():
            raise Da3Error(f"{run_dir}: no checkpoint to resume from")
        meta = read_json(ckpt_j)
        if meta.get("identity") != identity:
            raise Da3Error(f"{ckpt_j}: checkpoint is from a different run (config or data)")
        tensors = read_tensors(ckpt_t)
        model.load_training_state(
            {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        )
        _load_optimizer(optimizer, tensors, meta["optimizer"])
        scheduler.load_state_dict(meta["scheduler"])
        held = {k[len("best.") :]: v for k, v in tensors.items() if k.startswith("best.")}
        best = {
            "epoch": meta["best_epoch"],
            "accuracy": meta["best_val_accuracy"],
            # a checkpoint names its best epoch's file; one from before held the tensors
            "state": LazyTensors(run_dir / meta["best_file"]) if meta.get("best_file") else held,
        }
        del tensors, held
        history, start_epoch = meta["history"], meta["epoch"] + 1
        elapsed, resumed_from = meta["seconds"], meta["epoch"]

    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        order = torch.randperm(len(train_images), generator=g)
        seen = correct = 0
        loss_sum = 0.0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not progress,
            leave=True,
            dynamic_ncols=True,
        )
        for step in bar:
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            y = train_labels[idx].to(device)
            if train_cache is None:
                side = train_images.shape[2]
                shifts = draw_shifts(len(idx), side, g) if config.augment else None
                # In micro-batches, each micro-batch's images are read when it runs (from
                # disk if they are there); otherwise this batch's, once.
                whole = train_images[idx] if not 0 < config.micro_batch < len(idx) else None

                def inputs(part: slice, idx=idx, whole=whole, shifts=shifts) -> torch.Tensor:
                    images = whole[part] if whole is not None else train_images[idx[part]]
                    x = preprocess(images.to(device))
                    if shifts is None:
                        return x
                    return shift_images(x, shifts[0][part], shifts[1][part])

                loss, logits = train_step(
                    model, optimizer, inputs, y, micro_batch=config.micro_batch, classes=classes
                )
            else:
                taps = train_cache.get(
                    idx,
                    lambda idx=idx: model.features.taps(preprocess(train_images[idx].to(device))),
                )
                loss, logits = train_step(
                    model,
                    optimizer,
                    None,
                    y,
                    taps=taps,
                    micro_batch=config.micro_batch,
                    classes=classes,
                )
            if not torch.isfinite(loss):
                kept = (
                    f"; {ckpt_t} keeps epoch {history[-1]['epoch']}" if ckpt_t and history else ""
                )
                raise Da3Error(
                    f"training diverged: loss is {float(loss)} at epoch {epoch + 1}, step "
                    f"{step + 1}; lower the learning rate{kept}"
                )
            scheduler.step()
            seen += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(loss) * len(y)
            dt = time.perf_counter() - t0
            postfix = {
                "loss": f"{loss_sum / seen:.3f}",
                "acc": f"{correct / seen:.3f}",
                "img_s": f"{seen / dt:.0f}",
                "mem": f"{memory_in_use(device) / 2**20:.0f}MiB",
            }
            if train_cache is not None:
                postfix["cache"] = f"{train_cache.nbytes / 2**20:.0f}MiB"
            bar.set_postfix(postfix)
        train_seconds = time.perf_counter() - t0
        val = evaluate(
            model, val_images, val_labels, preprocess, config.eval_batch, device, val_cache
        )
        seconds = time.perf_counter() - t0
        cache_bytes = sum(c.nbytes for c in (train_cache, val_cache) if c is not None)
        elapsed += seconds
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(1, seen),
            "train_accuracy": correct / max(1, seen),
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "seconds": seconds,
            "train_seconds": train_seconds,
            "images_per_second": seen / seconds,
            "cache_bytes": cache_bytes,
            **{k: v for k, v in val.items() if k.startswith("gate_")},  # on val, at inference
        }
        history.append(record)
        line = (
            f"  epoch {epoch + 1}/{config.epochs}: val accuracy {val['accuracy']:.4f}, "
            f"train loss {record['train_loss']:.4f}, {seconds:.1f}s"
        )
        if "gate_branches_run" in val:
            line += f"; {GateUsage.describe(val)}"
        if echo is not None:
            echo(line)
        elif progress:
            bar.write(line)
        previous = best["state"]
        if val["accuracy"] > best["accuracy"]:
            # With a run folder the best epoch's state waits on disk, not in memory (for a
            # fine-tuned network it is a copy of every weight); without, a copy is kept.
            if run_dir is not None:
                best_file = run_dir / f"best-epoch{epoch + 1}.safetensors"
                write_tensors(best_file, model.domain_state())
                state = LazyTensors(best_file)
            else:
                state = {k: v.detach().clone() for k, v in model.domain_state().items()}
            best = {"epoch": epoch + 1, "accuracy": val["accuracy"], "state": state}
        if run_dir is not None:
            opt_tensors, opt_meta = _optimizer_tensors(optimizer)
            tensors = {f"model.{k}": v for k, v in model.training_state().items()}
            held = best["state"] if isinstance(best["state"], dict) else {}  # an old run's
            tensors |= {f"best.{k}": v for k, v in held.items()} | opt_tensors
            write_tensors(ckpt_t, tensors)
            del tensors, opt_tensors
            write_json(
                ckpt_j,
                {
                    "identity": identity,
                    "epoch": epoch,
                    "history": history,
                    "best_epoch": best["epoch"],
                    "best_val_accuracy": best["accuracy"],
                    "best_file": best["state"].path.name
                    if isinstance(best["state"], LazyTensors)
                    else None,
                    "optimizer": opt_meta,
                    "scheduler": scheduler.state_dict(),
                    "seconds": elapsed,
                },
            )
            # the checkpoint names the new best file now: the one it replaced can go
            if isinstance(previous, LazyTensors) and previous is not best["state"]:
                previous.path.unlink(missing_ok=True)
    cache_bytes = sum(c.nbytes for c in (train_cache, val_cache) if c is not None)
    return FitResult(
        history,
        best["epoch"],
        best["accuracy"],
        best["state"],
        elapsed,
        resumed_from,
        cache_bytes,
        optimizer_state_bytes(optimizer),
    )
