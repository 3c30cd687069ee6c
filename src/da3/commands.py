"""The domain commands: ``train``, ``eval``, ``predict``, ``domains``, ``demo``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from da3.errors import Da3Error
from da3.tables import text_table

DEFAULT_STORE = "da3-store"


def _frozen_bits_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--frozen-bits",
        dest="frozen_bits",
        help="hold the frozen backbone's weights in 32, 16 or 8 bits (default: the precision "
        "the domain was trained with)",
    )


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        default=os.environ.get("DA3_STORE", DEFAULT_STORE),
        help="folder of domain files (default: $DA3_STORE or ./da3-store)",
    )


# What `da3 train` does when a setting is not given: the defaults of
# da3.training.TrainSettings, repeated here so that `--help` needs no torch (a test checks
# that they agree).
TRAIN_DEFAULTS = {
    "method": "da3",
    "backbone": "efficientnet_lite0",
    "weights": "imagenet",
    "image_size": 96,
    "epochs": 5,
    "batch_size": 32,
    "micro_batch": 0,
    "seed": 0,
    "device": "cpu",
    "frozen_bits": 32,
}
TOP_K = 3
SPLIT_RULE = (
    "A folder of class folders is split 60/10/30 (train/val/test) inside each class, the same "
    "way every time; a folder with train/, val/, test/ folders keeps its splits."
)
CACHE_NOTE = (
    "Images are decoded once per image size into the cache ($DA3_CACHE_DIR, default "
    "~/.cache/da3; `da3 cache list`, `da3 cache clear`)."
)


def _default(key: str) -> str:
    return f"(default {TRAIN_DEFAULTS[key]})"


def register(commands) -> None:
    p = commands.add_parser(
        "train",
        help="learn a new domain on the frozen backbone and save it",
        description="Train one domain and save it in the store. Settings come from defaults "
        "< --config FILE.yaml < flags < key=value (method config keys too, e.g. reduction=4 "
        f"gates=true; see docs/methods.md). {SPLIT_RULE} {CACHE_NOTE} The run's settings "
        "(a valid --config), history and curves go to STORE/runs/NAME/.",
    )
    p.add_argument("--domain", help="name of the new domain")
    p.add_argument(
        "--data",
        help="benchmark domain (see `da3 data list`) or a folder with one sub-folder per class",
    )
    p.add_argument("--method", help=f"method {_default('method')}")
    p.add_argument("--backbone", help=f"backbone {_default('backbone')}")
    p.add_argument(
        "--weights",
        help="imagenet, none (random), or a weights file (default imagenet; only "
        "efficientnet_lite0 ships its ImageNet weights, torchvision's backbones download theirs)",
    )
    p.add_argument(
        "--epochs", type=int, help=f"passes over the training split {_default('epochs')}"
    )
    p.add_argument(
        "--image-size",
        type=int,
        dest="image_size",
        help=f"side of the square images, in pixels {_default('image_size')}",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        dest="batch_size",
        help=f"images per step {_default('batch_size')}",
    )
    p.add_argument(
        "--micro-batch",
        type=int,
        dest="micro_batch",
        help="images per forward/backward pass; gradients add up over a batch (exact where "
        "no batch norm trains: da3, bias, linear, tinytl, udta, piggyback); such a run puts "
        "memory first (convolutions sliced, on PyTorch's own CPU kernels, not oneDNN's) "
        "(default 0: the whole batch)",
    )
    p.add_argument(
        "--memory-budget",
        dest="memory_budget",
        help="memory the run may use above the runtime, e.g. 48MB: plans the micro-batch, "
        "refuses before any work if even 1 image does not fit (default: no budget)",
    )
    p.add_argument(
        "--seed", type=int, help=f"seed of init, shuffling, augmentation {_default('seed')}"
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help=f"{_default('device')}")
    p.add_argument(
        "--cache-features",
        action="store_const",
        const=True,
        dest="cache_features",
        help="compute the frozen backbone features once and reuse them each epoch (udta, "
        "linear; needs augment=false)",
    )
    p.add_argument(
        "--frozen-bits",
        dest="frozen_bits",
        help="precision of the frozen backbone's weights: 32 (float32), 16 (float16) or 8 "
        "(int8, a scale per output channel); 8 holds them in ~1/4 of the memory "
        f"{_default('frozen_bits')}",
    )
    p.add_argument("--config", type=Path, help="YAML file of settings (e.g. a run's config.yaml)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the last interrupted run of this name from its last finished epoch",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing domain")
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars (the data summary, warnings and one line per epoch stay)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value")
    _store_arg(p)
    p.set_defaults(run=run_train)

    p = commands.add_parser(
        "eval",
        help="accuracy of a saved domain on labelled images",
        description="Accuracy of a saved domain. Without --data: on the domain's own data, its "
        "test split by default. With --data: any labelled folder (one sub-folder per class) "
        "whose classes are the domain's or some of them, all of its images by default. "
        f"{SPLIT_RULE}",
    )
    p.add_argument("--domain", required=True)
    p.add_argument(
        "--data",
        help="a benchmark domain or a folder of class folders (default: the data the domain "
        "was trained on)",
    )
    p.add_argument(
        "--split",
        choices=["train", "val", "test", "all"],
        help="which images (default: test for the domain's own data, all for other data)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="(default cpu)")
    _frozen_bits_arg(p)
    _store_arg(p)
    p.set_defaults(run=run_eval)

    p = commands.add_parser(
        "predict",
        help="classify images and folders of images",
        description="The top classes of each image, one line per image (or --json / --csv). "
        "A folder is searched for images, nested folders included; files that are not images "
        "(by their extension) are passed over.",
    )
    p.add_argument("paths", type=Path, nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--domain", required=True)
    p.add_argument(
        "--top-k",
        type=int,
        default=TOP_K,
        dest="top_k",
        help=f"classes per image (default {TOP_K})",
    )
    form = p.add_mutually_exclusive_group()
    form.add_argument(
        "--json",
        action="store_true",
        help="print one JSON array: {path, predictions: [{class, probability}]} per image",
    )
    form.add_argument(
        "--csv",
        action="store_true",
        help="print CSV: path, class_1, probability_1, ... (a header line first)",
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="report an image that cannot be read on stderr and go on (default: stop there)",
    )
    _store_arg(p)
    p.set_defaults(run=run_predict)

    p = commands.add_parser("domains", help="list, show or delete saved domains")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = sub.add_parser("list", help="the domains in the store")
    _store_arg(q)
    q.set_defaults(run=run_domains_list)
    q = sub.add_parser("show", help="one domain: classes, data, settings, metrics, files")
    q.add_argument("name")
    q.add_argument("--json", action="store_true", help="everything in the domain's JSON file")
    _store_arg(q)
    q.set_defaults(run=run_domains_show)
    q = sub.add_parser(
        "delete",
        help="delete a domain: its files, its run folder and its exports in the store",
    )
    q.add_argument("name")
    _store_arg(q)
    q.set_defaults(run=run_domains_delete)

    p = commands.add_parser(
        "demo",
        help="learn the five offline domains one after another with DA3 (the README's demo)",
    )
    p.add_argument("--epochs", type=int, default=None, help="epochs per domain (default 4)")
    p.add_argument("--image-size", type=int, default=None, dest="image_size", help="(default 64)")
    p.add_argument("--domains", default=None, help="comma-separated subset (default all five)")
    p.add_argument(
        "--frozen-bits",
        dest="frozen_bits",
        help="the frozen backbone's weights in 32, 16 or 8 bits (default 32)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _store_arg(p)
    p.set_defaults(run=run_demo)


# ---------------------------------------------------------------------------------------
# train


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
    from da3.training import TrainSettings, parse_overrides

    from_file: dict = {}
    if args.config is not None:
        from_file = _read_yaml(args.config)
    flags = {
        k: getattr(args, k) for k in TrainSettings.run_keys() if getattr(args, k, None) is not None
    }
    values = {**from_file, **flags, **parse_overrides(args.overrides)}
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


def no_blas_buffers() -> None:
    """Have MKL (torch's BLAS on x86) free its matrix-product workspaces after each call
    instead of keeping them for the next one (``MKL_DISABLE_FAST_MM``, unless the
    environment sets it already). MKL reads this when torch is loaded: it must be set
    before torch is first imported, as ``da3 train`` does for a run that puts memory first.
    It saves each thread's workspace, what PyTorch's own convolution kernels leave, and
    costs time: ``benchmarks/results/memory_mkl.md``."""
    os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")


def memory_first_requested(args) -> bool:
    """Whether a ``da3 train`` run puts memory first (micro-batches smaller than the
    batch, or a memory budget), from its flags, settings file and ``key=value`` settings as
    given, before torch is imported (:attr:`~da3.training.TrainSettings.memory_first` is
    the run's own answer, once its settings are checked; a faulty value reads as no here
    and is reported there)."""
    values: dict = {}
    try:
        if getattr(args, "config", None) is not None:
            values.update(_read_yaml(args.config))
        for key in ("batch_size", "micro_batch", "memory_budget"):
            if getattr(args, key, None) is not None:
                values[key] = getattr(args, key)
        for item in getattr(args, "overrides", None) or []:
            key, _, value = item.partition("=")
            values[key.strip().replace("-", "_")] = value.strip()
        budget = str(values.get("memory_budget") or "0").strip()
        micro = int(values.get("micro_batch") or 0)
        batch = int(values.get("batch_size") or 32)  # TrainSettings' default
    except (Da3Error, TypeError, ValueError):
        return False
    return budget not in ("0", "") or 0 < micro < batch


def run_train(args) -> int:
    if memory_first_requested(args):
        no_blas_buffers()  # before torch is imported (below)
    from da3.memory import MEMORY_FIRST_MMAP_THRESHOLD, lean_allocator
    from da3.store import DomainStore
    from da3.training import describe_memory, train_domain

    lean_allocator()  # freed tensors go back to the system (see its docstring)

    settings = resolve_settings(args)
    if settings.memory_first:
        lean_allocator(MEMORY_FIRST_MMAP_THRESHOLD)
    store = DomainStore(args.store)
    name = settings.domain
    unfinished = store.unfinished_run(name) if not args.resume else None
    if unfinished and (args.overwrite or not store.exists(name)):
        folder, done, total = unfinished
        print(
            f"note: an earlier run of {name!r} stopped after epoch {done} of {total} "
            f"(checkpoint in {folder}); this run starts over. To continue that one instead, "
            "stop this and add --resume",
            file=sys.stderr,
        )
    try:
        info = train_domain(
            settings,
            store,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.quiet,
            echo=print,
        )
    except KeyboardInterrupt:
        stopped = store.unfinished_run(name)
        if stopped is None:
            hint = "no epoch had finished, so there is nothing to resume"
        else:
            folder, done, total = stopped
            hint = (
                f"epochs 1-{done} of {total} are saved in {folder}; run the same command "
                "with --resume to continue from there"
            )
        print(f"da3: interrupted; {hint}", file=sys.stderr)
        return 130
    m = info.metrics
    gates = _gate_text(m, "test")
    print(
        f"domain {info.name}: val {m['val_accuracy']:.4f}, test {m['test_accuracy']:.4f} "
        f"(best epoch {m['best_epoch']}), {m['train_seconds']:.0f}s -> {info.file}"
        + (f"\n  {gates}" if gates else "")
    )
    for line in describe_memory(info.memory):
        print(line)
    print(f"run folder: {info.run_dir} (config.yaml, history.json, curves.png)")
    return 0


def _gate_text(record: dict, where: str) -> str:
    """``gates on test: 43% of branches run, 71% of FLOPs kept`` or ""."""
    if "gate_branches_run" not in record:
        return ""
    return (
        f"gates on {where}: {100 * record['gate_branches_run']:.0f}% of gated branches run, "
        f"{100 * record['gate_flops_kept']:.0f}% of the FLOPs kept"
    )


# ---------------------------------------------------------------------------------------
# eval / predict / domains


def _open_domain(store_dir: str, name: str, device: str = "cpu", frozen_bits: int | None = None):
    """(model holding domain ``name``, store); the frozen weights in ``frozen_bits`` (default
    the precision the domain was trained with; another one is allowed and noted on stderr)."""
    from da3.domains import open_domain

    # the backbone in the one form the domain's method reads: its weights held once
    model, store = open_domain(store_dir, name, device, frozen_bits, forms="own")
    note = model.precision_note(name)
    if note:
        print(note, file=sys.stderr)
    return model, store


def _same_data(given: str, recorded: str) -> bool:
    if given == recorded:
        return True
    try:
        return bool(recorded) and Path(given).resolve() == Path(recorded).resolve()
    except (OSError, ValueError):
        return False


def _check_classes(classes: list[str], d, source: str) -> None:
    unknown = [c for c in classes if c not in d.classes]
    if unknown:
        listed = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        known = ", ".join(d.classes[:10]) + (", ..." if len(d.classes) > 10 else "")
        raise Da3Error(
            f"{source}: not classes of domain {d.name!r}: {listed} ({len(unknown)} of the "
            f"{len(classes)} classes there; the domain's classes: {known})"
        )


def run_eval(args) -> int:
    import torch

    from da3.data import BENCHMARK_DOMAINS, load_domain
    from da3.data.folder import scan
    from da3.precision import frozen_bits_value

    bits = frozen_bits_value(args.frozen_bits)
    model, _ = _open_domain(args.store, args.domain, check_device(args.device), bits)
    d = model.get(args.domain)
    own = args.data is None or _same_data(args.data, d.source)
    source = args.data or d.source
    if not source:
        raise Da3Error(
            f"domain {args.domain!r} records no data source (saved by a da3 before it did, or "
            "from Python without one); pass --data"
        )
    split_name = args.split or ("test" if own else "all")
    if source not in BENCHMARK_DOMAINS and Path(source).expanduser().is_dir():
        # the classes are checked before any image is decoded
        _check_classes(scan(Path(source).expanduser().absolute(), 1).classes, d, source)
    data = load_domain(source, d.image_size, progress=sys.stderr.isatty(), min_classes=1)
    _check_classes(data.classes, d, source)
    remap = torch.tensor([d.classes.index(c) for c in data.classes], dtype=torch.long)
    names = ["train", "val", "test"] if split_name == "all" else [split_name]
    total = {"images": 0, "correct": 0.0, "loss": 0.0, "ran": 0.0, "kept": 0.0}
    gated = False
    for s in names:
        split = getattr(data, s)
        if len(split) == 0:
            continue
        r = model.evaluate(args.domain, split.images, remap[split.labels])
        n = len(split)
        total["images"] += n
        total["correct"] += r["accuracy"] * n
        total["loss"] += r["loss"] * n
        gated = "gate_branches_run" in r
        total["ran"] += r.get("gate_branches_run", 0.0) * n
        total["kept"] += r.get("gate_flops_kept", 0.0) * n
    n = total["images"]
    if n == 0:
        raise Da3Error(f"{source}: the {split_name} split has no images; try --split all")
    subset = (
        f", {len(data.classes)} of the domain's {len(d.classes)} classes"
        if len(data.classes) < len(d.classes)
        else ""
    )
    print(
        f"{args.domain} on {source} [{split_name}, {n} images{subset}]: "
        f"top-1 {total['correct'] / n:.4f}, loss {total['loss'] / n:.4f}"
        + (f" ({model.frozen_bits}-bit frozen weights)" if model.frozen_bits != 32 else "")
    )
    recorded = d.metrics.get("test_accuracy")
    if d.trained_frozen_bits != model.frozen_bits and own and split_name == "test" and recorded:
        print(
            f"  trained with {d.trained_frozen_bits}-bit frozen weights: test top-1 "
            f"{recorded:.4f} then, {total['correct'] / n:.4f} with {model.frozen_bits}-bit "
            f"({100 * (total['correct'] / n - recorded):+.2f} points)"
        )
    if gated:
        where = f"{split_name}" if split_name != "all" else "these images"
        print(
            "  "
            + _gate_text(
                {"gate_branches_run": total["ran"] / n, "gate_flops_kept": total["kept"] / n},
                where,
            )
        )
    return 0


def _image_files(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """The images named or found under ``paths``, and the non-image files passed over."""
    from da3.data.folder import image_files

    found: list[Path] = []
    passed: list[Path] = []
    for path in paths:
        if not path.exists():
            raise Da3Error(f"{path}: no such file or folder")
        if path.is_file():
            found.append(path)
            continue
        images = image_files(path, passed)
        if not images:
            raise Da3Error(f"{path}: no image files in this folder")
        found.extend(images)
    return found, passed


def run_predict(args) -> int:
    import csv
    import json

    import numpy as np
    import torch

    from da3.data.folder import load_image

    if args.top_k < 1:
        raise Da3Error(f"--top-k must be at least 1, got {args.top_k}")
    files, passed = _image_files(args.paths)
    if passed:
        names = ", ".join(p.name for p in passed[:3]) + (", ..." if len(passed) > 3 else "")
        what = "file that is not an image" if len(passed) == 1 else "files that are not images"
        print(f"da3: passed over {len(passed)} {what} ({names})", file=sys.stderr)
    model, _ = _open_domain(args.store, args.domain)
    d = model.get(args.domain)
    k = min(args.top_k, d.num_classes)
    results: list[dict] = []  # for --json
    bad: list[str] = []
    writer = None
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        header = ["path"]
        for i in range(1, k + 1):
            header += [f"class_{i}", f"probability_{i}"]
        writer.writerow(header)
    for i in range(0, len(files), 64):
        chunk: list[tuple[Path, np.ndarray | str]] = []
        for f in files[i : i + 64]:
            try:
                chunk.append((f, load_image(f, d.image_size)))
            except Da3Error as err:
                if not args.skip_bad:
                    raise Da3Error(f"{err}; --skip-bad passes over such images") from None
                print(f"da3: skipped: {err}", file=sys.stderr)
                bad.append(str(f))
                chunk.append((f, str(err)))
        arrays = [a for _, a in chunk if not isinstance(a, str)]
        tops = iter(
            model.top_k(torch.from_numpy(np.stack(arrays)), args.domain, k) if arrays else []
        )
        for f, image in chunk:
            if isinstance(image, str):  # unreadable, passed over
                if args.json:
                    results.append({"path": str(f), "error": image})
                continue
            top = next(tops)
            if args.json:
                predictions = [{"class": c, "probability": p} for c, p in top]
                results.append({"path": str(f), "predictions": predictions})
            elif writer is not None:
                writer.writerow([str(f), *[x for c, p in top for x in (c, f"{p:.6f}")]])
            else:
                print(f"{f}: " + ", ".join(f"{c} {p:.3f}" for c, p in top))
    if args.json:
        print(json.dumps(results, indent=1, ensure_ascii=False))
    if bad:
        print(
            f"da3: skipped {len(bad)} of {len(files)} images that could not be read",
            file=sys.stderr,
        )
    return 0


def _home(path: str) -> str:
    """``path`` with the home folder written ``~``."""
    home = str(Path.home())
    return "~" + path[len(home) :] if home != "/" and path.startswith(home + "/") else path


def run_domains_list(args) -> int:
    from da3.store import DomainStore

    store = DomainStore(args.store)
    names = store.names()
    if not names:
        print(f"no domains in {store.root.absolute()}")
        return 0
    rows = [("domain", "method", "backbone", "classes", "px", "gates", "test top-1", "KiB", "data")]
    for n in names:
        try:
            meta = store.read_meta(n)
            metrics = meta.get("metrics", {})
            acc = metrics.get("test_accuracy")
            rows.append(
                (
                    n,
                    meta["method"],
                    meta["backbone"]["name"],
                    str(len(meta["classes"])),
                    str(meta.get("image_size", 96)),
                    _gates_cell(meta),
                    "-" if acc is None else f"{acc:.4f}",
                    f"{store.size_bytes(n) / 1024:.0f}",
                    _home(meta.get("source") or "-"),
                )
            )
        except (Da3Error, OSError) as err:
            rows.append((n, f"unreadable: {err}", "", "", "", "", "", "", ""))
    print(text_table(rows, left=(0, 1, 2, 5, 8)))
    return 0


def _gates_cell(meta: dict) -> str:
    """``off``, or ``on`` with the FLOPs kept on the test split where recorded."""
    if not meta.get("config", {}).get("gates"):
        return "off"
    kept = meta.get("metrics", {}).get("gate_flops_kept")
    return "on" if kept is None else f"on, {100 * kept:.0f}% FLOPs"


def run_domains_show(args) -> int:
    import json

    from da3.io import read_safetensors_header
    from da3.store import DomainStore

    store = DomainStore(args.store)
    meta = store.read_meta(args.name)
    tensors_path = store.paths(args.name)[0]
    header = read_safetensors_header(tensors_path)
    shapes = {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
    if args.json:
        meta["tensors"] = shapes
        meta["file_bytes"] = store.size_bytes(args.name)
        print(json.dumps(meta, indent=2))
        return 0
    b = meta["backbone"]
    metrics, train, config = meta.get("metrics", {}), meta.get("train", {}), meta["config"]
    classes = meta["classes"]
    params = sum(_prod(s) for s in shapes.values())
    rows = [
        ("domain", f"{meta['name']} ({meta['method']})"),
        (
            "backbone",
            f"{b['name']}, {b.get('weights', '?')} weights {b.get('fingerprint', '')[:12]}, "
            f"trained with {b.get('frozen_bits', 32)}-bit frozen weights",
        ),
        (
            "classes",
            f"{len(classes)}: {', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''}",
        ),
        ("image size", f"{meta.get('image_size', 96)} px (images are resized to this)"),
        ("data", _home(meta.get("source") or "- (not recorded; `da3 eval` needs --data)")),
    ]
    if train:
        rows.append(
            (
                "trained",
                ", ".join(f"{k} {v}" for k, v in train.items() if k != "data")
                + (f"; saved {meta['saved_at']}" if meta.get("saved_at") else ""),
            )
        )
    if metrics:
        text = (
            f"val {metrics.get('val_accuracy', float('nan')):.4f}, test "
            f"{metrics.get('test_accuracy', float('nan')):.4f} (best epoch "
            f"{metrics.get('best_epoch', '?')}), {metrics.get('train_images', '?')} training "
            f"images, {metrics.get('train_seconds', 0):.0f} s"
        )
        rows.append(("metrics", text))
    gates = _gates_cell(meta)
    if "gate_branches_run" in metrics:
        gates = "on; " + _gate_text(metrics, "test").removeprefix("gates ")
    rows.append(("gates", gates))
    rows.append(("config", " ".join(f"{k}={v}" for k, v in config.items())))
    rows.append(
        (
            "files",
            f"{tensors_path} ({store.size_bytes(args.name) / 1024:.0f} KiB, {len(shapes)} tensors, "
            f"{params / 1e6:.2f} M values) + {tensors_path.with_suffix('.json').name}",
        )
    )
    run = store.run_dir(args.name)
    if run.is_dir():  # what is there: a trained domain's curves.png, a fleet's rounds.png
        names = ("config.yaml", "history.json", "curves.png", "rounds.png")
        files = [f for f in names if (run / f).is_file()]
        rows.append(("run folder", f"{run} ({', '.join(files) or 'empty'})"))
    exports = store.exports(args.name)
    if exports:
        rows.append(("exports", ", ".join(str(m) for m, _ in exports)))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    return 0


def _prod(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def run_domains_delete(args) -> int:
    from da3.store import DomainStore

    store = DomainStore(args.store)
    with store.lock(args.name):  # not while it is being trained
        store.require(args.name)
        run = store.run_dir(args.name)
        sizes = {run: store.disk_bytes(run)} if run.is_dir() else {}
        for model, sidecar in store.exports(args.name):
            sizes[model] = sum(store.disk_bytes(p) for p in (model, sidecar) if p.exists())
        removed = store.delete(args.name)
    print(f"deleted domain {args.name!r} from {store.root.absolute()}")
    for path in removed:
        if path in sizes:
            what = "run folder" if path == run else "export"
            print(f"  and its {what} {path} ({sizes[path] / 2**20:.1f} MiB)")
    return 0


# ---------------------------------------------------------------------------------------
# demo


def run_demo(args) -> int:
    from da3.demo import run as demo

    return demo(args)
