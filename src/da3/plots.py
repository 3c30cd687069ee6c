"""Plots of a run (matplotlib, imported only when a plot is drawn)."""

from __future__ import annotations

import os
from pathlib import Path


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """Loss and accuracy per epoch, train and validation, written atomically as a PNG."""
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
