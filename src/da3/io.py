"""Atomic writes of safetensors and JSON files (temporary file, fsync, rename), and
checked reads of files a user may have received from anywhere. Importing it does not
import torch.

A read never trusts a size the file declares: a JSON file is read up to a limit, a
safetensors header is checked against the file's real size (every tensor's byte range
inside the file, its shape times its dtype's size equal to that range) before anything
is allocated, so a damaged or hostile file is refused with one line naming it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from da3.errors import Da3Error

if TYPE_CHECKING:  # torch is imported where tensors are read or written: commands that
    import torch  # only read JSON (``da3 domains list``) start without it


def _atomic(path: Path, write) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise Da3Error(f"{path.parent}: cannot write here ({err.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise Da3Error(f"{path}: cannot write ({err.strerror or err})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    _atomic(path, lambda f: f.write(text.encode()))


def write_text(path: Path, text: str) -> None:
    _atomic(path, lambda f: f.write(text.encode()))


MAX_JSON_BYTES = 64 * 2**20  # a domain, sidecar or results file is far smaller


def read_bytes(path: Path, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of ``path``, refused (not read) beyond ``max_bytes``: reads at most one
    byte more, so a device file or a huge file costs nothing."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise Da3Error(f"{path}: file not found") from None
    except IsADirectoryError:
        raise Da3Error(f"{path}: is a folder, not a {what}") from None
    except OSError as err:
        raise Da3Error(f"{path}: cannot read ({err.strerror or err})") from None
    if len(data) > max_bytes:
        raise Da3Error(f"{path}: too large for a {what} (over {max_bytes / 2**20:.0f} MiB)")
    return data


def read_json(path: Path, max_bytes: int = MAX_JSON_BYTES) -> dict:
    raw = read_bytes(path, max_bytes, "JSON file")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        # ValueError: JSONDecodeError, or an integer of more than 4300 digits
        detail = "nested too deeply" if isinstance(err, RecursionError) else one_line(err)
        raise Da3Error(f"{path}: not valid JSON ({detail})") from None
    if not isinstance(data, dict):
        raise Da3Error(f"{path}: expected a JSON object")
    return data


def one_line(err: BaseException, limit: int = 200) -> str:
    """An exception's message as one short line (for a Da3Error naming a file)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> str:
    """Write ``tensors`` atomically in the safetensors format; returns the SHA-256 (hex) of
    the file written. Streamed a tensor at a time, straight from each tensor's memory:
    nothing is copied but a tensor that is not contiguous or not on the CPU (safetensors'
    own writer first builds the whole file in memory, which for a fine-tuned network's
    checkpoint is as large again as its weights, gradients' worth and optimizer state)."""
    import torch

    items = sorted(
        ((k, v.detach()) for k, v in tensors.items()),
        key=lambda kv: (-kv[1].element_size(), kv[0]),  # each tensor aligned to its size
    )
    head = safetensors_header(
        [
            (k, DTYPE_NAMES[str(v.dtype)], list(v.shape), v.numel() * v.element_size())
            for k, v in items
        ],
        {k: str(v) for k, v in (metadata or {}).items()},
    )
    digest = hashlib.sha256()

    def write(f) -> None:
        f.write(head)
        digest.update(head)
        for _, v in items:
            if v.numel():
                data = memoryview(v.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
                f.write(data)
                digest.update(data)

    _atomic(path, write)
    return digest.hexdigest()


DTYPE_NAMES = {  # torch dtype (by name: this module imports without torch) -> safetensors
    "torch.bool": "BOOL",
    "torch.uint8": "U8",
    "torch.int8": "I8",
    "torch.int16": "I16",
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
    "torch.int32": "I32",
    "torch.float32": "F32",
    "torch.int64": "I64",
    "torch.float64": "F64",
}


def safetensors_header(entries: list[tuple[str, str, list[int], int]], metadata: dict) -> bytes:
    """The 8-byte length and JSON header of a safetensors file whose tensors ``(name,
    dtype, shape, bytes)`` follow back to back in that order (the format's rules: offsets
    relative to the end of the header, the header padded with spaces to a multiple of 8)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    at = 0
    for name, dtype, shape, size in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + size]}
        at += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class LazyTensors(Mapping):
    """The tensors of a safetensors file as a read-only mapping, each read from disk when
    it is asked for (a state loaded from it tensor by tensor never holds two copies)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        header = read_safetensors_header(self.path)
        self._keys = [k for k in header if k != "__metadata__"]

    def __getitem__(self, key: str):
        if key not in self._keys:
            raise KeyError(key)
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as err:
        raise Da3Error(f"{path}: cannot read ({err.strerror or err})") from None
    return h.hexdigest()


# Bytes per element of each safetensors dtype (the ones safetensors.torch reads).
SAFETENSORS_DTYPES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2": 1,
    "F8_E5M2FNUZ": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
MAX_SAFETENSORS_HEADER = 16 * 2**20  # safetensors' own limit is 100 MB


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size: every
    tensor's dtype known, its shape non-negative integers, its byte range inside the data
    part and as long as its shape says, the ranges back to back and filling the data part,
    ``__metadata__`` strings only. Raises a Da3Error naming the file otherwise."""
    path = Path(path)

    def bad(why: str) -> Da3Error:
        return Da3Error(f"{path}: not a readable safetensors file ({why})")

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_SAFETENSORS_HEADER):
                raise bad(f"header of {n} bytes declared, file has {size}")
            raw = f.read(n)
    except FileNotFoundError:
        raise Da3Error(f"{path}: file not found") from None
    except IsADirectoryError:
        raise Da3Error(f"{path}: is a folder, not a safetensors file") from None
    except OSError as err:
        raise Da3Error(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ is not a mapping of strings")
    data_bytes = size - 8 - n
    ranges = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        name = key if len(key) <= 80 else key[:77] + "..."
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r}: expected dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise bad(f"tensor {name!r}: unknown dtype {str(dtype)[:20]!r}")
        if not isinstance(shape, list) or len(shape) > 32 or not all(map(_natural, shape)):
            raise bad(f"tensor {name!r}: shape is not a list of at most 32 sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_natural, offsets))):
            raise bad(f"tensor {name!r}: data_offsets is not [begin, end]")
        begin, end = offsets
        declared = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
        if not begin <= end <= data_bytes:
            raise bad(f"tensor {name!r}: bytes {begin}-{end} beyond the {data_bytes} of data")
        if end - begin != declared:
            raise bad(f"tensor {name!r}: shape {shape} needs {declared} bytes, has {end - begin}")
        ranges.append((begin, end))
    at = 0
    for begin, end in sorted(ranges):
        if begin != at:
            raise bad(f"tensor data not back to back (a gap or overlap at byte {at})")
        at = end
    if at != data_bytes:
        raise bad(f"{data_bytes - at} bytes of data belong to no tensor")
    return header


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise Da3Error(f"{path}: file not found")
    read_safetensors_header(path)  # before safetensors allocates anything
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - any decoding failure is the file's fault
        raise Da3Error(f"{path}: not a readable safetensors file ({one_line(err)})") from None
