"""torchvision's ResNet and MobileNetV2, seen through the uniform block view.

The view reuses torchvision's own modules (so its weights enums and state dicts load
natively); only the order in which they are called is written out, block by block.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import mobilenetv2, resnet

from da3.backbones.base import Backbone, Block, Preprocess


def resnet_to_backbone(
    net: resnet.ResNet, *, name: str, preprocess: Preprocess, weights: str
) -> Backbone:
    blocks: list[Block] = []
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        for b in layer:
            if isinstance(b, resnet.Bottleneck):
                branch = nn.Sequential(
                    b.conv1, b.bn1, nn.ReLU(), b.conv2, b.bn2, nn.ReLU(), b.conv3, b.bn3
                )
                family, cin, cout, stride = (
                    "bottleneck",
                    b.conv1.in_channels,
                    b.conv3.out_channels,
                    b.conv2.stride[0],
                )
            else:
                branch = nn.Sequential(b.conv1, b.bn1, nn.ReLU(), b.conv2, b.bn2)
                family, cin, cout, stride = (
                    "basic",
                    b.conv1.in_channels,
                    b.conv2.out_channels,
                    b.conv1.stride[0],
                )
            shortcut = b.downsample if b.downsample is not None else nn.Identity()
            blocks.append(
                Block(
                    branch,
                    shortcut,
                    nn.ReLU(),
                    in_channels=cin,
                    out_channels=cout,
                    stride=stride,
                    family=family,
                )
            )
    return Backbone(
        name=name,
        stem=nn.Sequential(net.conv1, net.bn1, nn.ReLU(), net.maxpool),
        blocks=blocks,
        neck=nn.Identity(),
        pool=net.avgpool,
        classifier=net.fc,
        feature_dim=net.fc.in_features,
        preprocess=preprocess,
        weights=weights,
    )


def mobilenet_v2_to_backbone(
    net: mobilenetv2.MobileNetV2, *, preprocess: Preprocess, weights: str
) -> Backbone:
    features = list(net.features)
    blocks = []
    for b in features[1:-1]:
        assert isinstance(b, mobilenetv2.InvertedResidual)
        first, last = b.conv[0][0], b.conv[-2]
        blocks.append(
            Block(
                b.conv,
                nn.Identity() if b.use_res_connect else None,
                nn.Identity(),
                in_channels=first.in_channels,
                out_channels=last.out_channels,
                stride=b.stride,
                family="inverted_residual",
            )
        )
    return Backbone(
        name="mobilenet_v2",
        stem=features[0],
        blocks=blocks,
        neck=features[-1],
        pool=nn.AdaptiveAvgPool2d(1),
        classifier=net.classifier[-1],
        feature_dim=net.last_channel,
        preprocess=preprocess,
        weights=weights,
    )
