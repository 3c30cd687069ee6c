"""Any folder of class sub-folders as a domain (the ImageFolder convention).

``root/<class>/<...>/<image>``: the class is the name of the sub-folder directly under ``root``
(sorted by name), the images are every image file below it, nested folders included.

Rules, so that a mistake in the data is reported, not silently learned from:

- Hidden files and folders (name starting with ``.``, e.g. ``.DS_Store``) and the OS clutter
  files ``Thumbs.db`` / ``desktop.ini`` are skipped. Loose files directly in ``root`` are
  ignored (they belong to no class).
- Files without an image extension (``IMAGE_EXTENSIONS``: ``notes.txt``, ``labels.csv``) are
  skipped too, as ``da3 predict`` skips them, and training names them in a warning
  (:attr:`FolderScan.skipped`). A file with an image extension must decode with PIL;
  otherwise a :class:`~da3.errors.Da3Error` names the file.
- A class folder without images, a root without class folders, or a root with only one class
  (a classifier needs two) is an error.
- What looks like a mistake but may not be one is a warning (:func:`layout_notes`): class
  folders named like years or dates (``photos/2023/<classes>`` given one level too high),
  or like splits that da3 does not recognise as such (``training/``, ``testing/``).

Images are converted to RGB (transparency onto white, EXIF rotation applied), the short side
resized to the resolution and the centre cut out (PIL bilinear, antialiased). Splits: 60/10/30
inside each class, same rule and seed as the benchmark domains.

A folder that is already split, ``root/train/<class>/...`` beside ``root/val/<class>/...``
and/or ``root/test/<class>/...`` (also ``valid/``, ``validation/``), keeps its splits; a split
it lacks is taken out of ``train/`` by the rule's share (val 10%, test 30% of each class).
The split folders must hold the same class folders, and a root must not mix split folders
with class folders: either is a one-line error naming them.

A prepared folder domain is cached like the benchmark ones, one entry per (absolute folder path,
resolution), stamped with a fingerprint of every file's relative path, size and modification
time: any change to the folder rebuilds the entry.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from da3.data.domain import DomainData, Split, fraction_sizes, split_indices
from da3.data.imaging import flatten_alpha, resize_square, to_chw
from da3.errors import Da3Error

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
IGNORED_FILES = frozenset({"thumbs.db", "desktop.ini"})
SPLIT_FRACTIONS = (0.1, 0.3)  # val, test


SPLIT_FOLDERS = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}


def _skipped(name: str) -> bool:
    return name.startswith(".") or name.lower() in IGNORED_FILES


@dataclass
class FolderScan:
    """What a folder holds: its classes, its image files with their class index, and, when
    the folder is already split (``root/train/<class>/...``), the split each file is in."""

    root: Path
    classes: list[str]
    files: list[tuple[Path, int]]
    given: dict[str, list[int]] | None = None  # split -> positions in ``files``
    skipped: list[Path] = field(default_factory=list)  # files that are not images

    @property
    def layout(self) -> str:
        """The layout in words, as training prints it."""
        if self.given is None:
            return (
                f"{len(self.classes)} class folders, split by da3 "
                f"{round(100 * (1 - sum(SPLIT_FRACTIONS)))}/{round(100 * SPLIT_FRACTIONS[0])}/"
                f"{round(100 * SPLIT_FRACTIONS[1])} per class"
            )
        found = [f"{s}/" for s in ("train", "val", "test") if s in self.given]
        carved = [s for s in ("val", "test") if s not in self.given]
        text = f"split folders {', '.join(found)} of {len(self.classes)} classes"
        if carved:
            shares = " and ".join(
                f"{s} {round(100 * SPLIT_FRACTIONS[0 if s == 'val' else 1])}%" for s in carved
            )
            text += f" ({shares} of train/ per class, by da3's rule)"
        return text


def _subfolders(root: Path) -> list[str]:
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as err:
        raise Da3Error(f"{root}: cannot list folder ({err.strerror or err})") from err
    return [e.name for e in entries if e.is_dir() and not _skipped(e.name)]


def scan(root: Path, min_classes: int = 2) -> FolderScan:
    """The classes and image files of an ImageFolder tree (or one already split into
    ``train/``, ``val/``, ``test/`` folders of class folders), checked. ``min_classes``:
    2 to train on; 1 to evaluate a domain on a folder of one of its classes."""
    if not root.exists():
        raise Da3Error(f"{root}: no such file or folder")
    if not root.is_dir():
        raise Da3Error(f"{root}: not a folder (expected a folder with one sub-folder per class)")
    top = _subfolders(root)
    splits = [d for d in top if d.lower() in SPLIT_FOLDERS]
    if splits:
        return _scan_split_folders(root, top, splits, min_classes)
    classes = top
    if not classes:
        raise Da3Error(f"{root}: no class sub-folders (put the images of each class in its own)")
    if len(classes) < min_classes:
        raise Da3Error(
            f"{root}: only one class folder ('{classes[0]}'); a domain needs at least 2 classes"
        )
    files: list[tuple[Path, int]] = []
    skipped: list[Path] = []
    for index, name in enumerate(classes):
        found = image_files(root / name, skipped)
        if not found:
            raise Da3Error(f"{root / name}: class folder has no images{_skipped_note(skipped)}")
        files.extend((path, index) for path in found)
    return FolderScan(root, classes, files, skipped=skipped)


def _scan_split_folders(
    root: Path, top: list[str], splits: list[str], min_classes: int = 2
) -> FolderScan:
    others = [d for d in top if d not in splits]
    if others:
        raise Da3Error(
            f"{root}: mixes split folders ({', '.join(splits)}) with other folders "
            f"({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}); put every class "
            "folder inside the split folders, or use no split folders"
        )
    by_split: dict[str, str] = {}
    for d in splits:
        kind = SPLIT_FOLDERS[d.lower()]
        if kind in by_split:
            raise Da3Error(f"{root}: both {by_split[kind]}/ and {d}/ are a {kind} split")
        by_split[kind] = d
    if "train" not in by_split:
        raise Da3Error(
            f"{root}: has {', '.join(d + '/' for d in splits)} but no train/ folder to learn from"
        )
    classes = _subfolders(root / by_split["train"])
    for d in by_split.values():
        theirs = _subfolders(root / d)
        if theirs != classes:
            missing = [c for c in classes if c not in theirs]
            extra = [c for c in theirs if c not in classes]
            what = "; ".join(
                part
                for part in (
                    f"{d}/ lacks {', '.join(missing[:5])}" if missing else "",
                    f"{d}/ has {', '.join(extra[:5])} that {by_split['train']}/ has not"
                    if extra
                    else "",
                )
                if part
            )
            raise Da3Error(f"{root}: split folders have different classes ({what})")
    if len(classes) < min_classes:
        raise Da3Error(
            f"{root / by_split['train']}: needs at least 2 class folders, found {len(classes)}"
        )
    files: list[tuple[Path, int]] = []
    skipped: list[Path] = []
    given: dict[str, list[int]] = {}
    for kind in ("train", "val", "test"):
        if kind not in by_split:
            continue
        given[kind] = []
        for index, name in enumerate(classes):
            found = image_files(root / by_split[kind] / name, skipped)
            if not found and kind == "train":
                raise Da3Error(
                    f"{root / by_split[kind] / name}: class folder has no images"
                    f"{_skipped_note(skipped)}"
                )
            given[kind].extend(range(len(files), len(files) + len(found)))
            files.extend((path, index) for path in found)
    return FolderScan(root, classes, files, given, skipped)


def split_plan(folder: FolderScan) -> dict[str, list[int]]:
    """For train, val and test, the positions in ``folder.files`` of its images, in order.

    A folder of class folders is split 60/10/30 inside each class (the rule of every
    domain, :func:`da3.data.domain.split_indices`). A folder already split keeps its splits;
    a split it lacks is taken out of ``train/`` with that rule's share (val 10%, test 30%
    of each class's training images).
    """
    labels = np.array([label for _, label in folder.files], dtype=np.int64)
    if folder.given is None:
        parts = split_indices(labels, fraction_sizes(*SPLIT_FRACTIONS))
        return {s: idx.tolist() for s, idx in zip(("train", "val", "test"), parts, strict=True)}
    train = np.array(folder.given["train"], dtype=np.int64)
    val_share = 0.0 if "val" in folder.given else SPLIT_FRACTIONS[0]
    test_share = 0.0 if "test" in folder.given else SPLIT_FRACTIONS[1]
    parts = split_indices(labels[train], fraction_sizes(val_share, test_share))
    plan = {s: train[idx].tolist() for s, idx in zip(("train", "val", "test"), parts, strict=True)}
    plan.update({s: folder.given[s] for s in ("val", "test") if s in folder.given})
    return plan


def image_files(folder: Path, skipped: list[Path] | None = None) -> list[Path]:
    """The image files under ``folder``, nested folders included, in a fixed order; hidden
    files and OS clutter are passed over, other files that are not images are added to
    ``skipped``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _skipped(d))
        for name in sorted(filenames):
            if _skipped(name):
                continue
            path = Path(dirpath) / name
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                if skipped is not None:
                    skipped.append(path)
                continue
            found.append(path)
    return found


