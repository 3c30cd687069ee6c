"""Plots of a run (matplotlib, imported only when a plot is drawn)."""

from __future__ import annotations

import os
from pathlib import Path


def plot_curves(
    history: list[dict],
    path: Path,
    title: str,
    best_epoch: int | None = None,
    test_accuracy: float | None = None,
) -> None:
    """Loss and accuracy per epoch, train and validation, written atomically as a PNG; the
    best epoch (the one saved) marked, with its test accuracy."""
    # matplotlib without pyplot: no global figure registry, and nothing to close
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(9, 3.4))
    FigureCanvasAgg(fig)
    a, b = fig.subplots(1, 2)
    a.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    a.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend()
    b.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    b.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="val")
    if best_epoch is not None and best_epoch > 0:
        for ax in (a, b):
            ax.axvline(best_epoch, color="0.6", linestyle=":", label=f"best (epoch {best_epoch})")
        if test_accuracy is not None:
            b.plot([best_epoch], [test_accuracy], "k*", markersize=10, label="test (best epoch)")
    b.set_xlabel("epoch"), b.set_ylabel("top-1 accuracy"), b.legend()
    a.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def plot_rounds(rounds: list[dict], path: Path, title: str) -> None:
    """Test accuracy of the global domain against federated rounds (round 0: the initial
    domain), written atomically as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([r["round"] for r in rounds], [r["test_accuracy"] for r in rounds], "o-")
    ax.set_xlabel("round"), ax.set_ylabel("test top-1 accuracy (global domain)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
