"""Classification networks for weakly-supervised localization (WSOL).

* :mod:`~histo_wsl.networks.backbones` — ResNet50/18, VGG16, InceptionV3 and MobileNetV2 encoders with an
  output stride of 8 (a 28×28 CAM layer at 224×224 input), returning every decoder stage.
* :mod:`~histo_wsl.networks.heads` — pooling heads (WGAP, GAP, max, LSE, WILDCAT, Deep-MIL) that give
  class logits and raw class activation maps.
* :mod:`~histo_wsl.networks.classifier` — backbone + head, and the two learning-rate groups.
* :mod:`~histo_wsl.networks.cams` — CAM and the Grad-CAM family, min-max normalised to [0, 1].

Unlike the rest of the package this one imports ``torch`` when it is imported; the CLI imports it lazily.
"""

from histo_wsl.networks.backbones import BACKBONES, Backbone, build_backbone, weights_path
from histo_wsl.networks.cams import CAM_METHODS, compute_cams, normalize_cams
from histo_wsl.networks.classifier import (
    WSOLClassifier,
    build_classifier,
    param_groups,
    split_params,
)
from histo_wsl.networks.heads import HEADS, build_head

__all__ = [
    "BACKBONES",
    "CAM_METHODS",
    "HEADS",
    "Backbone",
    "WSOLClassifier",
    "build_backbone",
    "build_classifier",
    "build_head",
    "compute_cams",
    "normalize_cams",
    "param_groups",
    "split_params",
    "weights_path",
]
