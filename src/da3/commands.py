"""The domain commands: ``train``, ``eval``, ``predict``, ``domains``, ``demo``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
from pathlib import Path

from da3.errors import Da3Error

DEFAULT_STORE = "da3-store"
TRAIN_KEYS = ("epochs", "batch_size", "seed", "augment", "device", "cache_features", "cache_dtype")
RUN_KEYS = ("domain", "data", "method", "backbone", "weights", "image_size") + TRAIN_KEYS


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        default=os.environ.get("DA3_STORE", DEFAULT_STORE),
        help="folder of domain files (default: $DA3_STORE or ./da3-store)",
    )


def register(commands) -> None:
    p = commands.add_parser(
        "train",
        help="learn a new domain on the frozen backbone and save it",
        description="Train one domain. Settings come from defaults < --config FILE.yaml < "
        "flags < key=value (method config keys too, e.g. reduction=4 gates=true).",
    )
    p.add_argument("--domain", help="name of the new domain")
    p.add_argument("--data", help="benchmark domain (see `da3 data list`) or an image folder")
    p.add_argument("--method", help="method (default da3)")
    p.add_argument("--backbone", help="backbone (default efficientnet_lite0)")
    p.add_argument("--weights", help="imagenet (default), none, or a weights file")
    p.add_argument("--epochs", type=int)
    p.add_argument("--image-size", type=int, dest="image_size")
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument(
        "--cache-features",
        action="store_const",
        const=True,
        dest="cache_features",
        help="compute the frozen backbone features once and reuse them each epoch (udta, "
        "linear; needs augment=false)",
    )
    p.add_argument("--config", type=Path, help="YAML file of settings")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing domain")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    _store_arg(p)
    p.set_defaults(run=run_train)

    p = commands.add_parser("eval", help="accuracy of a saved domain on a data split")
    p.add_argument("--domain", required=True)
    p.add_argument("--data", help="data to evaluate on (default: the domain's own)")
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    _store_arg(p)
    p.set_defaults(run=run_eval)

    p = commands.add_parser("predict", help="classify an image or a folder of images")
    p.add_argument("path", type=Path, metavar="IMAGE_OR_FOLDER")
    p.add_argument("--domain", required=True)
    p.add_argument("--top-k", type=int, default=3, dest="top_k")
    _store_arg(p)
    p.set_defaults(run=run_predict)

    p = commands.add_parser("domains", help="list, show or delete saved domains")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = sub.add_parser("list", help="the domains in the store")
    _store_arg(q)
    q.set_defaults(run=run_domains_list)
    q = sub.add_parser("show", help="everything about one domain")
    q.add_argument("name")
    _store_arg(q)
    q.set_defaults(run=run_domains_show)
    q = sub.add_parser("delete", help="delete a domain's files")
    q.add_argument("name")
    _store_arg(q)
    q.set_defaults(run=run_domains_delete)

    p = commands.add_parser(
        "demo",
        help="learn the five offline domains one after another with DA3 (the README's demo)",
    )
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None, dest="image_size")
    p.add_argument("--domains", default=None, help="comma-separated subset")
    p.add_argument("--quiet", action="store_true")
    _store_arg(p)
    p.set_defaults(run=run_demo)


# ---------------------------------------------------------------------------------------
# train


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise Da3Error(f"{item!r}: expected key=value")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = value.strip()
    return out


MAX_YAML_BYTES = 2**20  # a settings file is a few hundred bytes


def _read_yaml(path: Path) -> dict:
    """Settings from a YAML file: a mapping of names to single values. The ``config.yaml``
    of a run folder reads too: its ``config`` mapping holds the method's keys."""
    import yaml

    from da3.io import one_line, read_bytes

    text = read_bytes(path, MAX_YAML_BYTES, "settings file")
    try:
        data = yaml.safe_load(text.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError, ValueError) as err:
        detail = "nested too deeply" if isinstance(err, RecursionError) else one_line(err)
        raise Da3Error(f"{path}: not valid YAML ({detail})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise Da3Error(f"{path}: expected a mapping of settings")
    nested = data.pop("config", None)
    if nested is not None and not isinstance(nested, dict):
        raise Da3Error(f"{path}: 'config' must be a mapping of method settings")
    out = {}
    for key, value in [*(nested or {}).items(), *data.items()]:
        # A single value each: a list or mapping (YAML aliases can make one enormous) is
        # refused here rather than printed or converted later.
        if not isinstance(key, str | int | float | bool):
            raise Da3Error(f"{path}: a setting's name must be a word, got a {type(key).__name__}")
        if value is not None and not isinstance(value, str | int | float | bool):
            raise Da3Error(f"{path}: setting {_short(key)} must be a single value")
        out[str(key).replace("-", "_")] = value
    return out


def _short(value, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters, for a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve_settings(args) -> tuple[dict, dict]:
    """(run settings, method config values) from defaults, YAML, flags and key=value."""
    from da3.backbones import list_backbones
    from da3.data.imaging import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
    from da3.methods import get_method, parse_config
    from da3.train import TrainConfig

    defaults = {
        "method": "da3",
        "backbone": "efficientnet_lite0",
        "weights": "imagenet",
        "image_size": 96,
        **{f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in TRAIN_KEYS},
    }
    values = dict(defaults)
    from_file: set[str] = set()
    if args.config is not None:
        loaded = _read_yaml(args.config)
        values.update(loaded)
        from_file = set(loaded)
    flags = {k: getattr(args, k) for k in RUN_KEYS if getattr(args, k, None) is not None}
    overrides = _parse_overrides(args.overrides)
    values.update(flags)
    values.update(overrides)
    from_file -= set(flags) | set(overrides)

    def at(*keys: str) -> str:
        """Where a faulty value came from, when it was the settings file."""
        return f"{args.config}: " if from_file.intersection(keys) else ""

    @contextlib.contextmanager
    def blaming(*keys: str):
        try:
            yield
        except Da3Error as err:
            raise Da3Error(f"{at(*keys)}{err}") from None

    run = {k: values.pop(k) for k in RUN_KEYS if k in values}
    for key in ("domain", "data"):
        if not run.get(key):
            raise Da3Error(f"train: --{key} is required")
    for key in ("domain", "data", "method", "backbone", "weights", "device", "cache_dtype"):
        value = run[key]
        if (key != "weights" or value is not None) and (
            not isinstance(value, str) or "\0" in value
        ):
            raise Da3Error(f"{at(key)}setting {key!r} expects a word, got {_short(value)}")
    with blaming("method"):
        get_method(run["method"])
    known = {f.name for f in dataclasses.fields(get_method(run["method"]).config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise Da3Error(
            f"{at(unknown[0])}unknown setting {_short(unknown[0])}; run settings: "
            f"{', '.join(RUN_KEYS)}; {run['method']} config: {', '.join(sorted(known))}"
        )
    for key, kind in (("epochs", int), ("batch_size", int), ("seed", int), ("image_size", int)):
        value = run[key]
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            run[key] = kind(value)
        except (TypeError, ValueError, OverflowError):
            raise Da3Error(
                f"{at(key)}setting {key!r} expects an integer, got {_short(value)}"
            ) from None
        if run[key] < (0 if key == "seed" else 1):
            raise Da3Error(f"{at(key)}setting {key!r} must be positive, got {run[key]}")
    if not MIN_IMAGE_SIZE <= run["image_size"] <= MAX_IMAGE_SIZE:
        raise Da3Error(
            f"{at('image_size')}setting 'image_size' must be between {MIN_IMAGE_SIZE} and "
            f"{MAX_IMAGE_SIZE}, got {run['image_size']}"
        )
    if run["backbone"] not in list_backbones():  # before any data is loaded
        raise Da3Error(
            f"{at('backbone')}unknown backbone {_short(run['backbone'])}; choose from "
            f"{', '.join(list_backbones())}"
        )
    for key in ("augment", "cache_features"):
        text = str(run[key]).lower()
        if text not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise Da3Error(
                f"{at(key)}setting {key!r} expects true or false, got {_short(run[key])}"
            )
        run[key] = text in ("1", "true", "yes", "on")
    with blaming(*TRAIN_KEYS):
        TrainConfig(**{k: run[k] for k in TRAIN_KEYS})  # the checks that need no data
    with blaming("device"):
        check_device(run["device"])
    with blaming(*values):  # the method's keys from the file alone, so a fault names it
        parse_config(run["method"], {k: v for k, v in values.items() if k in from_file})
    # A folder given relative to here is recorded absolute, so `eval` works from anywhere.
    from da3.data import BENCHMARK_DOMAINS

    try:
        local = run["data"] not in BENCHMARK_DOMAINS and Path(run["data"]).exists()
    except OSError as err:  # a name no file system takes (too long, say)
        raise Da3Error(
            f"{at('data')}setting 'data' {_short(run['data'])}: not a benchmark domain or a "
            f"folder ({err.strerror})"
        ) from None
    if local:
        run["data"] = str(Path(run["data"]).resolve())
    return run, values


def check_device(device: str) -> str:
    import torch

    if device not in ("cpu", "cuda"):
        raise Da3Error(f"setting 'device' must be cpu or cuda, got {_short(device)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise Da3Error("device cuda: no CUDA device is available on this machine")
    return device


def train_domain(
    run: dict,
    method_values: dict,
    store_dir: Path,
    *,
    resume=False,
    overwrite=False,
    progress=True,
    model=None,
) -> dict:
    """Train domain ``run['domain']`` and save it; returns its metadata. Shared by the
    ``train`` command and the demo (which passes its own :class:`MultiDomainModel`).

    The name is locked in the store for the whole run, before anything is written
    (:meth:`DomainStore.lock`): a second writer of the same name, ``overwrite`` or not,
    is refused at once and this run's files are left alone."""
    from da3.domains import DomainStore, check_name

    with DomainStore(store_dir).lock(check_name(run["domain"])):
        return _train_domain_locked(
            run,
            method_values,
            store_dir,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
            model=model,
        )


def _train_domain_locked(
    run: dict,
    method_values: dict,
    store_dir: Path,
    *,
    resume=False,
    overwrite=False,
    progress=True,
    model=None,
) -> dict:
    import yaml

    from da3.backbones import create_backbone
    from da3.data import load_domain
    from da3.domains import DomainStore, MultiDomainModel, check_name
    from da3.methods import parse_config
    from da3.train import TrainConfig, check_cacheable, evaluate, fit_domain

    name = check_name(run["domain"])
    store = DomainStore(store_dir)
    if store.exists(name) and not (overwrite or resume):
        raise Da3Error(f"domain {name!r} exists in {store.root}; use --overwrite to replace it")
    checkpoints = store.checkpoint_dir(name, resume=resume)  # this run's own folder
    config = parse_config(run["method"], method_values)
    tc = TrainConfig(**{k: run[k] for k in TRAIN_KEYS if k in run})
    data = load_domain(run["data"], run["image_size"], progress=progress)
    if model is None:
        model = MultiDomainModel(create_backbone(run["backbone"], run["weights"]), run["device"])
    if name in model.domains:
        model.remove(name)
    domain = model.add_domain(
        name, data.classes, run["method"], config, run["image_size"], seed=run["seed"]
    )
    domain.source = run["data"]
    if tc.cache_features:
        check_cacheable(domain.model)  # before anything of the run is written
    run_dir = store.run_dir(name)
    resolved = {**run, "config": dataclasses.asdict(config)}
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    except OSError as err:
        raise Da3Error(f"{run_dir}: cannot write here ({err.strerror})") from None
    result = fit_domain(
        domain.model,
        data,
        model.preprocess,
        config,
        tc,
        run_dir=checkpoints,
        resume=resume,
        progress=progress,
        fingerprint={
            "domain": name,
            "data": run["data"],
            "method": run["method"],
            "config": dataclasses.asdict(config),
            "backbone": model.backbone_record(),
            "image_size": run["image_size"],
        },
    )
    domain.model.load_domain_state(result.best_state)
    test = evaluate(
        domain.model, data.test.images, data.test.labels, model.preprocess, device=run["device"]
    )
    domain.metrics = {
        "val_accuracy": result.best_val_accuracy,
        "test_accuracy": test["accuracy"],
        "best_epoch": result.best_epoch,
        "train_seconds": result.seconds,
        "train_images": len(data.train.images),
    }
    domain.train = {k: run[k] for k in TRAIN_KEYS if k in run} | {"data": run["data"]}
    from da3.io import write_json

    write_json(run_dir / "history.json", {"history": result.history, "metrics": domain.metrics})
    plot_curves(result.history, run_dir / "curves.png", title=f"{name} ({run['method']})")
    model.save(name, store)
    store.prune_checkpoints(name, keep=checkpoints)  # the other runs' are superseded now
    return {
        "name": name,
        "metrics": domain.metrics,
        "run_dir": str(run_dir),
        "file": str(store.paths(name)[0]),
        "history": result.history,
    }


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    a.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend()
    b.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    b.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="val")
    b.set_xlabel("epoch"), b.set_ylabel("top-1 accuracy"), b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def run_train(args) -> int:
    run, method_values = resolve_settings(args)
    info = train_domain(
        run,
        method_values,
        Path(args.store),
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    m = info["metrics"]
    print(
        f"domain {info['name']}: val {m['val_accuracy']:.4f}, test {m['test_accuracy']:.4f} "
        f"(best epoch {m['best_epoch']}), {m['train_seconds']:.0f}s -> {info['file']}"
    )
    print(f"run folder: {info['run_dir']} (config.yaml, history.json, curves.png)")
    return 0


# ---------------------------------------------------------------------------------------
# eval / predict / domains


def _open(store_dir: str, name: str, device: str = "cpu"):
    from da3.domains import DomainStore, open_backbone_for

    store = DomainStore(store_dir)
    model = open_backbone_for(store, name, device)
    model.load(name, store)
    return model, store


def run_eval(args) -> int:
    from da3.data import load_domain

    model, _ = _open(args.store, args.domain, check_device(args.device))
    d = model.get(args.domain)
    source = args.data or d.source
    if not source:
        raise Da3Error(f"domain {args.domain!r} records no data source; pass --data")
    data = load_domain(source, d.image_size)
    if list(data.classes) != d.classes:
        raise Da3Error(f"{source}: classes differ from domain {args.domain!r}'s")
    split = getattr(data, args.split)
    r = model.evaluate(args.domain, split.images, split.labels)
    print(
        f"{args.domain} on {source} [{args.split}, {len(split.labels)} images]: "
        f"top-1 {r['accuracy']:.4f}, loss {r['loss']:.4f}"
    )
    return 0


def _image_files(path: Path) -> list[Path]:
    from da3.data.folder import IMAGE_EXTENSIONS, _skipped

    if not path.exists():
        raise Da3Error(f"{path}: no such file or folder")
    if path.is_file():
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not _skipped(p.name) and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise Da3Error(f"{path}: no image files in this folder")
    return files


def run_predict(args) -> int:
    import numpy as np
    import torch

    from da3.data.folder import load_image

    if args.top_k < 1:
        raise Da3Error(f"--top-k must be at least 1, got {args.top_k}")
    files = _image_files(args.path)
    model, _ = _open(args.store, args.domain)
    d = model.get(args.domain)
    for i in range(0, len(files), 64):
        chunk = files[i : i + 64]
        images = torch.from_numpy(np.stack([load_image(f, d.image_size) for f in chunk]))
        for f, top in zip(chunk, model.top_k(images, args.domain, args.top_k), strict=True):
            print(f"{f}: " + ", ".join(f"{c} {p:.3f}" for c, p in top))
    return 0


def run_domains_list(args) -> int:
    from da3.domains import DomainStore

    store = DomainStore(args.store)
    names = store.names()
    if not names:
        print(f"no domains in {store.root}")
        return 0
    rows = [("domain", "method", "backbone", "classes", "test top-1", "file KiB")]
    for n in names:
        try:
            meta = store.read_meta(n)
            acc = meta.get("metrics", {}).get("test_accuracy")
            rows.append(
                (
                    n,
                    meta["method"],
                    meta["backbone"]["name"],
                    str(len(meta["classes"])),
                    "-" if acc is None else f"{acc:.4f}",
                    f"{store.size_bytes(n) / 1024:.0f}",
                )
            )
        except (Da3Error, OSError) as err:
            rows.append((n, f"unreadable: {err}", "", "", "", ""))
    print(_table(rows))
    return 0


def run_domains_show(args) -> int:
    import json

    from da3.domains import DomainStore

    store = DomainStore(args.store)
    meta, tensors = store.read(args.name)
    meta["tensors"] = {k: list(v.shape) for k, v in tensors.items()}
    meta["file_bytes"] = store.size_bytes(args.name)
    print(json.dumps(meta, indent=2))
    return 0


def run_domains_delete(args) -> int:
    from da3.domains import DomainStore

    store = DomainStore(args.store)
    with store.lock(args.name):  # not while it is being trained
        store.delete(args.name)
    print(f"deleted domain {args.name!r} from {store.root}")
    return 0


def _table(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            str(c).ljust(w) if j == 0 else str(c).rjust(w)
            for j, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    )


# ---------------------------------------------------------------------------------------
# demo


def run_demo(args) -> int:
    from da3.demo import run as demo

    return demo(args)
