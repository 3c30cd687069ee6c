"""AdamW, SGD with momentum and the learning-rate schedule, without ``torch.optim``'s
import cost.

Every ``torch.optim.Optimizer`` imports ``torch._dynamo`` when it is built and when it
steps (the compiler's hooks). On the CUDA build of torch 2.14 that import alone adds about
155 MiB of resident memory to the process, more than everything else a DA3 run holds
above the runtime. :class:`AdamW` here keeps ``torch.optim.AdamW``'s update, calling torch's
own Adam kernels (the single-tensor one, as torch does for CPU tensors; the multi-tensor one
for CUDA tensors), so the numbers are the same, bit for bit; what it leaves out is the
compiler integration, sparse and complex gradients, ``amsgrad`` and ``fused``.

:class:`SGD` is ``torch.optim.SGD(params, lr, momentum, weight_decay)``'s update holding one
tensor per trainable weight instead of AdamW's two moments and a gradient: each step's
gradient is added straight into the momentum buffer (see :class:`SGD`), so the trainable
state is the weights and one buffer as large, half AdamW's.

:class:`LambdaSchedule` is ``torch.optim.lr_scheduler.LambdaLR`` for it: each group's rate is
its initial rate times its factor at the current step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.adam import _multi_tensor_adam, _single_tensor_adam


class _Optimizer:
    """``param_groups`` (each group's options over ``defaults``, its ``initial_lr`` for
    :class:`LambdaSchedule`), ``state`` by parameter, and ``torch.optim``'s state-dict
    layout; subclasses give :attr:`options` and the step."""

    options: tuple[str, ...] = ("lr", "weight_decay", "initial_lr")

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], defaults: dict) -> None:
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        self.param_groups: list[dict[str, Any]] = []
        for g in groups:
            group = {**defaults, **g, "params": list(g["params"])}
            group.setdefault("initial_lr", group["lr"])
            self.param_groups.append(group)
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s layout: state by parameter number, groups with their numbers."""
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            numbers = []
            for p in group["params"]:
                index.setdefault(id(p), len(index))
                numbers.append(index[id(p)])
            groups.append({**{k: group[k] for k in self.options}, "params": numbers})
        by_id = {id(p): p for g in self.param_groups for p in g["params"]}
        state = {
            index[i]: dict(self.state[by_id[i]])
            for i in index
            if by_id[i] in self.state  # tensors hash by identity
        }
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups) or any(
            len(a["params"]) != len(b["params"])
            for a, b in zip(saved, self.param_groups, strict=False)
        ):
            raise ValueError("optimizer state has other parameter groups than this optimizer")
        by_number: dict[int, torch.Tensor] = {}
        for mine, theirs in zip(self.param_groups, saved, strict=True):
            for p, number in zip(mine["params"], theirs["params"], strict=True):
                by_number[int(number)] = p
            for k in self.options:
                if k in theirs:
                    mine[k] = tuple(theirs[k]) if k == "betas" else theirs[k]
        self.state = {}
        for number, values in state_dict["state"].items():
            p = by_number[int(number)]
            self.state[p] = {  # copies: the state is this optimizer's own to update
                k: v.to(p.device, copy=True)
                if k != "step"
                else v.to(torch.get_default_dtype()).cpu().clone()
                for k, v in values.items()
            }


class AdamW(_Optimizer):
    """``torch.optim.AdamW(params, lr, betas, eps, weight_decay)`` (decoupled weight decay),
    with the same ``param_groups``, ``state``, ``step``, ``zero_grad``, ``state_dict`` and
    ``load_state_dict`` (the same state-dict layout)."""

    options = ("lr", "betas", "eps", "weight_decay", "initial_lr")

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params, grads, avgs, sqs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.get(p)
                if state is None:
                    state = self.state[p] = {
                        "step": torch.tensor(0.0, dtype=torch.get_default_dtype()),
                        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                    }
                params.append(p)
                grads.append(p.grad)
                avgs.append(state["exp_avg"])
                sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if not params:
                continue
            # torch.optim.AdamW's choice: the multi-tensor kernel where every tensor is on
            # a CUDA device, the single-tensor one otherwise
            kernel = (
                _multi_tensor_adam
                if all(p.is_cuda for p in params + grads)
                else _single_tensor_adam
            )
            beta1, beta2 = group["betas"]
            kernel(
                params,
                grads,
                avgs,
                sqs,
                [],
                steps,
                grad_scale=None,
                found_inf=None,
                amsgrad=False,
                has_complex=False,
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
                capturable=False,
                differentiable=False,
                decoupled_weight_decay=True,
            )


class SGD(_Optimizer):
    """``torch.optim.SGD(params, lr, momentum, weight_decay)`` (dampening 0, no Nesterov):
    ``b = momentum * b + g + weight_decay * w``, ``w -= lr * b``, with the same
    ``param_groups``, ``state`` (``momentum_buffer``) and state-dict layout.

    What it holds: one buffer per weight, and no gradient beside it. Once a weight has a
    buffer, :meth:`zero_grad` scales the buffer by ``momentum`` and hands it to autograd as
    the weight's ``.grad``: the backward passes of the step (every micro-batch's) add their
    gradients straight into it, and :meth:`step` adds the weight decay and moves the weight.
    The first step adopts the gradient autograd made as the buffer; after a step no
    weight with a buffer has a ``.grad``. The numbers are
    ``torch.optim.SGD``'s to float rounding (the gradient is summed into the scaled buffer
    rather than on its own first), as when gradients are zeroed rather than set to None: a
    weight no backward pass reached in a step still moves by its scaled buffer.
    :meth:`zero_grad` is called once before each step's backward passes (as
    :func:`da3.train.train_step` does); ``momentum=0`` keeps plain gradients.
    """

    options = ("lr", "momentum", "weight_decay", "initial_lr")

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self._handed = False  # buffers handed to autograd since the last step

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                buf = self.state.get(p, {}).get("momentum_buffer")
                if buf is not None and group["momentum"]:
                    if not self._handed:
                        buf.mul_(group["momentum"])
                    p.grad = buf
                elif p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.detach_().zero_()
        self._handed = True

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, mu, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if not mu:
                    p.add_(g.add(p, alpha=decay) if decay else g, alpha=-lr)
                    continue
                state = self.state.setdefault(p, {})
                buf = state.get("momentum_buffer")
                if buf is not None and g is buf and self._handed:
                    if decay:  # the scaled buffer holds this step's gradient already
                        buf.add_(p, alpha=decay)
                else:
                    d = g.add(p, alpha=decay) if decay else g
                    if buf is None:  # the first step: the gradient is the buffer
                        buf = state["momentum_buffer"] = d
                    else:
                        buf.mul_(mu).add_(d)
                p.add_(buf, alpha=-lr)
                p.grad = None  # the buffer is no gradient until handed again
        self._handed = False


class LambdaSchedule:
    """Each group's rate = its ``initial_lr`` x ``factors[i](step)``; :meth:`step` after each
    optimizer step (``torch.optim.lr_scheduler.LambdaLR``'s arithmetic)."""

    def __init__(self, optimizer: _Optimizer, factors: list[Callable[[int], float]]) -> None:
        if len(factors) != len(optimizer.param_groups):
            raise ValueError("one factor per parameter group")
        self.optimizer, self.factors, self.last_epoch = optimizer, factors, 0
        self._apply()

    def _apply(self) -> None:
        for group, factor in zip(self.optimizer.param_groups, self.factors, strict=True):
            group["lr"] = group["initial_lr"] * factor(self.last_epoch)

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def state_dict(self) -> dict[str, int]:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_epoch = int(state["last_epoch"])
        self._apply()
