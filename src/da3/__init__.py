"""da3: memory-efficient multi-domain learning on the device.

``import da3`` is light (no torch); the library's entry points load on first use:
:func:`train_domain` with :class:`TrainSettings` (train one domain end to end),
:func:`open_domain` (a saved domain, ready to predict), :class:`MultiDomainModel` and
:class:`DomainStore` (load, switch, predict),
:func:`load_domain` (image domains).
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "TrainSettings": "da3.training",
    "TrainedDomain": "da3.training",
    "train_domain": "da3.training",
    "MultiDomainModel": "da3.domains",
    "DomainStore": "da3.domains",
    "open_domain": "da3.domains",
    "load_domain": "da3.data",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'da3' has no attribute {name!r}")
