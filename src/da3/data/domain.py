"""The in-memory form of a domain, and the stratified split rule every domain uses.

A domain is a set of classes with three fixed splits of images: ``train`` to fit on, ``val`` to
choose settings, ``test`` to report. Images are ``uint8`` tensors ``N x 3 x S x S`` (RGB, square,
values 0-255), labels ``int64`` tensors of class indices into ``DomainData.classes``.

Split rule: inside each class, the examples are put in a random order drawn from a fixed seed and
that class's index; the first ``n_test`` go to test, the next ``n_val`` to val, the next
``n_train`` to train. So test is fixed by the seed alone: asking for fewer training examples
(:meth:`Split.per_class`) never moves an image in or out of test, and every split is stratified
(each class has its share in each split).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # imported where used: `da3 data list` and `da3 cache` run without torch
    import torch

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
SPLIT_SEED = 20201202  # fixed: changing it changes every split (bump the cache format with it)
FEW_IMAGES = 5  # a class with fewer images is warned about: too few to learn or to judge


@dataclass
class Split:
    """One split of a domain: ``images`` uint8 N x 3 x S x S and ``labels`` int64 N.

    ``images`` is a tensor in memory, or (for a domain read from the cache) a
    :class:`da3.data.cache.CachedImages` that reads the images asked for from disk; both
    give a uint8 tensor for ``images[idx]`` (an index tensor or a slice), so code that takes
    a batch at a time works with either. Whole-split code should take batches too.
    """

    images: Any
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def class_counts(self, num_classes: int) -> list[int]:
        """How many examples of each class this split holds."""
        import torch

        return torch.bincount(self.labels, minlength=num_classes).tolist()

    def per_class(self, n: int, seed: int = 0) -> Split:
        """A stratified subset with at most ``n`` examples of each class (few-shot training).

        Deterministic for a given ``seed``; the rest of the domain (val, test) is untouched.
        """
        if n < 1:
            raise ValueError(f"per_class needs n >= 1, got {n}")
        import torch

        labels = self.labels.numpy()
        keep: list[np.ndarray] = []
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            rng = np.random.default_rng([seed, int(c)])
            keep.append(np.sort(rng.permutation(idx)[:n]))
        order = torch.from_numpy(np.sort(np.concatenate(keep)))
        subset = getattr(self.images, "subset", None)  # images on disk stay on disk
        return Split(self.images[order] if subset is None else subset(order), self.labels[order])


@dataclass
class DomainData:
    """A domain ready to train on: its classes and the three fixed splits."""

    name: str
    classes: list[str]
    train: Split
    val: Split
    test: Split
    image_size: int
    source: str
    layout: str = ""  # how the splits were made, in words (for a folder: which layout)
    notes: list[str] = field(default_factory=list)  # what loading found that may be a mistake

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def splits(self) -> dict[str, Split]:
        return {"train": self.train, "val": self.val, "test": self.test}

    @property
    def image_bytes(self) -> int:
        """Bytes of one uint8 image."""
        return 3 * self.image_size * self.image_size

    def bytes_in_memory(self) -> int:
        """Bytes this domain holds in memory: its labels, and its images unless they are
        read from the cache file a batch at a time."""
        import torch

        total = 0
        for split in self.splits().values():
            total += split.labels.numel() * split.labels.element_size()
            if isinstance(split.images, torch.Tensor):
                total += split.images.numel() * split.images.element_size()
        return total

    def counts(self) -> dict[str, int]:
        """Number of images per split, e.g. ``{"train": 2000, "val": 500, "test": 1000}``."""
        return {name: len(split) for name, split in self.splits().items()}

    def class_counts(self) -> dict[str, list[int]]:
        """Per split, the number of images of each class."""
        return {s: split.class_counts(self.num_classes) for s, split in self.splits().items()}

    def describe_classes(self, limit: int = 8) -> str:
        """``classes: cat 40/7/20, dog 38/6/19, ...`` (train/val/test images of each)."""
        counts = self.class_counts()
        parts = [
            f"{name} {'/'.join(str(counts[s][i]) for s in SPLIT_NAMES)}"
            for i, name in enumerate(self.classes[:limit])
        ]
        more = f", ... ({self.num_classes - limit} more)" if self.num_classes > limit else ""
        return f"classes (train/val/test images): {', '.join(parts)}{more}"

    def warnings(self, few: int = FEW_IMAGES) -> list[str]:
        """What a user should know before trusting a run on this data: loading's notes
        (a folder's layout), classes with fewer than ``few`` images, a split without any
        image of a class. Each is one line; none stops training."""
        out = list(self.notes)
        counts = self.class_counts()
        totals = [sum(counts[s][i] for s in SPLIT_NAMES) for i in range(self.num_classes)]
        small = [i for i, n in enumerate(totals) if n < few]
        if small:
            listed = ", ".join(
                f"{self.classes[i]} {'/'.join(str(counts[s][i]) for s in SPLIT_NAMES)}"
                for i in small[:5]
            )
            out.append(
                f"{len(small)} of {self.num_classes} classes "
                f"{'has' if len(small) == 1 else 'have'} fewer than {few} images "
                f"({listed}{', ...' if len(small) > 5 else ''} train/val/test): too few to "
                "learn from or to judge; their val and test accuracy mean little"
            )
        for s in ("val", "test"):
            if len(getattr(self, s)) == 0:
                out.append(
                    f"the {s} split is empty"
                    + ("; the best epoch is chosen on nothing" if s == "val" else "")
                )
                continue
            missing = [i for i, n in enumerate(counts[s]) if n == 0 and i not in small]
            if missing:
                names = ", ".join(self.classes[i] for i in missing[:5])
                out.append(
                    f"the {s} split has no image of {len(missing)} classes ({names}"
                    f"{', ...' if len(missing) > 5 else ''}); its accuracy leaves them out"
                )
        return out


def split_indices(
    labels: np.ndarray,
    sizes: Callable[[int], tuple[int, int, int]],
    seed: int = SPLIT_SEED,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified split of ``labels`` into (train, val, test) index arrays (each sorted).

    ``sizes(n)`` gives ``(n_train, n_val, n_test)`` for a class with ``n`` examples; any
    examples beyond their sum are left out. Test is taken first, then val, then train.
    """
    labels = np.asarray(labels)
    parts: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_train, n_val, n_test = sizes(len(idx))
        if n_train + n_val + n_test > len(idx):
            raise ValueError(f"class {c} has {len(idx)} examples, split asks for more")
        order = idx[np.random.default_rng([seed, int(c)]).permutation(len(idx))]
        parts[2].append(order[:n_test])
        parts[1].append(order[n_test : n_test + n_val])
        parts[0].append(order[n_test + n_val : n_test + n_val + n_train])
    train, val, test = (np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts)
    return train, val, test


def fixed_sizes(n_train: int, n_val: int, n_test: int) -> Callable[[int], tuple[int, int, int]]:
    """The same counts for every class (the MNIST-like and texture domains)."""

    def sizes(n: int) -> tuple[int, int, int]:
        return n_train, n_val, n_test

    return sizes


def fraction_sizes(val: float = 0.1, test: float = 0.3) -> Callable[[int], tuple[int, int, int]]:
    """Shares of each class (folders, clip art): round half up, and keep at least one to train.

    A class of 1 image goes to train only; 2 images give 1 train, 1 test.
    """

    def sizes(n: int) -> tuple[int, int, int]:
        n_test = int(np.floor(n * test + 0.5))
        n_val = int(np.floor(n * val + 0.5))
        while n - n_test - n_val < 1 and (n_val or n_test):
            if n_val:
                n_val -= 1
            else:
                n_test -= 1
        return n - n_test - n_val, n_val, n_test

    return sizes
