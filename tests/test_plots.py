"""The run plots (Pillow): what they draw, and the tick values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from da3.plots import BLUE, ORANGE, nice_ticks, plot_curves, plot_rounds


@pytest.mark.parametrize(
    "lo,hi", [(0.0, 1.0), (0.213, 0.897), (1.7, 2.31), (-3.0, 12.0), (0.5, 0.5), (1e-5, 3e-5)]
)
def test_ticks_cover_the_range_in_round_steps(lo, hi):
    ticks = nice_ticks(lo, hi)
    assert 2 <= len(ticks) <= 8
    assert ticks[0] <= lo + 1e-12 and ticks[-1] >= hi - 1e-12
    steps = {round(b - a, 12) for a, b in zip(ticks, ticks[1:], strict=False)}
    assert len(steps) == 1
    step = steps.pop()
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert any(math.isclose(mantissa, m) for m in (1, 2, 5))


def colour_pixels(path, colour, tolerance=30) -> int:
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    return int((np.abs(pixels - np.array(colour)) <= tolerance).all(axis=-1).sum())


def test_curves_draw_both_series_and_are_written_atomically(tmp_path):
    history = [
        {"epoch": e, "train_loss": 2 / e, "val_loss": 2.2 / e}
        | {"train_accuracy": 1 - 0.5 / e, "val_accuracy": 0.9 - 0.5 / e}
        for e in (1, 2, 3)
    ]
    path = tmp_path / "curves.png"
    plot_curves(history, path, "d (da3)", best_epoch=2, test_accuracy=0.7)
    assert Image.open(path).size == (900, 340)
    assert colour_pixels(path, BLUE) > 200 and colour_pixels(path, ORANGE) > 200
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temporary left
    # a NaN loss (a diverged run) is left out, not drawn nor fatal
    history[1]["val_loss"] = float("nan")
    plot_curves(history, path, "d (da3)")


def test_rounds_plot(tmp_path):
    path = tmp_path / "rounds.png"
    plot_rounds([{"round": r, "test_accuracy": 0.1 * r} for r in range(6)], path, "fleet")
    assert Image.open(path).size == (550, 360) and colour_pixels(path, BLUE) > 100
