"""Encoders with an output stride of 8, as used for weakly-supervised localization.

Every backbone is the "large feature map" variant of the WSOL literature: at 224×224 input its last
feature map (the CAM layer) is 28×28. :meth:`Backbone.forward` returns the feature map of every stage a
U-Net style decoder needs, shallow to deep; the last one is the CAM layer. The full-resolution stage 0
(the input image itself, ``3@224``) is *not* returned: a decoder that wants it has the image already.

=========== ======================================================= ========================================
name        change to the torchvision network                        stages at 224×224 (channels@side)
=========== ======================================================= ========================================
resnet50    layer3 and layer4 with stride 1 (no dilation)            64@112, 256@56, 512@28, 1024@28, 2048@28
resnet18    same as resnet50                                         64@112, 64@56, 128@28, 256@28, 512@28
vgg16       max-pools 4 and 5 removed; conv6 3×3 512→1024 + ReLU     64@224, 128@112, 256@56, 1024@28
inceptionv3 truncated after Mixed_6e; Mixed_6a at stride 1; paddings 64@112, 80@56, 288@28, 768@28, 1024@28
            so that 224 → 112 → 56 → 28; two SPG-style blocks
            (Dropout 0.5, conv 3×3 → 1024, ReLU)
mobilenetv2 inverted-residual blocks that would go below stride 8 get 16@112, 24@56, 32@28, 96@28, 1280@28
            stride 1 (no dilation); features up to the final 1×1 conv
tinycnn     not torchvision: four conv-GroupNorm-ReLU stages, no    16@112, 32@56, 64@28, 128@28
            ImageNet weights (from scratch only); CPU demos, tests
=========== ======================================================= ========================================

The ResNet stage ``64@112`` is taken after the stem's ReLU, before its max-pool. MobileNetV2's CAM layer is
the 1280-channel output of the final 1×1 conv (rather than the 320-channel last block), so that CAMs come
from the widest, most class-specific features, as for the other backbones.

ImageNet weights come from torchvision's weight files (``IMAGENET1K_V1``) but are never downloaded here:
the file must already be in ``torch.hub.get_dir()/checkpoints/`` (set ``TORCH_HOME`` to move that folder).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from histo_wsl.errors import InputError
from histo_wsl.networks.mobilenetv2 import InvertedResidual, mobilenet_v2_features

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

__all__ = ["BACKBONES", "NO_IMAGENET", "BASE", "X10", "weights_path", "Backbone", "build_backbone"]

BACKBONES = ("resnet50", "resnet18", "vgg16", "inceptionv3", "mobilenetv2", "tinycnn")

#: Backbones without ImageNet weights (trained from scratch only).
NO_IMAGENET = ("tinycnn",)

#: Names of the two learning-rate groups (method.md §1.4): the base lr, and 10× the base lr.
BASE = "base"
X10 = "x10"


def _imagenet_weights(name: str) -> WeightsEnum:
    if _check_name(name) in NO_IMAGENET:
        raise InputError(f"{name} has no ImageNet weights: train it with --no-pretrained")
    from torchvision import models as tvm  # its weight files' names and URLs

    table = {
        "resnet50": tvm.ResNet50_Weights.IMAGENET1K_V1,
        "resnet18": tvm.ResNet18_Weights.IMAGENET1K_V1,
        "vgg16": tvm.VGG16_Weights.IMAGENET1K_V1,
        "inceptionv3": tvm.Inception_V3_Weights.IMAGENET1K_V1,
        "mobilenetv2": tvm.MobileNet_V2_Weights.IMAGENET1K_V1,
    }
    return table[_check_name(name)]


def _check_name(name: str) -> str:
    if name not in BACKBONES:
        raise InputError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return name


def weights_path(name: str) -> Path:
    """Where the ImageNet weight file of a backbone is expected (torchvision's hub cache).

    Args:
        name: one of :data:`BACKBONES`.

    Returns:
        ``torch.hub.get_dir()/checkpoints/<file name of the torchvision weights URL>``; it follows
        ``TORCH_HOME`` at call time.

    Raises:
        InputError: unknown backbone name.
    """
    url = _imagenet_weights(name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


class Backbone(nn.Module):
    """Base class of the encoders: ``forward(x)`` returns the list of stage features, shallow to deep.

    Attributes:
        name: backbone name, one of :data:`BACKBONES`.
        stage_channels: channels of each returned stage.
        stage_strides: stride (input side / stage side) of each returned stage; the last is 8.
        other_group: learning-rate group (``"base"`` or ``"x10"``) of the parameters of a model that are
            neither in the backbone nor in the classification head, e.g. a decoder (method.md §1.4).
    """

    name: str = ""
    stage_channels: list[int]
    stage_strides: list[int]
    other_group: str = BASE
    #: width of a U-Net decoder built on this backbone, relative to the paper's channel plan
    decoder_width: float = 1.0
    #: normalisation layers of the backbone, which a decoder built on it uses too
    norm: str = "batch"
    #: parameter/buffer name prefixes of layers that are not in the ImageNet checkpoint
    new_layer_prefixes: tuple[str, ...] = ()

    @property
    def out_channels(self) -> int:
        """Channels of the last stage (the CAM layer)."""
        return self.stage_channels[-1]

    def forward(self, x: Tensor) -> list[Tensor]:  # pragma: no cover - abstract
        """Stage features of a batch of images ``(B, 3, H, W)``, shallow to deep."""
        raise NotImplementedError

    def is_x10(self, param_name: str) -> bool:  # pragma: no cover - abstract
        """Whether a backbone parameter (name relative to the backbone) is trained at 10× the lr."""
        raise NotImplementedError

    def lr10_parameter_names(self) -> set[str]:
        """Names (relative to the backbone) of the parameters trained at 10× the base learning rate."""
        return {n for n, _ in self.named_parameters() if self.is_x10(n)}

    def map_pretrained_keys(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Rename the keys of a torchvision ImageNet state dict to this backbone's names.

        Keys the backbone does not have (classifier, dropped blocks) may be left in; they are ignored.
        """
        return dict(state)

    def load_imagenet(self) -> None:
        """Load the torchvision ImageNet weights from the local hub cache; never downloads.

        Raises:
            InputError: the weight file is absent, unreadable, or does not fit this backbone.
        """
        url = _imagenet_weights(self.name).url
        path = weights_path(self.name)
        if not path.is_file():
            raise InputError(
                f"ImageNet weights for {self.name} not found: download {url} into {path.parent} "
                "(or set TORCH_HOME to a folder whose hub/checkpoints/ holds the file), "
                "or train from scratch with --no-pretrained",
                path,
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # any failure means an unusable file
            raise InputError(
                f"cannot read the ImageNet weights ({type(exc).__name__}: {exc}); "
                f"delete the file and download it again from {url}",
                path,
            ) from exc
        if not isinstance(state, dict):
            raise InputError(f"not a state dict; download it again from {url}", path)
        own = self.state_dict()
        mapped = {k: v for k, v in self.map_pretrained_keys(state).items() if k in own}
        bad = sorted(k for k, v in mapped.items() if tuple(v.shape) != tuple(own[k].shape))
        missing = sorted(
            k
            for k in own
            if k not in mapped
            and not k.endswith("num_batches_tracked")
            and not k.startswith(self.new_layer_prefixes)
        )
        if bad or missing:
            detail = f"wrong shapes for {bad[:3]}" if bad else f"missing {missing[:3]}"
            raise InputError(
                f"the file does not hold ImageNet weights for {self.name} ({detail}, "
                f"{len(bad) + len(missing)} tensors in all); download it again from {url}",
                path,
            )
        self.load_state_dict(mapped, strict=False)


def _kaiming_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _ResNetBackbone(Backbone):
    """ResNet50/18 with layer3 and layer4 at stride 1 (no dilation).

    Learning-rate groups: ``layer4`` at 10× (with the head), everything else at the base lr; other modules
    of the model (decoder) at the base lr.
    """

    other_group = BASE

    def __init__(self, name: str) -> None:
        super().__init__()
        from histo_wsl.networks.torchvision_parts import resnet_stride8

        net = resnet_stride8(name)
        self.name = name
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        expansion = 4 if name == "resnet50" else 1
        self.stage_channels = [64] + [c * expansion for c in (64, 128, 256, 512)]
        self.stage_strides = [2, 4, 8, 8, 8]

    def forward(self, x: Tensor) -> list[Tensor]:
        """Stage features: stem (after ReLU), layer1, layer2, layer3, layer4."""
        s0 = self.relu(self.bn1(self.conv1(x)))
        s1 = self.layer1(self.maxpool(s0))
        s2 = self.layer2(s1)
        s3 = self.layer3(s2)
        s4 = self.layer4(s3)
        return [s0, s1, s2, s3, s4]

    def is_x10(self, param_name: str) -> bool:
        """``layer4.*`` is trained at 10× the lr."""
        return param_name.startswith("layer4.")


# torchvision's VGG16 conv configuration with max-pools 4 and 5 removed ("M" = 2×2 max-pool).
_VGG_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M") + (512,) * 6
_VGG_CUTS = (4, 9, 16)  # features[:4] -> 64@224, [4:9] -> 128@112, [9:16] -> 256@56
_VGG_POOL4 = 23  # index of the removed 4th max-pool in torchvision's vgg16().features


class _VGGBackbone(Backbone):
    """VGG16 without max-pools 4 and 5, plus ``conv6`` (3×3, 512→1024) + ReLU.

    Learning-rate groups: ``features.*`` at the base lr; ``conv6``, the head and any other module of the
    model (decoder) at 10×.
    """

    other_group = X10
    new_layer_prefixes = ("conv6.",)

    def __init__(self) -> None:
        super().__init__()
        self.name = "vgg16"
        layers: list[nn.Module] = []
        cin = 3
        for v in _VGG_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(cin, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.conv6 = nn.Conv2d(512, 1024, kernel_size=3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        _kaiming_init(self)
        self.stage_channels = [64, 128, 256, 1024]
        self.stage_strides = [1, 2, 4, 8]

    def forward(self, x: Tensor) -> list[Tensor]:
        """Stage features: before pools 1, 2, 3, and after conv6."""
        stages = []
        start = 0
        for cut in _VGG_CUTS:
            x = self.features[start:cut](x)
            stages.append(x)
            start = cut
        x = self.features[start:](x)
        stages.append(self.relu(self.conv6(x)))
        return stages

    def is_x10(self, param_name: str) -> bool:
        """Everything but ``features.*`` is trained at 10× the lr."""
        return not param_name.startswith("features.")

    def map_pretrained_keys(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Shift torchvision's ``features.N`` indices past the removed 4th max-pool down by one."""
        out = {}
        for key, value in state.items():
            parts = key.split(".")
            if parts[0] == "features" and len(parts) > 2 and parts[1].isdigit():
                idx = int(parts[1])
                if idx > _VGG_POOL4:
                    parts[1] = str(idx - 1)
                out[".".join(parts)] = value
            else:
                out[key] = value
        return out


def _spg_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Dropout(0.5), nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.ReLU(inplace=True)
    )


class _InceptionBackbone(Backbone):
    """InceptionV3 up to Mixed_6e, output stride 8, plus two SPG-style 3×3 1024-channel convs.

    Paddings: ``Conv2d_1a_3x3``, ``Conv2d_2a_3x3``, ``Conv2d_4a_3x3`` and both stem max-pools use padding 1,
    so a 224 input gives 112 → 56 → 28 (any multiple of 8 gives exactly side/8). ``Mixed_6a`` runs at stride
    1 with its 3×3 convs padded by 1. Mixed_7* and the auxiliary classifier are dropped. Inputs are the
    ImageNet mean/std normalised images (torchvision's ``transform_input`` is not applied). The
    modules up to ``Mixed_6e`` come from :func:`~histo_wsl.networks.torchvision_parts.inception_stride8`.

    Learning-rate groups: ``Conv2d_*`` and ``Mixed_*`` at the base lr; ``SPG_*``, the head and any other
    module of the model (decoder) at 10×.
    """

    other_group = X10
    new_layer_prefixes = ("SPG_",)

    def __init__(self) -> None:
        super().__init__()
        self.name = "inceptionv3"
        from histo_wsl.networks.torchvision_parts import inception_stride8

        for name, module in inception_stride8().items():
            setattr(self, name, module)
        self.SPG_A3_1b = _spg_block(768, 1024)
        self.SPG_A3_2b = _spg_block(1024, 1024)
        _kaiming_init(self)
        self.stage_channels = [64, 80, 288, 768, 1024]
        self.stage_strides = [2, 4, 8, 8, 8]

    def forward(self, x: Tensor) -> list[Tensor]:
        """Stage features: Conv2d_2b, Conv2d_3b, Mixed_5d, Mixed_6e, SPG_A3_2b."""
        s0 = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        s1 = self.Conv2d_3b_1x1(self.maxpool1(s0))
        x = self.maxpool2(self.Conv2d_4a_3x3(s1))
        s2 = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(s2)
        s3 = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        s4 = self.SPG_A3_2b(self.SPG_A3_1b(s3))
        return [s0, s1, s2, s3, s4]

    def is_x10(self, param_name: str) -> bool:
        """Everything but ``Conv2d_*`` and ``Mixed_*`` is trained at 10× the lr."""
        return not param_name.startswith(("Conv2d_", "Mixed_"))


_MOBILENET_CUTS = (
    2,
    4,
    7,
    14,
)  # features[:2] -> 16, [2:4] -> 24, [4:7] -> 32, [7:14] -> 96, rest 1280
_MOBILENET_X10_FROM = 14  # blocks at stride 32 in the original network (160, 320, final 1×1 conv)


class _MobileNetV2Backbone(Backbone):
    """MobileNetV2 features (up to the final 1×1 conv, 1280 channels) with output stride 8.

    Every inverted-residual block that would take the stride below 8 (blocks 7 and 14) gets stride 1 on
    its depthwise conv; no dilation is used (the same choice as for the ResNets). Built by
    :func:`~histo_wsl.networks.mobilenetv2.mobilenet_v2_features`: torchvision's layout and
    weights, without importing torchvision.

    Learning-rate groups (the analogue of ResNet's layer4): ``features.14`` to ``features.18`` — the blocks
    that run at stride 32 in the original network (160 and 320 channels, and the final 1×1 conv) — at 10×
    with the head; ``features.0`` to ``features.13`` at the base lr; other modules (decoder) at the base lr.
    """

    other_group = BASE

    def __init__(self) -> None:
        super().__init__()
        self.name = "mobilenetv2"
        features = mobilenet_v2_features()
        stride = 1
        for block in features:
            if isinstance(block, InvertedResidual):
                depthwise = block.conv[-3][0]  # Conv2dNormActivation(depthwise) -> its Conv2d
                if depthwise.stride == (2, 2):
                    if stride >= 8:
                        depthwise.stride = (1, 1)
                        block.stride = 1
                    else:
                        stride *= 2
            else:
                stride *= block[0].stride[0]
        self.features = features
        self.stage_channels = [16, 24, 32, 96, 1280]
        self.stage_strides = [2, 4, 8, 8, 8]

    def forward(self, x: Tensor) -> list[Tensor]:
        """Stage features after blocks 1, 3, 6, 13 and the final 1×1 conv."""
        stages = []
        start = 0
        for cut in _MOBILENET_CUTS:
            x = self.features[start:cut](x)
            stages.append(x)
            start = cut
        stages.append(self.features[start:](x))
        return stages

    def is_x10(self, param_name: str) -> bool:
        """``features.14`` and later are trained at 10× the lr."""
        parts = param_name.split(".")
        return parts[0] == "features" and int(parts[1]) >= _MOBILENET_X10_FROM


def _tiny_stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(8, cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.GroupNorm(8, cout),
        nn.ReLU(inplace=True),
    )


class _TinyCNNBackbone(Backbone):
    """A small stride-8 CNN (about 0.3 M parameters) for CPU demos and tests; no ImageNet weights.

    Four stages of two 3×3 conv-GroupNorm-ReLU each; the first conv of stages 1-3 has stride 2.
    GroupNorm (here and in a decoder built on it, :attr:`norm`) keeps no running statistics, so the
    short runs it is made for (a few dozen steps) evaluate as they train, which BatchNorm's running
    averages would not after so few steps. A decoder built on it uses a quarter of the paper's
    channel plan (:attr:`decoder_width`). Learning-rate groups: ``stage4`` at 10× (with the head), the
    rest and any decoder at the base lr.
    """

    other_group = BASE
    decoder_width = 0.25
    norm = "group"

    def __init__(self) -> None:
        super().__init__()
        self.name = "tinycnn"
        self.stage1 = _tiny_stage(3, 16, 2)
        self.stage2 = _tiny_stage(16, 32, 2)
        self.stage3 = _tiny_stage(32, 64, 2)
        self.stage4 = _tiny_stage(64, 128, 1)
        _kaiming_init(self)
        self.stage_channels = [16, 32, 64, 128]
        self.stage_strides = [2, 4, 8, 8]

    def forward(self, x: Tensor) -> list[Tensor]:
        """Stage features: 16@/2, 32@/4, 64@/8, 128@/8."""
        s1 = self.stage1(x)
        s2 = self.stage2(s1)
        s3 = self.stage3(s2)
        return [s1, s2, s3, self.stage4(s3)]

    def is_x10(self, param_name: str) -> bool:
        """``stage4.*`` is trained at 10× the lr."""
        return param_name.startswith("stage4.")


def build_backbone(name: str, pretrained: bool) -> Backbone:
    """Build a stride-8 encoder, optionally with ImageNet weights from the local torch hub cache.

    Args:
        name: one of :data:`BACKBONES`.
        pretrained: load torchvision's ``IMAGENET1K_V1`` weights (layers that are new — VGG ``conv6``,
            Inception ``SPG_*`` — keep their random init). Nothing is downloaded.

    Returns:
        The backbone; ``forward(x)`` returns the stage features, shallow to deep.

    Raises:
        InputError: unknown name, or ``pretrained`` and the weight file is absent or unusable (the message
            names the expected path, where to get the file, and ``--no-pretrained``).
    """
    _check_name(name)
    if name in ("resnet50", "resnet18"):
        backbone: Backbone = _ResNetBackbone(name)
    elif name == "vgg16":
        backbone = _VGGBackbone()
    elif name == "inceptionv3":
        backbone = _InceptionBackbone()
    elif name == "tinycnn":
        backbone = _TinyCNNBackbone()
    else:
        backbone = _MobileNetV2Backbone()
    if pretrained:
        backbone.load_imagenet()
    return backbone
