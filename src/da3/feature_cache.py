"""Frozen backbone features of a fixed set of images, computed once and reused.

For a method whose backbone part is frozen and reads nothing but the input
(:class:`da3.methods.base.CacheableFeatures`: ``udta``, ``linear``), the taps of an image are
the same in every epoch as long as the image is (no augmentation). The first time a batch of
images is seen its taps are computed as usual and copied into the cache; later epochs gather
them from there and skip the backbone. Stored in float32 the reused taps are the computed
ones bit for bit; float16 halves the memory and rounds the features (relative error ~5e-4).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from da3.errors import Da3Error

CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class FeatureCache:
    """The taps of ``n`` images, indexed by image number, filled on first use."""

    def __init__(self, n: int, dtype: str = "float32") -> None:
        if dtype not in CACHE_DTYPES:
            raise Da3Error(f"cache dtype {dtype!r}: choose from {', '.join(CACHE_DTYPES)}")
        self.n = n
        self.dtype = CACHE_DTYPES[dtype]
        self.stores: list[torch.Tensor] | None = None
        self.compute_dtypes: list[torch.dtype] = []
        self.filled = torch.zeros(n, dtype=torch.bool)

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds (allocated in full on first use)."""
        return sum(s.numel() * s.element_size() for s in self.stores or [])

    @property
    def complete(self) -> bool:
        return bool(self.filled.all())

    def get(
        self, idx: torch.Tensor, compute: Callable[[], list[torch.Tensor]]
    ) -> list[torch.Tensor]:
        """The taps of images ``idx``: from the cache if all are there, else ``compute()``
        (whose result is stored and returned as computed)."""
        if self.stores is not None and bool(self.filled[idx].all()):
            return [
                s[idx.to(s.device)].to(dt)
                for s, dt in zip(self.stores, self.compute_dtypes, strict=True)
            ]
        taps = compute()
        if self.stores is None:
            self.compute_dtypes = [t.dtype for t in taps]
            self.stores = [
                torch.empty(
                    (self.n, *t.shape[1:]),
                    dtype=self.dtype if t.is_floating_point() else t.dtype,
                    device=t.device,
                )
                for t in taps
            ]
        for s, t in zip(self.stores, taps, strict=True):
            s[idx.to(s.device)] = t.detach().to(s.dtype)
        self.filled[idx] = True
        return taps
