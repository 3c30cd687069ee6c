"""``bias``: TinyTL-B. The biases of the frozen network and the head train.

On the lean engine each convolution has its batch norm folded in; the folded bias differs
from the batch norm's shift by a constant, so training it is training the batch norm bias.
Its gradient needs nothing kept: the whole backbone is on the gradient path, yet only the
ReLU masks are stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from da3.lean import LeanConv2d, share_clone
from da3.methods.base import (
    AdaptedModel,
    BackboneFeatures,
    FrozenBackbone,
    MethodConfig,
    new_head,
    register_method,
)


@dataclass
class BiasConfig(MethodConfig):
    lr: float = field(default=3e-3, metadata={"help": "learning rate"})


def train_biases(backbone: nn.Module) -> nn.Module:
    """Give every lean convolution of a (share-cloned) backbone its own trainable bias."""
    for m in backbone.modules():
        if isinstance(m, LeanConv2d):
            m.bias = nn.Parameter(m.bias.detach().clone())  # the domain's own copy
    return backbone


@register_method("bias", BiasConfig, "biases + head train (TinyTL-B), lean engine")
def build(frozen: FrozenBackbone, num_classes: int, config: BiasConfig) -> AdaptedModel:
    backbone = train_biases(share_clone(frozen.lean))
    return AdaptedModel(
        BackboneFeatures(backbone), new_head(frozen.feature_dim, num_classes), frozen, "bias"
    )
