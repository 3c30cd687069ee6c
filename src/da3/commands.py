"""The domain commands: ``train``, ``eval``, ``predict``, ``domains``, ``demo``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from da3.errors import Da3Error
from da3.tables import text_table

DEFAULT_STORE = "da3-store"


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
    p.add_argument(
        "--micro-batch",
        type=int,
        dest="micro_batch",
        help="images per forward/backward pass; gradients add up over a batch (exact where "
        "no batch norm trains: da3, bias, linear, tinytl, udta, piggyback)",
    )
    p.add_argument(
        "--memory-budget",
        dest="memory_budget",
        help="memory the run may use above the runtime, e.g. 48MB: plans the micro-batch, "
        "refuses before any work if even 1 image does not fit",
    )
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


def resolve_settings(args):
    """The run's :class:`~da3.training.TrainSettings` from YAML < flags < key=value. A
    faulty value that came from the settings file is reported with the file's name."""
    from da3.data import BENCHMARK_DOMAINS
    from da3.training import TrainSettings

    from_file: dict = {}
    if args.config is not None:
        from_file = _read_yaml(args.config)
    flags = {
        k: getattr(args, k) for k in TrainSettings.run_keys() if getattr(args, k, None) is not None
    }
    values = {**from_file, **flags, **_parse_overrides(args.overrides)}
    # A folder given relative to here is recorded absolute, so `eval` works from anywhere.
    data = values.get("data")
    if isinstance(data, str) and data and data not in BENCHMARK_DOMAINS:
        try:
            local = Path(data).exists()
        except (OSError, ValueError) as err:  # a name no file system takes (too long, say)
            where = f"{args.config}: " if from_file.get("data") == data else ""
            raise Da3Error(
                f"{where}setting 'data' {_short(data)}: not a benchmark domain or a folder "
                f"({getattr(err, 'strerror', None) or err})"
            ) from None
        if local:
            values["data"] = str(Path(data).resolve())
    try:
        settings = TrainSettings.from_values(values)
    except Da3Error as err:
        own = {k: v for k, v in from_file.items() if values.get(k) == v}
        if own:  # does the file's part alone fail the same way? then the file is at fault
            try:
                TrainSettings.from_values(
                    {"domain": "x", "data": "x", "method": values.get("method", "da3"), **own}
                )
            except Da3Error as alone:
                if str(alone) == str(err):
                    raise Da3Error(f"{args.config}: {err}") from None
        raise
    check_device(settings.device)
    return settings


def check_device(device: str) -> str:
    import torch

    if device not in ("cpu", "cuda"):
        raise Da3Error(f"setting 'device' must be cpu or cuda, got {_short(device)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise Da3Error("device cuda: no CUDA device is available on this machine")
    return device


def run_train(args) -> int:
    from da3.memory import lean_allocator
    from da3.training import describe_memory, train_domain

    lean_allocator()  # freed tensors go back to the system (see its docstring)

    settings = resolve_settings(args)
    info = train_domain(
        settings,
        Path(args.store),
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.quiet,
        echo=print,
    )
    m = info.metrics
    print(
        f"domain {info.name}: val {m['val_accuracy']:.4f}, test {m['test_accuracy']:.4f} "
        f"(best epoch {m['best_epoch']}), {m['train_seconds']:.0f}s -> {info.file}"
    )
    for line in describe_memory(info.memory):
        print(line)
    print(f"run folder: {info.run_dir} (config.yaml, history.json, curves.png)")
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
    print(text_table(rows))
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


# ---------------------------------------------------------------------------------------
# demo


def run_demo(args) -> int:
    from da3.demo import run as demo

    return demo(args)
