"""``linear``: only a new head trains on the frozen features."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from da3.backbones import Backbone
from da3.methods.base import (
    AdaptedModel,
    CacheableFeatures,
    FrozenBackbone,
    MethodConfig,
    new_head,
    register_method,
)


@dataclass
class LinearConfig(MethodConfig):
    lr: float = field(default=3e-3, metadata={"help": "learning rate"})


class PooledFeatures(CacheableFeatures):
    """The frozen backbone's pooled features, as one tap (so they can be cached)."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    @torch.no_grad()
    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.backbone.forward_features(x)]

    def from_taps(self, taps: list[torch.Tensor]) -> torch.Tensor:
        return taps[0]


@register_method("linear", LinearConfig, "only the head trains (frozen feature extractor)")
def build(frozen: FrozenBackbone, num_classes: int, config: LinearConfig) -> AdaptedModel:
    return AdaptedModel(
        PooledFeatures(frozen.lean), new_head(frozen.feature_dim, num_classes), frozen, "linear"
    )
