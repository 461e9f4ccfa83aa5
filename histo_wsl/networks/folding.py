"""The inference form of a trained network: BatchNorm folded into its convolution, channels-last.

A network in eval mode computes ``BN(conv(x))`` with frozen statistics, which is one convolution
with rescaled weights and a bias; :func:`fold_batchnorm` rewrites every ``Conv2d`` directly
followed by a ``BatchNorm2d`` in a ``Sequential`` (torchvision's ``Conv2dNormActivation``, the
inverted residuals of MobileNetV2, the decoders' conv-BN-ReLU blocks) that way, with
:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`. :func:`for_inference` adds the channels-last
memory format on CPU, where oneDNN's depthwise and 1×1 convolutions run about twice as fast on it
(docs/results.md, *Localize speed*). Outputs equal the original's to float rounding (about 1e-5).

The result is for prediction only: its state dict no longer matches the checkpoint, and training
it would train the folded weights.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["fold_batchnorm", "for_inference"]


def fold_batchnorm(module: nn.Module) -> int:
    """Fold each ``Conv2d → BatchNorm2d`` pair of ``module``'s Sequentials, in place.

    The BatchNorm becomes an ``Identity``; a BatchNorm in training mode or without running
    statistics is left alone. Returns the number of pairs folded.
    """
    folded = 0
    for child in module.children():
        folded += fold_batchnorm(child)
    if not isinstance(module, nn.Sequential):
        return folded
    names = list(module._modules)
    for first, second in zip(names, names[1:], strict=False):
        conv, bn = module._modules[first], module._modules[second]
        if (
            isinstance(conv, nn.Conv2d)
            and isinstance(bn, nn.BatchNorm2d)
            and not bn.training
            and not conv.training
            and bn.running_mean is not None
        ):
            module._modules[first] = fuse_conv_bn_eval(conv, bn)
            module._modules[second] = nn.Identity()
            folded += 1
    return folded


def for_inference(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """``model`` in eval mode with its BatchNorms folded; channels-last on a CPU ``device``.

    In place (the same object is returned). Inputs in the channels-last format are then the
    fast path (:meth:`histo_wsl.inference.predictor.Predictor.predict` converts them).
    """
    model.eval()
    with torch.no_grad():
        fold_batchnorm(model)
    if torch.device(device).type == "cpu":
        model.to(memory_format=torch.channels_last)
    return model
