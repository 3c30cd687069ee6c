"""Plots of a run, drawn with Pillow in the process that trained.

A run's curves are drawn at its end, in the training process, so what drawing costs adds to
the memory the run needs. With matplotlib that was 30 MiB (``benchmarks/memory_parts.py`` at
commit a8f197b), more than the lean training step of a small backbone; Pillow is already
loaded to decode the images, and a chart is its pixels: 1800 x 680 RGB at twice the size,
3.5 MiB (the plot phase of a Lite0 run adds 3.5 MiB: memory_lite0_8bit.json).
(The benchmark report's figures, drawn outside any training, use matplotlib.)

The charts are drawn at twice their size and scaled down, for smooth lines.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

SCALE = 2  # drawn at twice the size, then scaled down (Pillow draws lines without smoothing)
BLUE, ORANGE, GREY, INK = (31, 119, 180), (255, 127, 14), (150, 150, 150), (40, 40, 40)


@dataclass
class Series:
    label: str
    x: list[float]
    y: list[float]
    color: tuple[int, int, int]
    marker: str = "o"  # "o": circles joined by a line; "*": stars only


@dataclass
class Panel:
    xlabel: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    vlines: list[tuple[float, str]] = field(default_factory=list)  # dotted, with a label
    ylim: tuple[float, float] | None = None
    legend: str = "upper right"  # or "lower right"


def nice_ticks(lo: float, hi: float, most: int = 6) -> list[float]:
    """Round tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0) * 0.1
    raw = (hi - lo) / max(most - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi - step * 1e-9:
        ticks.append(ticks[-1] + step)
    return ticks


def _label(v: float) -> str:
    return f"{v:.4g}" if abs(v) >= 1e-4 or v == 0 else f"{v:.1e}"


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size * SCALE)  # FreeType: any size
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        a = -math.pi / 2 + i * math.pi / 5
        rr = r if i % 2 == 0 else r * 0.45
        points.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return points


def _dotted(draw, x: float, top: float, bottom: float, color) -> None:
    y, dash = top, 3 * SCALE
    while y < bottom:
        draw.line([(x, y), (x, min(y + dash, bottom))], fill=color, width=SCALE)
        y += 2 * dash


def _draw_panel(image, box: tuple[int, int, int, int], panel: Panel) -> None:
    """One set of axes in ``box`` (left, top, right, bottom, in drawing pixels)."""
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(image)
    small, tiny = _font(11), _font(10)
    s = SCALE
    left, top, right, bottom = box
    # the plot area: room for tick labels and the axis labels
    ax = (left + 62 * s, top + 8 * s, right - 10 * s, bottom - 40 * s)
    xs = [v for se in panel.series for v in se.x] + [v for v, _ in panel.vlines]
    ys = [v for se in panel.series for v in se.y if math.isfinite(v)]
    xlo, xhi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1
    if panel.ylim is not None:
        ylo, yhi = panel.ylim
    else:
        ylo, yhi = (min(ys), max(ys)) if ys else (0.0, 1.0)
        margin = (yhi - ylo) * 0.05 or abs(yhi) * 0.05 or 0.05  # no point on the frame
        ylo, yhi = ylo - margin, yhi + margin
    yticks = nice_ticks(ylo, yhi)
    if panel.ylim is None and yticks:
        ylo, yhi = yticks[0], yticks[-1]
    if yhi == ylo:
        yhi = ylo + 1.0
    pad = (xhi - xlo) * 0.05
    xlo, xhi = xlo - pad, xhi + pad

    def px(x: float) -> float:
        return ax[0] + (x - xlo) / (xhi - xlo) * (ax[2] - ax[0])

    def py(y: float) -> float:
        return ax[3] - (y - ylo) / (yhi - ylo) * (ax[3] - ax[1])

    # grid and ticks
    for t in yticks:
        if ylo - 1e-12 <= t <= yhi + 1e-12:
            y = py(t)
            draw.line([(ax[0], y), (ax[2], y)], fill=(232, 232, 232), width=s)
            draw.line([(ax[0] - 4 * s, y), (ax[0], y)], fill=INK, width=s)
            draw.text((ax[0] - 6 * s, y), _label(t), fill=INK, font=tiny, anchor="rm")
    lo_int, hi_int = math.ceil(xlo), math.floor(xhi)
    step = max(1, math.ceil((hi_int - lo_int + 1) / 10))
    for t in range(lo_int, hi_int + 1, step):
        x = px(t)
        draw.line([(x, ax[3]), (x, ax[3] + 4 * s)], fill=INK, width=s)
        draw.text((x, ax[3] + 6 * s), str(t), fill=INK, font=tiny, anchor="mt")
    draw.rectangle(ax, outline=INK, width=s)
    draw.text(
        ((ax[0] + ax[2]) / 2, bottom - 4 * s), panel.xlabel, fill=INK, font=small, anchor="md"
    )
    # the y label, turned a quarter
    w = int(draw.textlength(panel.ylabel, font=small)) + 4 * s
    label = Image.new("L", (w, 16 * s), 0)
    ImageDraw.Draw(label).text((2 * s, 8 * s), panel.ylabel, fill=255, font=small, anchor="lm")
    label = label.rotate(90, expand=True)
    image.paste(
        Image.new("RGB", label.size, INK),
        (left + 2 * s, int((ax[1] + ax[3]) / 2 - label.size[1] / 2)),
        label,
    )
    # what is drawn
    for x, _ in panel.vlines:
        _dotted(draw, px(x), ax[1], ax[3], GREY)
    for se in panel.series:
        points = [(px(x), py(y)) for x, y in zip(se.x, se.y, strict=True) if math.isfinite(y)]
        if se.marker == "o":
            if len(points) > 1:
                draw.line(points, fill=se.color, width=2 * s, joint="curve")
            for x, y in points:
                r = 3.5 * s
                draw.ellipse((x - r, y - r, x + r, y + r), fill=se.color)
        else:
            for x, y in points:
                draw.polygon(_star(x, y, 8 * s), fill=se.color)
    # the legend
    entries = [(se.label, se.color, se.marker) for se in panel.series]
    entries += [(text, GREY, ":") for _, text in panel.vlines]
    if not entries:
        return
    line_h = 15 * s
    width = max(int(draw.textlength(t, font=tiny)) for t, _, _ in entries) + 36 * s
    height = line_h * len(entries) + 6 * s
    x0 = ax[2] - width - 6 * s
    y0 = ax[1] + 6 * s if panel.legend == "upper right" else ax[3] - height - 6 * s
    draw.rectangle((x0, y0, x0 + width, y0 + height), fill=(255, 255, 255), outline=(200, 200, 200))
    for i, (text, color, marker) in enumerate(entries):
        y = y0 + 3 * s + line_h * i + line_h / 2
        a, b = x0 + 6 * s, x0 + 26 * s
        if marker == "o":
            draw.line([(a, y), (b, y)], fill=color, width=2 * s)
            draw.ellipse(
                ((a + b) / 2 - 3 * s, y - 3 * s, (a + b) / 2 + 3 * s, y + 3 * s), fill=color
            )
        elif marker == "*":
            draw.polygon(_star((a + b) / 2, y, 6 * s), fill=color)
        else:
            x = a
            while x < b:
                draw.line([(x, y), (min(x + 3 * s, b), y)], fill=color, width=s)
                x += 6 * s
        draw.text((b + 5 * s, y), text, fill=INK, font=tiny, anchor="lm")


