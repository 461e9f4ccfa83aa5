"""The nn.Modules: backbones, pooling heads, classifiers, CAMs, NEGEV and Max-Min networks.

* :mod:`~histo_wsl.networks.backbones` — Encoders with an output stride of 8, as used for
  weakly-supervised localization.
* :mod:`~histo_wsl.networks.cams` — Class activation maps: CAM and the Grad-CAM family, per-image
  min-max normalised to [0, 1].
* :mod:`~histo_wsl.networks.classifier` — WSOL classifier (stride-8 backbone + pooling head) and its
  two learning-rate groups.
* :mod:`~histo_wsl.networks.folding` — The inference form of a trained network: BatchNorm folded
  into its convolution, channels-last.
* :mod:`~histo_wsl.networks.heads` — Classification heads on the CAM layer: class logits and raw
  class activation maps.
* :mod:`~histo_wsl.networks.knn` — k-NN refinement of a model's map: each pixel takes the model's
  map of its look-alike pixels.
* :mod:`~histo_wsl.networks.maxmin` — The Max-Min uncertainty network (Belharbi et al., IEEE TMI
  2022; method.md §2.1).
* :mod:`~histo_wsl.networks.negev` — The NEGEV model (MIDL 2022): a frozen stage-1 classifier with a
  U-Net decoder on its encoder.
* :mod:`~histo_wsl.networks.tta` — Test-time augmentation by flips: the views, and maps averaged
  over them.

The names below are imported from their module on first use, so importing the package is free.
"""

from histo_wsl.runtime.lazy import lazy_exports

#: public name → the module of this package that defines it
_EXPORTS = {
    "Backbone": "backbones",
    "BACKBONES": "backbones",
    "BASE": "backbones",
    "build_backbone": "backbones",
    "NO_IMAGENET": "backbones",
    "weights_path": "backbones",
    "X10": "backbones",
    "CAM_METHODS": "cams",
    "compute_cams": "cams",
    "normalize_cams": "cams",
    "build_classifier": "classifier",
    "param_groups": "classifier",
    "split_params": "classifier",
    "unwrap": "classifier",
    "WSOLClassifier": "classifier",
    "fold_batchnorm": "folding",
    "for_inference": "folding",
    "build_head": "heads",
    "GAPHead": "heads",
    "Head": "heads",
    "HEADS": "heads",
    "LSEHead": "heads",
    "MaxHead": "heads",
    "MILHead": "heads",
    "WGAPHead": "heads",
    "wildcat_pool": "heads",
    "WildcatHead": "heads",
    "FeatureBank": "knn",
    "KNNRefiner": "knn",
    "MASK_MODES": "maxmin",
    "MAXMIN_HEAD_OPTS": "maxmin",
    "maxmin_param_groups": "maxmin",
    "MaxMinModel": "maxmin",
    "MaxMinOutput": "maxmin",
    "decoder_channels": "negev",
    "NEGEVModel": "negev",
    "UNetDecoder": "negev",
    "upsample": "negev",
    "TTA_MODES": "tta",
    "flips_mean_map": "tta",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
