"""The parts of the ResNet and InceptionV3 backbones that come from torchvision's own modules.

:mod:`histo_wsl.networks.backbones` imports this module only when one of these backbones is
built: importing torchvision costs a process about 1.7 s and 150 MB (it imports
``torch._dynamo``), which the default MobileNetV2 models do not need
(:mod:`histo_wsl.networks.mobilenetv2`). The stride changes are described in the backbones'
table (:mod:`histo_wsl.networks.backbones`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torchvision import models as tvm
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC
from torchvision.models.resnet import Bottleneck

__all__ = ["inception_stride8", "resnet_stride8"]


def resnet_stride8(name: str) -> tvm.ResNet:
    """The ResNet50 (``name == "resnet50"``) or ResNet18, layer3 and layer4 at stride 1."""
    net = (tvm.resnet50 if name == "resnet50" else tvm.resnet18)(weights=None)
    for layer in (net.layer3, net.layer4):
        first = layer[0]
        conv = first.conv2 if isinstance(first, Bottleneck) else first.conv1
        conv.stride = (1, 1)
        if first.downsample is not None:
            first.downsample[0].stride = (1, 1)
        first.stride = 1
    return net


class _InceptionBStride1(InceptionB):
    """Inception "B" (grid reduction) block run at stride 1: 3×3 convs and max-pool with padding 1."""

    def __init__(self, in_channels: int) -> None:
        super().__init__(in_channels)
        for block in (self.branch3x3, self.branch3x3dbl_3):
            block.conv.stride = (1, 1)
            block.conv.padding = (1, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Concatenate the 3×3, double-3×3 and max-pool branches (all at the input's size)."""
        b1 = self.branch3x3(x)
        b2 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        b3 = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([b1, b2, b3], 1)


def inception_stride8() -> dict[str, nn.Module]:
    """InceptionV3's modules up to ``Mixed_6e`` by torchvision's names, in order, at stride 8."""
    return {
        "Conv2d_1a_3x3": BasicConv2d(3, 32, kernel_size=3, stride=2, padding=1),
        "Conv2d_2a_3x3": BasicConv2d(32, 32, kernel_size=3, padding=1),
        "Conv2d_2b_3x3": BasicConv2d(32, 64, kernel_size=3, padding=1),
        "maxpool1": nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        "Conv2d_3b_1x1": BasicConv2d(64, 80, kernel_size=1),
        "Conv2d_4a_3x3": BasicConv2d(80, 192, kernel_size=3, padding=1),
        "maxpool2": nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        "Mixed_5b": InceptionA(192, pool_features=32),
        "Mixed_5c": InceptionA(256, pool_features=64),
        "Mixed_5d": InceptionA(288, pool_features=64),
        "Mixed_6a": _InceptionBStride1(288),
        "Mixed_6b": InceptionC(768, channels_7x7=128),
        "Mixed_6c": InceptionC(768, channels_7x7=160),
        "Mixed_6d": InceptionC(768, channels_7x7=160),
        "Mixed_6e": InceptionC(768, channels_7x7=192),
    }
