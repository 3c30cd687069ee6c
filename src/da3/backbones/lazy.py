"""Backbones whose weights are read a part at a time, when the part is needed.

A lazy backbone is built on PyTorch's ``meta`` device (shapes, no storage) and carries a
:class:`WeightReader` that gives the values of named tensors, a few at a time: from a
weights file (each read maps the file, copies what was asked and unmaps it again), or from
a seeded random initialisation that depends only on the tensor's name. Whoever converts the
backbone part by part (the lean engine, :func:`da3.lean.to_lean` with ``consume=True``)
reads each part's weights just before converting it and drops them right after, so the
float32 stock weights never exist all at once: for a frozen ResNet-50 held in 8 bits that
is 98 MiB of float32 the process never holds. :func:`materialize` reads the whole backbone
at once (the stock form, for fine-tuning).

The weights fingerprint (:func:`da3.backbones.weights_fingerprint`) of a lazy backbone is
computed over the same bytes in the same order as for the materialized one: the same
weights give the same fingerprint whichever way they were built.
"""

from __future__ import annotations

import collections
import pickle
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from da3.errors import Da3Error

# how many bytes of weights one read brings in at most (when the caller asks for many)
READ_BYTES = 4 * 2**20


def named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer under ``module`` by its state-dict name, shared ones
    under each of their names."""
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


class WeightReader:
    """Values of a lazy backbone's tensors by the backbone's own state-dict names.

    ``read(names)`` returns the tensors asked for (new tensors, except from a legacy
    ``.pth`` file, which is read whole and whose tensors are handed out as they are)."""

    def __init__(self, read: Callable[[list[str]], dict[str, torch.Tensor]]):
        self._read = read

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        return self._read(names) if names else {}


def is_lazy(module: nn.Module) -> bool:
    """Whether any tensor under ``module`` is still waiting for its values."""
    return any(t.is_meta for _, t in named_tensors(module))


def reader_of(backbone: nn.Module) -> WeightReader | None:
    return getattr(backbone, "weight_reader", None)


def set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in the place of the parameter or buffer ``name`` under ``root`` (a
    parameter stays one, with its ``requires_grad``)."""
    owner_name, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if attr in owner._parameters:
        was = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(value, requires_grad=was.requires_grad)
    else:
        owner._buffers[attr] = value


def materialize(backbone: nn.Module, part: str = "") -> None:
    """Read the values of the tensors of ``backbone`` under ``part`` (a submodule's name;
    "" for all of them) that have none yet, in reads of at most :data:`READ_BYTES`."""
    reader = reader_of(backbone)
    module = backbone.get_submodule(part) if part else backbone
    prefix = f"{part}." if part else ""
    waiting = [(prefix + n, t) for n, t in named_tensors(module) if t.is_meta]
    if waiting and reader is None:
        raise Da3Error(f"backbone part {part or '(all)'!r} has no weights and no reader")
    for names in chunks(waiting):
        values = reader.read(names)
        for name in names:
            set_tensor(backbone, name, values[name])
        del values
    if not part:  # all read: the reader (and what it may hold, see file_reader) goes
        backbone.__dict__.pop("weight_reader", None)


def chunks(named: list[tuple[str, torch.Tensor]], limit: int = READ_BYTES) -> Iterator[list[str]]:
    """The names of ``named`` (name, tensor) in order, grouped so that each group's tensors
    hold at most ``limit`` bytes (a larger tensor makes a group of its own)."""
    group: list[str] = []
    size = 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if group and size + nbytes > limit:
            yield group
            group, size = [], 0
        group.append(name)
        size += nbytes
    if group:
        yield group


def attach(backbone: nn.Module, native: nn.Module, read_native, source: str) -> nn.Module:
    """Give ``backbone`` (a view built on the ``meta`` device from the modules of ``native``)
    a reader: ``read_native(native_names)`` gives tensors by ``native``'s own state-dict
    names (a weights file's layout); the view's names are translated to those."""
    native_name = {id(t): n for n, t in named_tensors(native)}
    to_native = {}
    for name, t in named_tensors(backbone):
        if id(t) not in native_name:
            raise Da3Error(f"{source}: tensor {name} of the view is not in the network")
        to_native[name] = native_name[id(t)]
    shapes = {n: (tuple(t.shape), t.dtype) for n, t in named_tensors(backbone)}

    def read(names: list[str]) -> dict[str, torch.Tensor]:
        got = read_native([to_native[n] for n in names])
        out = {}
        for n in names:
            value = got[to_native[n]]
            shape, dtype = shapes[n]
            if value.is_floating_point() and value.dtype != dtype:
                value = value.to(dtype)
            out[n] = value.reshape(shape)
        return out

    backbone.weight_reader = WeightReader(read)
    return backbone


