"""Training: one step (shared with the profiler), and the loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from da3.methods.base import AdaptedModel, MethodConfig


def make_optimizer(model: AdaptedModel, config: MethodConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        model.trainable_parameters(), lr=config.lr, weight_decay=config.weight_decay
    )


def train_step(
    model: AdaptedModel, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Forward, backward, optimizer step on one batch; returns the logits (detached)."""
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    aux = model.auxiliary_loss()
    if aux is not None:
        loss = loss + aux
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return logits.detach()
