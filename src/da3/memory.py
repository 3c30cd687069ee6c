"""Deterministic memory accounting: bytes kept for backward, and the analytical floor."""

from __future__ import annotations

from collections.abc import Callable

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
