"""The ``clipart`` domain: public-domain drawings from openclipart, rendered from SVG.

Source: ``/usr/share/openclipart/svg/<category>/<subcategory>/...`` (apt ``openclipart-svg``),
rendered with ``rsvg-convert`` (apt ``librsvg2-bin``). A few-shot domain and the hardest one.

How the classes are formed (all by rule, from the files present):

1. A candidate class is one folder's *own* ``*.svg`` files (not those of its sub-folders),
   named by its path: ``food/fruit``, ``tools``, ``people/smilies``.
2. Trees of symbols, icons and abstract shapes are not pictures of things and are left out:
   see ``EXCLUDED_TREES`` (icon themes, stars, arrows, gradients, flags, road signs, the four
   styles of one card deck, ...).
3. Drawings are identified by content: symlinks resolved, the bytes hashed after removing the
   ``<metadata>`` block and all whitespace (many copies differ only in their keyword list).
   Repeats inside a folder count once. A drawing found in several folders goes to the most
   specific one when they lie on one path (``transportation`` and ``transportation/vehicles``
   -> the latter) and is dropped when the folders are unrelated (the same ice-cream cones sit
   in ``food/desserts`` and ``recreation/party``: their label would be ambiguous).
4. Folders with at least ``MIN_IMAGES`` (35) distinct drawings are kept, except a folder
   that has a kept sub-folder: its own files are a miscellany overlapping that sub-folder
   (``food`` beside ``food/fruit``). At most the ``MAX_CLASSES`` (20) largest are used.
5. Every drawing is rendered once at ``REFERENCE_SIZE`` (96 px); blank renders (3 files draw
   nothing) and pixel-identical renders are dropped (one copy kept when the copies share a
   label). Deciding this at one fixed size keeps the same drawings, in the same splits, at
   every resolution.

With openclipart-svg 1:0.18+dfsg-19 and librsvg 2.54 this gives 15 classes and 891 drawings
(37 to 110 per class), split 60/10/30 inside each class: 532 train, 91 val, 268 test.

Rendering: ``rsvg-convert`` draws each SVG at the target size (aspect ratio kept, white
background), centred on a white square; one renderer process per CPU core (at most four) runs
at a time. Building takes 10-20 s on a 2-core machine at 96 px; other sizes render twice
(reference + target), so about twice that. A file the renderer cannot draw is skipped with a
warning.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from da3.data.domain import DomainData, Split, fraction_sizes, split_indices
from da3.data.imaging import flatten_alpha, resize_square, to_chw
from da3.data.sources import apt_data_path
from da3.errors import Da3Error

CLIPART_DIR = Path("/usr/share/openclipart/svg")
RENDERER = "rsvg-convert"
EXCLUDED_TREES = (
    "computer",  # icon themes, buttons, hardware icons
    "logos",
    "shapes",  # stars, arrows, jigsaw pieces, flowchart symbols
    "signs_and_symbols",  # flags, map symbols, LEDs
    "special",  # gradients, fill patterns
    "unsorted",
    "recreation/games/cards",  # the same 52 cards in four styles
    "transportation/aiga-symbols",
    "transportation/roadsigns",
)
MIN_IMAGES = 35
MAX_CLASSES = 20
SPLIT_FRACTIONS = (0.1, 0.3)  # val, test; the rest (60 %) trains
NOMINAL_COUNTS = (15, 532, 91, 268)  # classes, train, val, test with openclipart-svg 1:0.18
RENDER_TIMEOUT_S = 60
REFERENCE_SIZE = 96  # renders at this size decide which drawings are kept
_METADATA = re.compile(rb"<metadata\b.*?</metadata\s*>", re.DOTALL | re.IGNORECASE)
log = logging.getLogger(__name__)


def _excluded(folder: str) -> bool:
    return any(folder == t or folder.startswith(t + "/") for t in EXCLUDED_TREES)


def _is_ancestor(parent: str, child: str) -> bool:
    return parent == "" or child.startswith(parent + "/")


def _own_svgs(root: Path) -> Iterator[tuple[str, Path]]:
    """(folder relative to root, file) for every .svg, in a fixed order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        folder = Path(dirpath).relative_to(root).as_posix()
        folder = "" if folder == "." else folder
        if _excluded(folder):
            dirnames.clear()
            continue
        for name in sorted(filenames):
            if name.lower().endswith(".svg"):
                yield folder, Path(dirpath) / name


def content_key(path: Path) -> str:
    """Identity of a drawing: SHA-256 of its bytes without ``<metadata>`` and whitespace.

    Many files are copies whose only difference is the keyword list in their metadata.
    """
    data = path.resolve(strict=True).read_bytes()
    return hashlib.sha256(b"".join(_METADATA.sub(b"", data).split())).hexdigest()