def _skipped_note(skipped: list[Path]) -> str:
    if not skipped:
        return ""
    return f" (skipped {_files_text(skipped)} that {_not_images(skipped)})"


def _not_images(items: list) -> str:
    return "is not an image" if len(items) == 1 else "are not images"


def _files_text(paths: list[Path], limit: int = 3) -> str:
    names = ", ".join(p.name for p in paths[:limit]) + (", ..." if len(paths) > limit else "")
    return f"{len(paths)} file{'s' if len(paths) != 1 else ''} ({names})"


_YEAR = re.compile(r"(19|20)\d\d([-_.]\d{1,2}){0,2}")
_SPLIT_LIKE = re.compile(
    r"(train|training|trn|val|valid|validation|dev|test|testing|tst|eval|evaluation|holdout)"
    r"([-_ ]?(set|data|images|split|\d+))?",
    re.IGNORECASE,
)


def _same_subfolders(folder: FolderScan) -> list[str]:
    """The sub-folders every class folder holds, when they hold their images only in those
    same (at least 2) sub-folders; else []."""
    inner: list[set[str]] = [set() for _ in folder.classes]
    for path, label in folder.files:
        parts = path.relative_to(folder.root / folder.classes[label]).parts
        if len(parts) < 2:
            return []
        inner[label].add(parts[0])
    first = inner[0]
    return sorted(first) if len(first) > 1 and all(s == first for s in inner) else []