def draw_chart(panels: list[Panel], path: Path, title: str, size=(900, 340)) -> None:
    """Panels side by side under ``title``, written atomically to ``path`` as a PNG."""
    from PIL import Image, ImageDraw

    # Each part is drawn at SCALE on a canvas of its own and scaled into the image: the
    # process that draws the chart (da3 train, last) holds one panel at SCALE at a time,
    # not the whole chart.
    image = Image.new("RGB", size, (255, 255, 255))
    top, each = 30, size[0] // len(panels)
    strip = Image.new("RGB", (size[0] * SCALE, top * SCALE), (255, 255, 255))
    ImageDraw.Draw(strip).text(
        (strip.width / 2, 8 * SCALE), title, fill=INK, font=_font(13), anchor="mt"
    )
    image.paste(strip.resize((size[0], top), Image.LANCZOS), (0, 0))
    del strip
    for i, panel in enumerate(panels):
        w, h = each * SCALE, (size[1] - top) * SCALE
        canvas = Image.new("RGB", (w, h), (255, 255, 255))
        _draw_panel(canvas, (4 * SCALE, 0, w - 4 * SCALE, h), panel)
        image.paste(canvas.resize((each, size[1] - top), Image.LANCZOS), (i * each, top))
        del canvas
    tmp = path.with_name(f".{path.name}.tmp.png")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def plot_curves(
    history: list[dict],
    path: Path,
    title: str,
    best_epoch: int | None = None,
    test_accuracy: float | None = None,
) -> None:
    """Loss and accuracy per epoch, train and validation, written atomically as a PNG; the
    best epoch (the one saved) marked, with its test accuracy."""
    epochs = [h["epoch"] for h in history]

    def series(key: str, label: str, color) -> Series:
        return Series(label, epochs, [float(h[key]) for h in history], color)

    loss = Panel("epoch", "loss", [series("train_loss", "train", BLUE)])
    loss.series.append(series("val_loss", "val", ORANGE))
    acc = Panel("epoch", "top-1 accuracy", legend="lower right")
    acc.series += [series("train_accuracy", "train", BLUE), series("val_accuracy", "val", ORANGE)]
    if best_epoch is not None and best_epoch > 0:
        for p in (loss, acc):
            p.vlines.append((best_epoch, f"best (epoch {best_epoch})"))
        if test_accuracy is not None:
            acc.series.append(Series("test (best epoch)", [best_epoch], [test_accuracy], INK, "*"))
    draw_chart([loss, acc], path, title)


def plot_rounds(rounds: list[dict], path: Path, title: str) -> None:
    """Test accuracy of the global domain against federated rounds (round 0: the initial
    domain), written atomically as a PNG."""
    panel = Panel(
        "round",
        "test top-1 (global domain)",
        [
            Series(
                "global domain",
                [r["round"] for r in rounds],
                [r["test_accuracy"] for r in rounds],
                BLUE,
            )
        ],
        ylim=(0.0, 1.0),
        legend="lower right",
    )
    draw_chart([panel], path, title, size=(550, 360))
