"""WSOL classifier (stride-8 backbone + pooling head) and its two learning-rate groups."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from histo_wsl.networks.backbones import BASE, X10, Backbone, build_backbone
from histo_wsl.networks.heads import Head, build_head

__all__ = ["WSOLClassifier", "build_classifier", "unwrap", "split_params", "param_groups"]


class WSOLClassifier(nn.Module):
    """A backbone and a classification head on its last stage (the CAM layer).

    Args:
        backbone: the encoder.
        head: the head; its ``in_channels`` must equal ``backbone.out_channels``.
    """

    def __init__(self, backbone: Backbone, head: Head) -> None:
        super().__init__()
        if head.in_channels != backbone.out_channels:
            raise ValueError(
                f"head expects {head.in_channels} channels, backbone gives {backbone.out_channels}"
            )
        self.backbone = backbone
        self.head = head
        #: (lo, hi): the range of the card's CAM method's raw maps on the training images
        #: (:func:`histo_wsl.methods.cam.cam_range`), or None (none recorded, or another method)
        self.window_range: tuple[float, float] | None = None
        #: whether inputs are windows of a slide: CAMs then use :attr:`window_range` when known
        self.windowed = False

    @property
    def num_classes(self) -> int:
        """Number of classes K."""
        return self.head.num_classes

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Stage features of images ``(B, 3, H, W)``, shallow to deep (last = CAM layer)."""
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(B, K)`` of images ``(B, 3, H, W)``."""
        return self.head(self.backbone(x)[-1])

    def cams(self, x: Tensor) -> Tensor:
        """Raw class maps ``(B, K, H/8, W/8)`` of the head (not normalised)."""
        return self.head.cams(self.backbone(x)[-1])


def build_classifier(
    backbone: str, head: str, num_classes: int, pretrained: bool, **head_opts: Any
) -> WSOLClassifier:
    """Build a WSOL classifier.

    Args:
        backbone: one of :data:`~histo_wsl.networks.backbones.BACKBONES`.
        head: one of :data:`~histo_wsl.networks.heads.HEADS`.
        num_classes: number of classes K.
        pretrained: load ImageNet weights into the backbone (from the local torch hub cache only).
        **head_opts: options of the head (see :func:`~histo_wsl.networks.heads.build_head`).

    Returns:
        The classifier.

    Raises:
        InputError: unknown backbone/head/option, or missing ImageNet weights when ``pretrained``.
    """
    net = build_backbone(backbone, pretrained)
    return WSOLClassifier(net, build_head(head, net.out_channels, num_classes, **head_opts))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel``/``DataParallel`` wrapper (else ``model``)."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split a model's trainable parameters into the base-lr and the 10×-lr groups (method.md §1.4).

    ``model`` has a ``backbone`` (:class:`Backbone`) and a ``head`` attribute, and possibly other
    modules (e.g. a decoder). Backbone parameters follow the backbone's rule (``Backbone.is_x10``:
    ResNet ``layer4``; VGG everything but ``features``; Inception everything but ``Conv2d_*``/``Mixed_*``;
    MobileNetV2 ``features.14+``); head parameters are always at 10×; any other parameter goes to
    ``backbone.other_group`` (base for ResNet/MobileNetV2, 10× for VGG/Inception, as in the original code).
    Parameters with ``requires_grad=False`` (frozen) are left out of both groups.

    Args:
        model: a :class:`WSOLClassifier` or any module with ``backbone`` and ``head`` attributes
            (possibly wrapped in ``DistributedDataParallel``/``DataParallel``).

    Returns:
        ``(base_params, x10_params)``, each in ``model.named_parameters()`` order.
    """
    model = unwrap(model)
    backbone: Backbone = model.backbone  # type: ignore[assignment]
    base: list[nn.Parameter] = []
    x10: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("backbone."):
            group = X10 if backbone.is_x10(name[len("backbone.") :]) else BASE
        elif name.startswith("head."):
            group = X10
        else:
            group = backbone.other_group
        (x10 if group == X10 else base).append(param)
    return base, x10


def param_groups(model: nn.Module, lr: float, ratio: float = 10.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups: the base group at ``lr``, the other at ``ratio × lr``.

    Args:
        model: see :func:`split_params`.
        lr: base learning rate.
        ratio: learning-rate multiplier of the second group (``opt__lr_classifier_ratio``, 10).

    Returns:
        Up to two dicts ``{"params", "lr", "name"}`` (``name`` is ``"base"`` or ``"x10"``); an empty
        group is left out. Pass them to any ``torch.optim`` optimizer.
    """
    base, x10 = split_params(model)
    groups = [
        {"params": base, "lr": lr, "name": BASE},
        {"params": x10, "lr": lr * ratio, "name": X10},
    ]
    return [g for g in groups if g["params"]]