def layout_notes(folder: FolderScan) -> list[str]:
    """Warnings about a folder's layout that may be a mistake (see the module docstring)."""
    notes = []
    classes = folder.classes
    years = [c for c in classes if _YEAR.fullmatch(c)]
    if len(years) == len(classes):
        notes.append(
            f"the class folders are named like years or dates ({', '.join(years[:4])}"
            f"{', ...' if len(years) > 4 else ''}): is --data one level too high? Each folder "
            f"directly under {folder.root} is taken as a class"
        )
    elif folder.given is None and len(classes) > 1 and _same_subfolders(folder):
        inner = _same_subfolders(folder)
        notes.append(
            f"every class folder holds the same sub-folders ({', '.join(inner[:4])}"
            f"{', ...' if len(inner) > 4 else ''}) and no image of its own: is --data one "
            f"level too high? Each folder directly under {folder.root} is taken as a class"
        )
    else:
        split_like = [c for c in classes if _SPLIT_LIKE.fullmatch(c)]
        if split_like:
            notes.append(
                f"class folders {', '.join(split_like[:4])} look like splits, not classes; da3 "
                "takes train/, val/ (or valid/, validation/) and test/ as split folders, each "
                "holding the class folders: rename them so, or their images are learnt as "
                "classes"
            )
    if folder.skipped:
        notes.append(f"skipped {_files_text(folder.skipped)} that {_not_images(folder.skipped)}")
    return notes


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
    from PIL import Image, ImageOps  # here: a run whose images are cached never needs Pillow

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


def decode_chunks(
    paths: list[Path], image_size: int, bar: Any = None, chunk: int = 64
) -> Iterator[np.ndarray]:
    """The images of ``paths`` decoded by a few threads, as uint8 arrays of at most
    ``chunk`` images, in order: what is held at once is one chunk, not the folder."""
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i in range(0, len(paths), chunk):
            part = paths[i : i + chunk]
            arrays = list(pool.map(lambda p: load_image(p, image_size), part))
            if bar is not None:
                bar.update(len(part))
            yield np.stack(arrays) if arrays else np.zeros((0, 3, image_size, image_size), np.uint8)


def build(folder: FolderScan, image_size: int, progress: bool = False) -> DomainData:
    """The whole domain decoded into memory (when the cache cannot be written)."""
    plan = split_plan(folder)
    labels = np.array([label for _, label in folder.files], dtype=np.int64)
    splits = []
    with tqdm(
        total=len(folder.files),
        desc=f"load {folder.root.name}",
        unit="img",
        disable=not progress,
        leave=False,
    ) as bar:
        for s in ("train", "val", "test"):
            paths = [folder.files[i][0] for i in plan[s]]
            chunks = list(decode_chunks(paths, image_size, bar))
            images = (
                np.concatenate(chunks)
                if chunks
                else np.zeros((0, 3, image_size, image_size), np.uint8)
            )
            splits.append(Split(torch.from_numpy(images), torch.from_numpy(labels[plan[s]])))
    return DomainData(
        folder.root.name,
        folder.classes,
        *splits,
        image_size=image_size,
        source=str(folder.root),
        layout=folder.layout,
    )