def select_classes(root: Path = CLIPART_DIR) -> dict[str, list[Path]]:
    """Class name -> the distinct SVG files of that class (steps 1-4 of the module doc)."""
    folders_of: dict[str, set[str]] = defaultdict(set)
    first_path: dict[tuple[str, str], Path] = {}
    for folder, path in _own_svgs(root):
        try:
            key = content_key(path)
        except OSError:  # a broken symlink or an unreadable file: not part of the domain
            continue
        folders_of[key].add(folder)
        first_path.setdefault((folder, key), path)

    members: dict[str, list[str]] = defaultdict(list)
    for key, folders in folders_of.items():
        deepest = max(folders, key=lambda f: (f.count("/"), f))
        if all(f == deepest or _is_ancestor(f, deepest) for f in folders):
            members[deepest].append(key)

    big = {f for f, keys in members.items() if len(keys) >= MIN_IMAGES and f}
    leaves = [f for f in big if not any(_is_ancestor(f, g) for g in big if g != f)]
    chosen = sorted(leaves, key=lambda f: (-len(members[f]), f))[:MAX_CLASSES]
    return {f: sorted(first_path[(f, k)] for k in members[f]) for f in sorted(chosen)}


def drop_bad_renders(jobs: list[tuple[int, Path]], renders: list[np.ndarray | None]) -> list[int]:
    """Indices of ``jobs`` to keep, judged on their renders at ``REFERENCE_SIZE`` (step 5).

    Dropped: failed renders, blank (single-colour) renders, and pixel-identical renders: all
    of a group when they carry different labels, all but the first when they share one.
    """
    groups: dict[bytes, list[int]] = defaultdict(list)
    for i, image in enumerate(renders):
        if image is None or int(image.min()) == int(image.max()):
            continue
        groups[hashlib.sha256(image.tobytes()).digest()].append(i)
    keep = [g[0] for g in groups.values() if len({jobs[i][0] for i in g}) == 1]
    return sorted(keep)


def renderer() -> str:
    path = shutil.which(RENDERER)
    if path is None:
        raise Da3Error(
            f"{RENDERER}: not found on PATH; domain 'clipart' needs the apt package "
            "librsvg2-bin (sudo apt-get install librsvg2-bin)"
        )
    return path


def locate() -> str:
    root = apt_data_path(CLIPART_DIR, "clipart", "openclipart-svg")
    renderer()
    return str(root)


def render_svg(path: Path, image_size: int, exe: str | None = None) -> np.ndarray:
    """3 x S x S uint8 rendering of one SVG (aspect kept, centred on white)."""
    exe = exe or renderer()
    cmd = [exe, "-w", str(image_size), "-h", str(image_size), "-a", "-b", "white", "-f", "png"]
    try:
        done = subprocess.run(
            [*cmd, str(path.resolve())],
            capture_output=True,
            timeout=RENDER_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise Da3Error(f"{path}: {RENDERER} took more than {RENDER_TIMEOUT_S} s") from err
    if done.returncode != 0 or not done.stdout:
        message = done.stderr.decode(errors="replace").strip().splitlines()
        raise Da3Error(f"{path}: {RENDERER} failed ({message[-1] if message else 'no output'})")
    from PIL import Image  # here: loading a cached domain never needs Pillow

    try:
        with Image.open(io.BytesIO(done.stdout)) as image:
            image.load()
            picture = flatten_alpha(image).convert("RGB")
    except Exception as err:
        raise Da3Error(f"{path}: {RENDERER} gave an unreadable PNG ({err})") from err
    return to_chw(resize_square(picture, image_size, fit="pad"))


def _render_all(
    jobs: list[tuple[int, Path]], image_size: int, exe: str, progress: bool
) -> list[np.ndarray | None]:
    def work(job: tuple[int, Path]) -> np.ndarray | None:
        try:
            return render_svg(job[1], image_size, exe)
        except Da3Error as err:
            log.warning("da3: skipping clip art %s", err)
            return None

    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(
            tqdm(
                pool.map(work, jobs),
                total=len(jobs),
                desc=f"render clipart {image_size}px",
                unit="svg",
                disable=not progress,
                leave=False,
            )
        )


def build(image_size: int, progress: bool = False) -> DomainData:
    root = Path(locate())
    exe = renderer()
    classes = select_classes(root)
    names = list(classes)
    jobs = [(c, path) for c, name in enumerate(names) for path in classes[name]]
    # Which drawings to keep is decided on renders at one fixed size, so every resolution
    # holds the same drawings in the same splits.
    renders = _render_all(jobs, REFERENCE_SIZE, exe, progress)
    keep = drop_bad_renders(jobs, renders)
    jobs = [jobs[i] for i in keep]
    if image_size == REFERENCE_SIZE:
        images = [renders[i] for i in keep]
    else:
        images = _render_all(jobs, image_size, exe, progress)
    # A drawing that rendered at the reference size but fails now: draw it as blank white
    # rather than drop it, so the splits stay the same at every resolution.
    blank = np.full((3, image_size, image_size), 255, dtype=np.uint8)
    stacked = np.stack([blank if img is None else img for img in images])
    labels = np.array([c for c, _ in jobs], dtype=np.int64)
    parts = split_indices(labels, fraction_sizes(*SPLIT_FRACTIONS))
    import torch

    splits = [Split(torch.from_numpy(stacked[idx]), torch.from_numpy(labels[idx])) for idx in parts]
    return DomainData("clipart", names, *splits, image_size=image_size, source=str(root))
