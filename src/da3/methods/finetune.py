"""``finetune``: every weight trains, on stock PyTorch modules. The reference for cost."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from da3.methods.base import (
    AdaptedModel,
    BackboneFeatures,
    FrozenBackbone,
    MethodConfig,
    new_head,
    register_method,
)


@dataclass
class FinetuneConfig(MethodConfig):
    lr: float = field(default=1e-4, metadata={"help": "learning rate of the backbone"})
    # A new, randomly initialised head needs a larger rate than the pretrained weights; at
    # 1e-4 it barely trains in the few epochs of the benchmark protocol.
    head_lr: float = field(default=3e-3, metadata={"help": "learning rate of the new head"})


@register_method(
    "finetune", FinetuneConfig, "all weights train (stock modules)", frozen_form="stock"
)
def build(frozen: FrozenBackbone, num_classes: int, config: FinetuneConfig) -> AdaptedModel:
    backbone = frozen.trainable_copy().requires_grad_(True)
    backbone.classifier = nn.Identity()  # the ImageNet head is not used
    return AdaptedModel(
        BackboneFeatures(backbone), new_head(frozen.feature_dim, num_classes), frozen, "finetune"
    )
