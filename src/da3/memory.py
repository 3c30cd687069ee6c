"""Memory accounting: what a training process holds, measured and counted.

* :class:`ProcessMemory`: the resident memory of this process through a run's phases, as the
  device sees it (``VmRSS``, and the kernel's high-water mark ``VmHWM``).
* :func:`saved_activation_bytes`: bytes autograd keeps for backward (deterministic).
* :func:`tensor_bytes` / :func:`optimizer_state_bytes`: weights, gradients, optimizer moments.
* :func:`analytical_floor_bytes`: what the lean engine must keep at least.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from da3.lean.ops import LeanMaxPool2d, LeanReLU, packed_mask_bytes


def process_memory_bytes(field: str = "VmRSS") -> int:
    """A field of ``/proc/self/status`` in bytes: ``VmRSS`` (resident now) or ``VmHWM`` (its
    peak). Raises OSError where the file or field does not exist (not Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def _status(field: str) -> int:
    try:
        return process_memory_bytes(field)
    except OSError:
        return 0


class ProcessMemory:
    """The resident memory of this process across the phases of a run.

    Created when the run starts, after the imports: ``runtime`` is the resident size then
    (the interpreter, torch and the libraries: the floor every run pays). Each
    :meth:`phase` records the resident size before and after it and the high-water mark
    ``VmHWM`` after it. The mark is only read, never reset: resetting it
    (``/proc/self/clear_refs``) would also hide the peak from ``/usr/bin/time`` and from
    the parent process. So a phase's own peak is known exactly when it raised the mark (it
    then set the run's peak so far), and is "at most the mark" otherwise. Zeros where
    ``/proc`` does not exist (not Linux).
    """

    def __init__(self) -> None:
        self.runtime = _status("VmRSS")
        self.peak_at_start = _status("VmHWM")
        self.phases: list[dict] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        before, t0 = _status("VmRSS"), time.perf_counter()
        try:
            yield
        finally:
            self.phases.append(
                {
                    "phase": name,
                    "rss_before": before,
                    "rss_after": _status("VmRSS"),
                    "peak_after": _status("VmHWM"),
                    "seconds": time.perf_counter() - t0,
                }
            )

    @property
    def peak(self) -> int:
        return _status("VmHWM")

    def peak_phase(self) -> str | None:
        """The phase during which the process reached its peak (None: before the run)."""
        mark = self.peak_at_start
        setter = None
        for p in self.phases:
            if p["peak_after"] > mark:
                mark, setter = p["peak_after"], p["phase"]
        return setter

    def phase_peak_above(self, name: str) -> int | None:
        """How far the named phase went above the resident size it started from, when it
        raised the high-water mark (else None: it stayed below an earlier peak)."""
        mark = self.peak_at_start
        for p in self.phases:
            if p["peak_after"] > mark and p["phase"] == name:
                return p["peak_after"] - p["rss_before"]
            mark = max(mark, p["peak_after"])
        return None

    def record(self) -> dict:
        return {
            "runtime_bytes": self.runtime,
            "peak_bytes": self.peak,
            "peak_above_runtime_bytes": self.peak - self.runtime,
            "peak_phase": self.peak_phase(),
            "phases": self.phases,
        }


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc's
    ``malloc_trim``; a no-op elsewhere). Freed memory otherwise stays resident: the
    allocator keeps it for reuse, and the process's resident size does not come down
    between the phases of a run."""
    import ctypes
    import gc

    gc.collect()
    global _trim
    if _trim is None:
        try:  # glibc by its soname (ctypes.util.find_library would start a process)
            _trim = ctypes.CDLL("libc.so.6").malloc_trim if sys.platform == "linux" else False
        except (OSError, AttributeError):
            _trim = False
    if _trim:
        _trim(0)


_trim = None
M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc's malloc.h)
LEAN_MMAP_THRESHOLD = 128 * 1024
# a run that puts memory first (micro-batches, a budget): blocks from 32 KiB up are mapped
# alone, so the many small tensors of a micro-batch step (a slice's float weight, a DA3
# adaptor's maps) do not scatter the heap (with da3.lean.ops.native_kernels: see
# da3.training._memory_first for what the two did to a whole run)
MEMORY_FIRST_MMAP_THRESHOLD = 32 * 1024


def lean_allocator(threshold: int = LEAN_MMAP_THRESHOLD) -> bool:
    """Have glibc's malloc map every block of ``threshold`` bytes or more on its own and
    unmap it when freed. By default the threshold adapts, rising after each large block is
    freed (up to 32 MiB), so the tensors of a training step come from a heap that keeps what
    they leave: resident memory then stays near the largest step ever taken plus whatever
    lies scattered among it. Fixed, each freed tensor goes straight back to the system; the
    cost is a page fault per page of each new large tensor (measured: 0-10% slower steps).
    For a process that trains: ``da3 train`` calls it first thing. Returns False where it
    cannot be set (not glibc)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6") if sys.platform == "linux" else None
        return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the storages behind ``tensors``, each storage once."""
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of the optimizer's state tensors (AdamW: two moments per trainable weight;
    SGD with momentum: one buffer)."""
    return tensor_bytes(
        v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)
    )


