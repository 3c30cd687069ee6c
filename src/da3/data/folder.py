"""Any folder of class sub-folders as a domain (the ImageFolder convention).

``root/<class>/<...>/<image>``: the class is the name of the sub-folder directly under ``root``
(sorted by name), the images are every image file below it, nested folders included.

Rules, so that a mistake in the data is reported, not silently learned from:

- Hidden files and folders (name starting with ``.``, e.g. ``.DS_Store``) and the OS clutter
  files ``Thumbs.db`` / ``desktop.ini`` are skipped. Loose files directly in ``root`` are
  ignored (they belong to no class).
- Any other file must have an image extension (``IMAGE_EXTENSIONS``) and decode with PIL;
  otherwise a :class:`~da3.errors.Da3Error` names the file (``notes.txt`` in a class folder is
  an error, not noise: it usually means the folder is not what the user thinks).
- A class folder without images, a root without class folders, or a root with only one class
  (a classifier needs two) is an error too.

Images are converted to RGB (transparency onto white, EXIF rotation applied), the short side
resized to the resolution and the centre cut out (PIL bilinear, antialiased). Splits: 60/10/30
inside each class, same rule and seed as the benchmark domains.

A prepared folder domain is cached like the benchmark ones, one entry per (absolute folder path,
resolution), stamped with a fingerprint of every file's relative path, size and modification
time: any change to the folder rebuilds the entry.
"""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from da3.data.domain import DomainData, Split, fraction_sizes, split_indices
from da3.data.imaging import flatten_alpha, resize_square, to_chw
from da3.errors import Da3Error

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
IGNORED_FILES = frozenset({"thumbs.db", "desktop.ini"})
SPLIT_FRACTIONS = (0.1, 0.3)  # val, test


def _skipped(name: str) -> bool:
    return name.startswith(".") or name.lower() in IGNORED_FILES


def scan(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names and (file, class index) pairs of an ImageFolder tree, checked."""
    if not root.exists():
        raise Da3Error(f"{root}: no such file or folder")
    if not root.is_dir():
        raise Da3Error(f"{root}: not a folder (expected a folder with one sub-folder per class)")
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as err:
        raise Da3Error(f"{root}: cannot list folder ({err.strerror or err})") from err
    classes = [e.name for e in entries if e.is_dir() and not _skipped(e.name)]
    if not classes:
        raise Da3Error(f"{root}: no class sub-folders (put the images of each class in its own)")
    if len(classes) == 1:
        raise Da3Error(
            f"{root}: only one class folder ('{classes[0]}'); a domain needs at least 2 classes"
        )
    files: list[tuple[Path, int]] = []
    for index, name in enumerate(classes):
        found = _class_files(root / name)
        if not found:
            raise Da3Error(f"{root / name}: class folder has no images")
        files.extend((path, index) for path in found)
    return classes, files


def _class_files(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _skipped(d))
        for name in sorted(filenames):
            if _skipped(name):
                continue
            path = Path(dirpath) / name
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise Da3Error(
                    f"{path}: not an image file (expected one of "
                    f"{', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            found.append(path)
    return found


def cache_key(root: Path, image_size: int) -> str:
    """Cache entry name: one entry per (folder path, resolution), replaced when files change."""
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", root.name)[:40] or "folder"
    return f"folder-{safe}-{digest}-{image_size}px"


def fingerprint(root: Path, files: list[tuple[Path, int]]) -> str:
    """Digest of every file's relative path, class, size and modification time."""
    digest = hashlib.sha256()
    for path, label in files:
        try:
            st = path.stat()
        except OSError as err:
            raise Da3Error(f"{path}: cannot read ({err.strerror or err})") from err
        rel = path.relative_to(root).as_posix()
        digest.update(f"{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def load_image(path: Path, image_size: int) -> np.ndarray:
    """3 x S x S uint8 array of one image file; Da3Error naming it if it cannot be decoded.

    An image whose header declares more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (89
    million by default; a JPEG counts at the reduced scale it is decoded at) is refused
    before it is decoded: a small file can declare a huge picture (a decompression bomb)."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (image_size, image_size))  # JPEG: decode at a reduced scale
            width, height = image.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and width * height > limit:
                raise Da3Error(
                    f"{path}: {width} x {height} pixels, more than the {limit} decoded at "
                    "most (PIL.Image.MAX_IMAGE_PIXELS); refused as a possible "
                    "decompression bomb"
                )
            image.load()
            # in place, and no conversion to what it is already: a large picture is not
            # copied (its decoded pixels are the memory a file can make da3 take)
            ImageOps.exif_transpose(image, in_place=True)
            picture = flatten_alpha(image)
            picture = picture if picture.mode == "RGB" else picture.convert("RGB")
    except Da3Error:
        raise
    except Exception as err:
        detail = " ".join(str(err).split()) or type(err).__name__
        raise Da3Error(f"{path}: corrupt or unreadable image ({detail})") from err
    return to_chw(resize_square(picture, image_size, fit="crop"))


def build(
    root: Path,
    classes: list[str],
    files: list[tuple[Path, int]],
    image_size: int,
    progress: bool = False,
) -> DomainData:
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(
            tqdm(
                pool.map(lambda item: load_image(item[0], image_size), files),
                total=len(files),
                desc=f"load {root.name}",
                unit="img",
                disable=not progress,
                leave=False,
            )
        )
    images = np.stack(arrays)
    labels = np.array([label for _, label in files], dtype=np.int64)
    parts = split_indices(labels, fraction_sizes(*SPLIT_FRACTIONS))
    splits = [Split(torch.from_numpy(images[idx]), torch.from_numpy(labels[idx])) for idx in parts]
    return DomainData(root.name, classes, *splits, image_size=image_size, source=str(root))
