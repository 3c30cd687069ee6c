"""Turning decoded pictures into the square RGB ``uint8`` arrays every domain is stored as.

Resizing uses PIL's bilinear filter, which widens its support when shrinking (antialiased).
Grayscale images are resized as one channel, then repeated to three. Transparent pixels are
composited onto white, the way clip art and icons are meant to be seen.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where needed: `da3 data list` runs without torch, and a run
    import torch  # whose images are cached never loads Pillow before it plots (~2 MiB)
    from PIL import Image

MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 1024
# Above this, ``resize_square(fit="crop")`` scales only the square it keeps (see there): an
# aspect ratio of 16 at the largest image size; real pictures never come near.
MAX_RESIZED_PIXELS = 16 * MAX_IMAGE_SIZE**2


def check_image_size(image_size: int) -> int:
    """The resolution as an int, or ValueError (the caller turns it into a Da3Error)."""
    if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer):
        raise TypeError(f"image_size must be an int, got {image_size!r}")
    if not MIN_IMAGE_SIZE <= int(image_size) <= MAX_IMAGE_SIZE:
        raise ValueError(
            f"image_size must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE}, got {image_size}"
        )
    return int(image_size)


def flatten_alpha(image: Image.Image) -> Image.Image:
    """RGB or L version of ``image``; any transparency is composited onto white."""
    from PIL import Image

    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "La", "RGBA", "RGBa", "PA"):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode in ("L", "RGB"):
        return image
    if image.mode == "1":
        return image.convert("L")
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # 16-bit (or wider) gray: scale to 8 bits rather than let PIL clip at 255. In blocks
        # of rows, so the float64 copy of a large picture (8 bytes a pixel) is never whole.
        values = np.asarray(image)
        top = float(values.max(initial=0))
        scale = 255.0 / (65535.0 if top <= 65535.0 else top)
        out = np.empty(values.shape, np.uint8)
        for i in range(0, len(values), 256):
            block = values[i : i + 256].astype(np.float64)
            if top > 255.0:
                block = block * scale
            out[i : i + 256] = np.clip(np.rint(block), 0, 255)
        return Image.fromarray(out)
    return image.convert("RGB")


def resize_square(image: Image.Image, size: int, fit: str = "crop") -> Image.Image:
    """Resize ``image`` (mode L or RGB) to ``size x size``.

    ``fit="crop"``: scale the short side to ``size`` and cut the centre (photos; keeps the aspect
    ratio). ``fit="pad"``: scale the long side to ``size`` and centre on white (whole objects).
    ``fit="stretch"``: plain resize (already square sources).
    """
    from PIL import Image

    w, h = image.size
    if (w, h) == (size, size):
        return image
    if fit == "stretch" or w == h:
        return image.resize((size, size), Image.Resampling.BILINEAR)
    if fit == "crop":
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        left, top = (nw - size) // 2, (nh - size) // 2
        if nw * nh <= MAX_RESIZED_PIXELS:
            image = image.resize((nw, nh), Image.Resampling.BILINEAR)
            return image.crop((left, top, left + size, top + size))
        # A long thin strip (1 x 2.4M pixels: 32 x 77M scaled to 32 px, 3 GB): scale only the
        # square that is kept, the same sampling up to rounding.
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if fit == "pad":
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        image = image.resize((nw, nh), Image.Resampling.BILINEAR)
        canvas = Image.new(image.mode, (size, size), 255 if image.mode == "L" else (255,) * 3)
        canvas.paste(image, ((size - nw) // 2, (size - nh) // 2))
        return canvas
    raise ValueError(f"unknown fit {fit!r}")


def to_chw(image: Image.Image) -> np.ndarray:
    """3 x H x W uint8 array from an L or RGB image (gray repeated to three channels)."""
    arr = np.asarray(image, dtype=np.uint8)
    if arr.ndim == 2:
        return np.repeat(arr[None], 3, axis=0)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def stack_images(images: Iterable[np.ndarray], size: int) -> torch.Tensor:
    """N x 3 x size x size uint8 tensor from 3 x size x size arrays."""
    import torch

    arrays = list(images)
    if not arrays:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays))


def gray_array_to_tensor(gray: np.ndarray, size: int) -> torch.Tensor:
    """N x H x W uint8 grayscale images to N x 3 x size x size uint8 (PIL bilinear)."""
    import torch
    from PIL import Image

    out = np.empty((len(gray), size, size), dtype=np.uint8)
    for i, g in enumerate(gray):
        out[i] = np.asarray(
            resize_square(Image.fromarray(np.ascontiguousarray(g)), size, "stretch")
        )
    return torch.from_numpy(np.repeat(out[:, None], 3, axis=1))