# -- where the values come from ---------------------------------------------------------


def _mmap_state(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        return None  # not a zip checkpoint (legacy format): cannot be mapped


# The storage types a legacy ``.pth`` names, and what their elements are.
_LEGACY_STORAGES = {
    f"{kind}Storage": dtype
    for kind, dtype in (
        ("Float", torch.float32),
        ("Double", torch.float64),
        ("Half", torch.float16),
        ("BFloat16", torch.bfloat16),
        ("Long", torch.int64),
        ("Int", torch.int32),
        ("Short", torch.int16),
        ("Char", torch.int8),
        ("Byte", torch.uint8),
        ("Bool", torch.bool),
    )
}


class _LegacyTensor:
    """Where a tensor of a legacy ``.pth`` lies: its storage (by key), offset, shape, strides."""

    def __init__(self, storage, offset, size, stride, *_rest) -> None:
        if not (isinstance(storage, tuple) and len(storage) == 2):
            raise pickle.UnpicklingError("a tensor without a storage")
        self.key, self.dtype = storage
        self.offset, self.size, self.stride = int(offset), tuple(size), tuple(stride)
        self.shape = self.size


class _LegacyIndex(pickle.Unpickler):
    """Unpickles the parts of a legacy (non-zip) ``torch.save`` file that describe a state
    dict, making nothing but dicts, tuples and :class:`_LegacyTensor`: any other global is
    refused."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _LegacyTensor
        if module == "torch" and name in _LEGACY_STORAGES:
            return _LEGACY_STORAGES[name]
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a state dict")

    def __init__(self, file) -> None:
        super().__init__(file)
        self.storages: dict[str, torch.dtype] = {}  # key -> element type, as they come

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, numel[, view metadata])
        if not (
            isinstance(pid, tuple) and pid[0] == "storage" and pid[1] in _LEGACY_STORAGES.values()
        ):
            raise pickle.UnpicklingError("an unknown persistent id")
        self.storages[str(pid[2])] = pid[1]
        return (str(pid[2]), pid[1])


def _legacy_index(path: Path) -> dict[str, tuple[int, _LegacyTensor]] | None:
    """Name -> (byte offset of its storage's data, where it lies) for a legacy (non-zip)
    ``.pth`` state dict: the file read through without its tensors' data (each storage is
    an element count and the elements, in the order of a key list). None when the file is
    not such a state dict (then it is read whole by torch.load)."""
    try:
        with open(path, "rb") as f:
            magic, protocol = _LegacyIndex(f).load(), _LegacyIndex(f).load()
            info = _LegacyIndex(f).load()
            if magic != _LEGACY_MAGIC or protocol != 1001 or not info.get("little_endian"):
                return None
            main = _LegacyIndex(f)
            state = main.load()
            keys = _LegacyIndex(f).load()
            if not isinstance(state, dict) or not all(
                isinstance(k, str) and isinstance(v, _LegacyTensor) for k, v in state.items()
            ):
                return None
            starts, counts = {}, {}
            for key in keys:
                (counts[key],) = struct.unpack("<q", f.read(8))
                starts[key] = f.tell()
                f.seek(counts[key] * main.storages[key].itemsize, 1)
            if f.tell() > path.stat().st_size:
                return None
            for t in state.values():  # each tensor within its own storage
                if min(t.size, default=1) < 0 or min(t.stride, default=0) < 0 or t.offset < 0:
                    return None
                if t.offset + _span(t) > counts[t.key]:
                    return None
            return {name: (starts[t.key], t) for name, t in state.items()}
    except (
        pickle.UnpicklingError,
        EOFError,
        KeyError,
        AttributeError,
        TypeError,
        ValueError,
        struct.error,
    ):
        return None


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization's MAGIC_NUMBER


def _span(t: _LegacyTensor) -> int:
    """Elements of its storage a tensor covers, from its first to its last."""
    if not all(t.size):
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(t.size, t.stride, strict=True))


def _read_legacy(f, start: int, t: _LegacyTensor) -> torch.Tensor:
    """One tensor of a legacy ``.pth`` (``f`` open on it): the span of its storage it covers,
    read into a new tensor, with its shape and strides."""
    span = _span(t)
    data = torch.empty(span, dtype=t.dtype)
    view = memoryview(data.view(torch.uint8).numpy()) if span else memoryview(bytearray())
    f.seek(start + t.offset * t.dtype.itemsize)
    if f.readinto(view) != len(view):
        raise EOFError("the file ends inside a tensor")
    return data.as_strided(t.size, t.stride)


def _first_line(err: Exception) -> str:
    """``Type: message`` of an error, its first line only (torch's are paragraphs)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def file_reader(path: Path, expected: dict[str, tuple[tuple, torch.dtype]]):
    """``read_native`` over a ``.safetensors`` or ``.pth`` state dict, checked against
    ``expected`` (native name -> shape, dtype) before anything is read: a one-line
    :class:`Da3Error` naming the file when it cannot be read or does not match. Each read
    opens (maps) the file, copies the tensors asked for and closes it, so the file's pages
    are not held between reads."""
    if not path.is_file():
        raise Da3Error(f"{path}: weights file not found")
    held: dict[str, torch.Tensor] | None = None  # a .pth torch.load had to read whole
    legacy = None  # a legacy .pth state dict: where each tensor lies in it
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
        else:
            state = _mmap_state(path)
            if state is None:
                state = legacy = _legacy_index(path)
            if state is None:
                state = held = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise Da3Error(f"{path}: not a state dict of tensors")
            if legacy is not None:
                shapes = {k: tuple(t.size) for k, (_, t) in legacy.items()}
            else:
                if not all(isinstance(v, torch.Tensor) for v in state.values()):
                    raise Da3Error(f"{path}: not a state dict of tensors")
                shapes = {k: tuple(v.shape) for k, v in state.items()}
            del state
    except Da3Error:
        raise
    except Exception as err:  # noqa: BLE001 - any decoding failure is the file's fault
        raise Da3Error(f"{path}: cannot read weights ({_first_line(err)})") from None
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [k for k in expected if k in shapes and shapes[k] != tuple(expected[k][0])]
    if missing or unexpected or wrong:
        what = (
            f"missing {', '.join(missing[:3])}"
            if missing
            else f"unexpected {', '.join(unexpected[:3])}"
            if unexpected
            else f"shape of {wrong[0]} is {shapes[wrong[0]]}, the network's "
            f"{tuple(expected[wrong[0]][0])}"
        )
        raise Da3Error(f"{path}: weights do not match the architecture ({what})")

    def read_native(names: list[str]) -> dict[str, torch.Tensor]:
        if held is not None:  # handed out as they are: no second copy while building
            return {n: held[n] for n in names}
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), "pt") as f:
                    return {n: f.get_tensor(n) for n in names}
            if legacy is not None:
                with open(path, "rb") as f:
                    return {n: _read_legacy(f, *legacy[n]) for n in names}
            state = _mmap_state(path)
            if state is None:
                raise RuntimeError("the file changed while it was read")
            out = {n: state[n].clone() for n in names}  # copies: the mapping goes with `state`
            del state
            return out
        except Exception as err:  # noqa: BLE001 - e.g. the file replaced or cut meanwhile
            raise Da3Error(f"{path}: cannot read weights ({_first_line(err)})") from None

    return read_native


