"""``da3 demo``: learn the five offline domains one after another with DA3.

One pretrained EfficientNet-Lite0 stays frozen; each domain gets its DA3 adaptor and head,
is trained, saved to the store, and then every domain learnt so far is re-loaded from its
file and re-evaluated on its test split, to show that adding a domain moves none of the
others (their test predictions are compared bit for bit).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from da3.errors import Da3Error

DEMO_DOMAINS = ("digits", "clothing", "animals", "clipart", "textures")
DEMO_EPOCHS = 4
DEMO_IMAGE_SIZE = 64


def run(args) -> int:
    import torch.nn.functional as F

    from da3.backbones import create_backbone
    from da3.data import load_domain
    from da3.domains import DomainStore, MultiDomainModel
    from da3.memory import process_memory_bytes, reset_peak_memory, saved_activation_bytes
    from da3.methods import parse_config
    from da3.precision import frozen_bits_value
    from da3.profile import machine_description
    from da3.tables import text_table
    from da3.training import TrainSettings, train_domain

    t_start = time.perf_counter()
    names = list(DEMO_DOMAINS) if not args.domains else [d.strip() for d in args.domains.split(",")]
    for n in names:
        if n not in DEMO_DOMAINS:
            raise Da3Error(f"demo: unknown domain {n!r}; choose from {', '.join(DEMO_DOMAINS)}")
    epochs = args.epochs or DEMO_EPOCHS
    size = args.image_size or DEMO_IMAGE_SIZE
    bits = frozen_bits_value(getattr(args, "frozen_bits", None)) or 32
    store = DomainStore(Path(args.store) / "demo")
    progress = not args.quiet
    print(
        f"da3 demo: {len(names)} domains, DA3 on pretrained efficientnet_lite0"
        + (f" ({bits}-bit frozen weights)" if bits != 32 else "")
        + f", {size} px, {epochs} epochs each, store {store.root}\n"
        f"machine: {machine_description('cpu')}\n"
    )
    # the lean form only: every domain is DA3, which reads nothing else
    backbone = create_backbone("efficientnet_lite0", "imagenet")
    model = MultiDomainModel(backbone, forms="lean", frozen_bits=bits)
    del backbone
    config = parse_config("da3", {})
    rows, reference, history_rows = [], {}, []
    data_cache = {}
    for step, name in enumerate(names, 1):
        print(f"[{step}/{len(names)}] learning domain {name!r}")
        data = data_cache[name] = load_domain(name, size, progress=progress)
        # Deterministic memory figure: bytes kept for backward by one training batch.
        probe = MultiDomainModel(model.frozen)
        d = probe.add_domain("probe", data.classes, "da3", config, size)
        x = probe.preprocess(data.train.images[:32])
        y = data.train.labels[:32]
        saved = saved_activation_bytes(
            d.model.train(),
            lambda d=d, x=x, y=y: F.cross_entropy(d.model(x), y),
            exclude=model.frozen.lean,
        )
        del probe, d
        exact_peak = reset_peak_memory()
        rss0 = process_memory_bytes("VmRSS")
        settings = TrainSettings(
            domain=name, data=name, image_size=size, epochs=epochs, batch_size=32, frozen_bits=bits
        )
        info = train_domain(settings, store, overwrite=True, progress=progress, model=model)
        peak = process_memory_bytes("VmHWM") - rss0 if exact_peak else None
        m = info.metrics
        rows.append(
            {
                "domain": name,
                "classes": len(data.classes),
                "train_images": m["train_images"],
                "test_accuracy": m["test_accuracy"],
                "train_seconds": m["train_seconds"],
                "saved_activation_bytes": saved,
                "train_peak_bytes": peak,
                "file_bytes": store.size_bytes(name),
            }
        )
        # Re-load every domain so far from its file and re-evaluate it.
        check = MultiDomainModel(model.frozen)
        line = {}
        for earlier in names[:step]:
            check.load(earlier, store)
            test = data_cache[earlier].test
            logits = torch.cat(
                [
                    check.logits(test.images[i : i + 256], earlier)
                    for i in range(0, len(test.images), 256)
                ]
            )
            acc = float((logits.argmax(1) == test.labels).float().mean())
            if earlier in reference and not torch.equal(reference[earlier], logits):
                raise Da3Error(f"demo: domain {earlier!r} changed after adding {name!r}")
            reference.setdefault(earlier, logits)
            line[earlier] = acc
        history_rows.append(
            (f"after {name}", *[f"{line[n]:.4f}" if n in line else "" for n in names])
        )
        print(
            "  test top-1 of every domain so far (loaded from files): "
            + ", ".join(f"{k} {v:.4f}" for k, v in line.items())
            + "\n"
        )

    print("Test top-1 of each domain after each addition (identical logits, bit for bit):")
    print(text_table([("", *names), *history_rows]))
    print("\nPer domain:")
    table = [
        (
            "domain",
            "classes",
            "train imgs",
            "test top-1",
            "train s",
            "kept for bwd MiB",
            "train peak MiB",
            "file KiB",
        )
    ]
    for r in rows:
        table.append(
            (
                r["domain"],
                r["classes"],
                r["train_images"],
                f"{r['test_accuracy']:.4f}",
                f"{r['train_seconds']:.0f}",
                f"{r['saved_activation_bytes'] / 2**20:.2f}",
                "-" if r["train_peak_bytes"] is None else f"{r['train_peak_bytes'] / 2**20:.0f}",
                f"{r['file_bytes'] / 1024:.0f}",
            )
        )
    print(text_table(table))
    mean = sum(r["test_accuracy"] for r in rows) / len(rows)
    print(
        f"\nmean test top-1 {mean:.4f}; backbone shared and unchanged "
        f"(fingerprint {model.frozen.fingerprint[:12]}); total {time.perf_counter() - t_start:.0f}s"
    )
    return 0
