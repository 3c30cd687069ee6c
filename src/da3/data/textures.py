"""The ``textures`` domain: views of the seamless pattern tiles that ship with GIMP.

Source: ``/usr/share/gimp/2.0/patterns/<Group>/<name>.pat`` (apt package ``gimp-data``), 58
tiles of 20-160 px in groups such as Stone, Wood, Water, Legacy.

Classes: one class per tile, named ``<Group>/<file stem>`` (``Wood/pine``, ``Stone/marble1``),
sorted: 58 classes. Groups would make better-sounding classes, but they are uneven (1 to 14
tiles) and ``Legacy`` is not a kind of texture at all.

Images: each image is a random view of the endlessly repeated tile (the tiles are seamless):
a square window of 45-90 tile pixels (log-uniform), turned by a uniform random angle, mirrored
half of the time, at a random offset, with mild contrast (x0.8-1.2) and brightness (+-16)
changes; sampled with periodic bilinear interpolation at one tile pixel per pixel, then resized
to the requested resolution with PIL (antialiased).

Splits: 36 train, 9 val, 18 test views per tile (2,088 / 522 / 1,044). A class *is* one tile, so
every split necessarily shows the same tile; what keeps test from being a copy of train is that
each (split, class) pair draws its views from its own random stream (seeded by the split and the
class), so no view is shared and test never depends on how many training views there are. This
domain therefore measures recognising a known texture under new viewpoints, scales and lighting,
not generalising to unseen textures.

GIMP pattern format (``.pat``): a big-endian header of five uint32 (header size, version,
width, height, bytes per pixel), the magic ``GPAT``, the NUL-terminated UTF-8 name (up to the
header size), then width x height x bytes-per-pixel raw pixels, row by row. 1 byte = gray,
2 = gray + alpha, 3 = RGB, 4 = RGBA; alpha is composited onto white.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from da3.data.domain import DomainData, Split
from da3.data.sources import apt_data_path
from da3.errors import Da3Error

PATTERN_DIRS = (Path("/usr/share/gimp/2.0/patterns"), Path("/usr/share/gimp/3.0/patterns"))
VIEWS_PER_TILE = (36, 9, 18)  # train, val, test
NOMINAL_COUNTS = (58, 58 * 36, 58 * 9, 58 * 18)
TEXTURE_SEED = 5318
BASE_WINDOW = 64.0  # tile pixels per side at scale 1
SCALE_RANGE = (0.7, 1.4)
CONTRAST_RANGE = (0.8, 1.2)
BRIGHTNESS_SHIFT = 16.0


@dataclass
class Pattern:
    """One decoded GIMP pattern: its display name and H x W x 3 uint8 RGB pixels."""

    name: str
    pixels: np.ndarray


def read_pat(path: Path) -> Pattern:
    """Decode a GIMP ``.pat`` file; Da3Error naming the file when it is not one."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise Da3Error(f"{path}: cannot read ({err.strerror or err})") from err
    if len(raw) < 24:
        raise Da3Error(f"{path}: too short for a GIMP pattern header")
    header_size, version, width, height, depth = struct.unpack(">5I", raw[:20])
    if raw[20:24] != b"GPAT":
        raise Da3Error(f"{path}: not a GIMP pattern (no GPAT magic)")
    if depth not in (1, 2, 3, 4) or width == 0 or height == 0 or header_size < 24:
        raise Da3Error(f"{path}: unsupported GIMP pattern ({width}x{height}, {depth} bytes/pixel)")
    size = width * height * depth
    if len(raw) < header_size + size:
        raise Da3Error(f"{path}: truncated GIMP pattern")
    name = raw[24:header_size].split(b"\0", 1)[0].decode("utf-8", errors="replace")
    px = np.frombuffer(raw, dtype=np.uint8, count=size, offset=header_size)
    px = px.reshape(height, width, depth).astype(np.float32)
    if depth in (2, 4):  # composite onto white
        alpha = px[..., -1:] / 255.0
        px = px[..., :-1] * alpha + 255.0 * (1.0 - alpha)
    if px.shape[-1] == 1:
        px = np.repeat(px, 3, axis=-1)
    return Pattern(name, np.clip(np.rint(px), 0, 255).astype(np.uint8))


def pattern_root() -> Path:
    for root in PATTERN_DIRS:
        if root.is_dir():
            return root
    return apt_data_path(PATTERN_DIRS[0], "textures", "gimp-data")


def pattern_files(root: Path) -> list[tuple[str, Path]]:
    """(class name, file) for every tile under ``root``, sorted by class name."""
    files = sorted(
        (f"{p.parent.relative_to(root).as_posix()}/{p.stem}", p) for p in root.rglob("*.pat")
    )
    if len(files) < 2:
        raise Da3Error(f"{root}: expected GIMP .pat pattern files, found {len(files)}")
    return files


def locate() -> str:
    root = pattern_root()
    pattern_files(root)
    return str(root)


def render_view(tile: np.ndarray, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """One random view of the repeated ``tile`` (H x W x 3 uint8) as 3 x S x S uint8."""
    h, w = tile.shape[:2]
    angle = rng.uniform(0.0, 2.0 * math.pi)
    side = BASE_WINDOW * math.exp(rng.uniform(*np.log(SCALE_RANGE)))
    mirror = rng.random() < 0.5
    ox, oy = rng.uniform(0.0, w), rng.uniform(0.0, h)
    contrast = rng.uniform(*CONTRAST_RANGE)
    shift = rng.uniform(-BRIGHTNESS_SHIFT, BRIGHTNESS_SHIFT)

    n = max(2, round(side))
    grid = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    u, v = np.meshgrid(grid, grid)  # u: column offset, v: row offset
    if mirror:
        u = -u
    cos, sin = math.cos(angle), math.sin(angle)
    x = ox + cos * u - sin * v
    y = oy + sin * u + cos * v
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    ix0, iy0 = x0.astype(np.int64) % w, y0.astype(np.int64) % h
    ix1, iy1 = (ix0 + 1) % w, (iy0 + 1) % h
    t = tile.astype(np.float32)
    top = t[iy0, ix0] * (1 - fx) + t[iy0, ix1] * fx
    bottom = t[iy1, ix0] * (1 - fx) + t[iy1, ix1] * fx
    view = top * (1 - fy) + bottom * fy
    view = (view - view.mean()) * contrast + view.mean() + shift
    from PIL import Image  # here: loading a cached domain never needs Pillow

    img = Image.fromarray(np.clip(np.rint(view), 0, 255).astype(np.uint8))
    img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))


def build(image_size: int, progress: bool = False) -> DomainData:
    import torch

    root = pattern_root()
    files = pattern_files(root)
    tiles = [read_pat(path).pixels for _, path in files]
    splits = []
    for split_index, per_tile in enumerate(VIEWS_PER_TILE):
        images = np.empty((per_tile * len(tiles), 3, image_size, image_size), dtype=np.uint8)
        labels = np.repeat(np.arange(len(tiles), dtype=np.int64), per_tile)
        for c, tile in enumerate(tiles):
            rng = np.random.default_rng([TEXTURE_SEED, split_index, c])
            for k in range(per_tile):
                images[c * per_tile + k] = render_view(tile, rng, image_size)
        splits.append(Split(torch.from_numpy(images), torch.from_numpy(labels)))
    classes = [name for name, _ in files]
    return DomainData("textures", classes, *splits, image_size=image_size, source=str(root))
