"""``linear``: only a new head trains on the frozen features."""

from __future__ import annotations

from dataclasses import dataclass, field

from da3.methods.base import AdaptedModel, FrozenBackbone, MethodConfig, new_head, register_method
from da3.methods.finetune import _Features


@dataclass
class LinearConfig(MethodConfig):
    lr: float = field(default=3e-3, metadata={"help": "AdamW learning rate"})


@register_method("linear", LinearConfig, "only the head trains (frozen feature extractor)")
def build(frozen: FrozenBackbone, num_classes: int, config: LinearConfig) -> AdaptedModel:
    return AdaptedModel(
        _Features(frozen.lean), new_head(frozen.feature_dim, num_classes), frozen, "linear"
    )
