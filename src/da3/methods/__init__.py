"""Adaptation methods, created by name. A new method is one module plus one import here."""

from da3.methods import (  # noqa: F401  (registers them)
    adapters,
    bias,
    da3,
    finetune,
    linear,
    piggyback,
    tinytl,
    udta,
)
from da3.methods.base import (
    AdaptedModel,
    FrozenBackbone,
    GateUsage,
    MethodConfig,
    build_model,
    config_help,
    get_method,
    list_methods,
    make_config,
    parse_config,
    register_method,
    with_legacy,
)

__all__ = [
    "AdaptedModel",
    "FrozenBackbone",
    "GateUsage",
    "MethodConfig",
    "build_model",
    "config_help",
    "get_method",
    "list_methods",
    "make_config",
    "parse_config",
    "register_method",
    "with_legacy",
]