def random_reader(backbone: nn.Module, seed: int) -> WeightReader:
    """Seeded random values for the view's tensors, each from its own generator (seeded by
    ``seed`` and the tensor's name, so any tensor can be made alone, in any order):
    convolutions He-normal (fan out, as torchvision initialises its CNNs), batch norms the
    identity, linear layers normal(0, 0.01) with zero bias."""
    kinds = {}  # what each tensor is (not the modules: they must go once converted)
    for name, module in backbone.named_modules(remove_duplicate=False):
        for attr, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is not None:
                kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
                kind = kind if isinstance(module, nn.Conv2d | nn.Linear) else "other"
                kinds[f"{name}.{attr}" if name else attr] = (kind, attr, tuple(t.shape), t.dtype)

    def read(names: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for n in names:
            kind, attr, shape, dtype = kinds[n]
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(n.encode()))
            t = torch.empty(shape, dtype=dtype)
            if kind == "conv" and attr == "weight":
                nn.init.kaiming_normal_(t, mode="fan_out", nonlinearity="relu", generator=g)
            elif kind == "linear" and attr == "weight":
                nn.init.normal_(t, 0.0, 0.01, generator=g)
            elif attr in ("weight", "running_var"):  # batch norm: the identity
                t.fill_(1)
            else:  # biases, running means, num_batches_tracked
                t.zero_()
            out[n] = t
        return out

    backbone.weight_reader = WeightReader(read)
    return backbone.weight_reader
