"""AdamW and the learning-rate schedule, without ``torch.optim``'s import cost.

Every ``torch.optim.Optimizer`` imports ``torch._dynamo`` when it is built and when it
steps (the compiler's hooks). On the CUDA build of torch 2.14 that import alone adds about
155 MiB of resident memory to the process, more than everything else a DA3 run holds
above the runtime. :class:`AdamW` here keeps ``torch.optim.AdamW``'s update, calling torch's
own Adam kernels (the single-tensor one, as torch does for CPU tensors; the multi-tensor one
for CUDA tensors), so the numbers are the same, bit for bit; what it leaves out is the
compiler integration, sparse and complex gradients, ``amsgrad`` and ``fused``.

:class:`LambdaSchedule` is ``torch.optim.lr_scheduler.LambdaLR`` for it: each group's rate is
its initial rate times its factor at the current step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.adam import _multi_tensor_adam, _single_tensor_adam

GroupOptions = ("lr", "betas", "eps", "weight_decay", "initial_lr")


class AdamW:
    """``torch.optim.AdamW(params, lr, betas, eps, weight_decay)`` (decoupled weight decay),
    with the same ``param_groups``, ``state``, ``step``, ``zero_grad``, ``state_dict`` and
    ``load_state_dict`` (the same state-dict layout)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
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

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s layout: state by parameter number, groups with their numbers."""
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            numbers = []
            for p in group["params"]:
                index.setdefault(id(p), len(index))
                numbers.append(index[id(p)])
            groups.append({**{k: group[k] for k in GroupOptions}, "params": numbers})
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
            for k in GroupOptions:
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


class LambdaSchedule:
    """Each group's rate = its ``initial_lr`` x ``factors[i](step)``; :meth:`step` after each
    optimizer step (``torch.optim.lr_scheduler.LambdaLR``'s arithmetic)."""

    def __init__(self, optimizer: AdamW, factors: list[Callable[[int], float]]) -> None:
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
