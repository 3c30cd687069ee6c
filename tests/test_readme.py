"""Every ```python block of the README runs as written, in order, on a tiny folder of images
at the path the README uses (``photos/flowers``, one sub-folder per class)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2


def _photos(root: Path, per_class: int = 10, size: int = 48) -> None:
    rng = np.random.default_rng(0)
    colours = {"roses": (200, 30, 40), "tulips": (230, 200, 40), "daisies": (240, 240, 240)}
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noise = rng.integers(-40, 40, (size, size, 3))
            pixels = np.clip(np.array(colour)[None, None] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i + 1:02d}.png")


def test_every_python_block_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DA3_CACHE_DIR", str(tmp_path / "cache"))
    _photos(tmp_path / "photos" / "flowers")
    for i, code in enumerate(BLOCKS):
        try:
            exec(compile(code, f"README.md python block {i + 1}", "exec"), {"__name__": "readme"})
        except Exception as err:
            pytest.fail(f"README python block {i + 1} fails: {type(err).__name__}: {err}")
    out = capsys.readouterr().out
    assert "flowers.safetensors" in out  # the first block prints the saved file
    assert (tmp_path / "da3-store" / "flowers-by-hand.safetensors").is_file()
