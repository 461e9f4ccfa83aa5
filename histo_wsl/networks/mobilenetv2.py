"""MobileNetV2's feature extractor with torchvision's layout, built without importing torchvision.

``import torchvision`` imports every model and op it ships, and one of those imports
``torch._dynamo``: on a 2-core CPU that is 1.7 s and about 150 MB of a ``histo-wsl localize``
process that needs one small network (docs/results.md, *Start-up*). This module builds the same
``features`` as ``torchvision.models.mobilenet_v2().features`` — the same modules, parameter and
buffer names and shapes (so torchvision's ImageNet file and every checkpoint load unchanged), the
same forward, and for a given seed the same initial weights and the same random-number stream
afterwards (``tests/networks/test_mobilenetv2.py`` checks all four against torchvision itself).
Training code that does import torchvision (its transforms, the other backbones) still can.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["CHANNELS", "InvertedResidual", "conv_bn_relu6", "mobilenet_v2_features"]

#: Blocks of the network as ``(expansion t, output channels c, repeats n, first stride s)``.
BLOCKS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
#: Channels of the stem and of the final 1×1 convolution.
CHANNELS = (32, 1280)
#: The ImageNet classifier's size, whose initial draws :func:`mobilenet_v2_features` repeats.
_CLASSIFIER = (1280, 1000)


def conv_bn_relu6(
    cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """``Conv2d`` (no bias, "same" padding) → ``BatchNorm2d`` → ``ReLU6``: indices 0, 1, 2."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1×1 expansion (unless ``expand`` is 1) → 3×3 depthwise → 1×1 linear projection.

    The input is added back when the block keeps the stride at 1 and the channels unchanged.
    Attributes as torchvision's: ``stride``, ``use_res_connect``, ``out_channels`` and ``conv``
    (the ``Sequential`` whose depthwise convolution is ``conv[-3][0]``).
    """

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, not {stride}")
        self.stride = stride
        self.use_res_connect = stride == 1 and cin == cout
        hidden = int(round(cin * expand))
        layers: list[nn.Module] = [] if expand == 1 else [conv_bn_relu6(cin, hidden, kernel=1)]
        layers += [
            conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = cout

    def forward(self, x: Tensor) -> Tensor:
        """The block's output, with the input added back when the shapes allow it."""
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def mobilenet_v2_features() -> nn.Sequential:
    """The 19 modules of ``torchvision.models.mobilenet_v2(weights=None).features`` (width 1.0).

    Initialised as torchvision initialises the whole network: convolutions Kaiming-normal
    (fan-out), BatchNorm weights 1 and biases 0. torchvision also creates and initialises a
    1280 → 1000 classifier; its draws are made here too and thrown away, so a seeded run builds
    the same weights, and whatever is created next (a head, a decoder) the same ones too.
    """
    cin, last = CHANNELS
    layers: list[nn.Module] = [conv_bn_relu6(3, cin, stride=2)]
    for t, c, n, s in BLOCKS:
        for i in range(n):
            layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    layers.append(conv_bn_relu6(cin, last, kernel=1))
    features = nn.Sequential(*layers)
    classifier = nn.Linear(*_CLASSIFIER)  # its constructor's draws, as torchvision's
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.normal_(classifier.weight, 0, 0.01)  # its initialisation's draws
    return features