def reset_peak_memory() -> bool:
    """Reset this process's peak resident size (VmHWM) to its current size; False where the
    kernel does not offer it (then VmHWM keeps the peak since the process started)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def saved_activation_bytes(
    model: nn.Module, step: Callable[[], torch.Tensor], exclude: nn.Module | None = None
) -> int:
    """Bytes of the tensors autograd keeps for backward while ``step()`` builds the graph.

    Counted with ``saved_tensors_hooks``, deduplicated by storage (a tensor saved twice, or
    two views of one buffer, count once, at their storage's full size), excluding the
    parameters and buffers of ``model`` (and of ``exclude``): those exist anyway. ``step``
    returns the loss; its graph is then released with a backward pass.
    """
    state = {
        t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())
    }
    if exclude is not None:
        state |= {
            t.untyped_storage().data_ptr()
            for t in list(exclude.parameters()) + list(exclude.buffers())
        }
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in state:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    if loss.requires_grad:
        loss.backward()
    return sum(seen.values())


def analytical_floor_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """What the lean engine must keep at least, from the architecture (TinyTL-style count).

    On the gradient path (where the input of a layer requires grad): one bit per ReLU
    element, one byte per max-pool output; for every module with a trainable weight (or a
    ``grad_needs_input`` attribute), its input in full precision (a weight gradient needs
    it). Modules may declare their own need with a method
    ``floor_saved_bytes(inputs, output) -> int``.
    """
    total = 0
    counted: set[int] = set()  # an input feeding two layers (block input) is kept once
    hooks = []

    def hook(m: nn.Module, inputs, output) -> None:
        nonlocal total
        x0 = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        on_path = x0 is not None and x0.requires_grad
        if hasattr(m, "floor_saved_bytes"):
            total += m.floor_saved_bytes(inputs, output)
        elif isinstance(m, LeanReLU | nn.ReLU | nn.ReLU6) and on_path:
            total += packed_mask_bytes(output.numel())
        elif isinstance(m, LeanMaxPool2d | nn.MaxPool2d) and on_path:
            total += output.numel()
        else:
            weight = getattr(m, "weight", None)
            trains = isinstance(weight, nn.Parameter) and weight.requires_grad
            # a layer whose own trainable tensor is not ``weight`` (piggyback's mask scores)
            trains = trains or getattr(m, "grad_needs_input", False)
            if trains and x0 is not None and x0.untyped_storage().data_ptr() not in counted:
                counted.add(x0.untyped_storage().data_ptr())
                total += x0.numel() * x0.element_size()

    for m in model.modules():
        if hasattr(m, "floor_saved_bytes") or not list(m.children()):
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return total
