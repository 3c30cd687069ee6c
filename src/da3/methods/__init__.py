"""Adaptation methods, created by name. A new method is one module plus one import here."""

from da3.methods import bias, da3, finetune, linear, tinytl, udta  # noqa: F401  (registers them)
from da3.methods.base import (
    AdaptedModel,
    FrozenBackbone,
    MethodConfig,
    build_model,
    config_help,
    get_method,
    list_methods,
    make_config,
    parse_config,
    register_method,
)

__all__ = [
    "AdaptedModel",
    "FrozenBackbone",
    "MethodConfig",
    "build_model",
    "config_help",
    "get_method",
    "list_methods",
    "make_config",
    "parse_config",
    "register_method",
]
