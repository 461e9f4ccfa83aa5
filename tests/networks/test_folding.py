"""The inference form of a network: BatchNorm folded into its convolution, channels-last on CPU."""

from __future__ import annotations

import torch
from torch import nn

from histo_wsl.networks.backbones import build_backbone
from histo_wsl.networks.folding import fold_batchnorm, for_inference
from histo_wsl.networks.negev import _conv_bn_relu


def _with_statistics(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters, as a trained network has."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return module.eval()


def test_folding_keeps_the_outputs_and_removes_every_batchnorm():
    torch.manual_seed(0)
    net = _with_statistics(build_backbone("mobilenetv2", False))
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        ref = net(x)
        n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
        assert fold_batchnorm(net) == n_bn > 0
        assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
        out = net(x)
    for a, b in zip(ref, out, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


def test_a_batchnorm_in_training_mode_is_left_alone():
    block = _conv_bn_relu(3, 4)  # train mode, as built
    assert fold_batchnorm(block) == 0 and isinstance(block[1], nn.BatchNorm2d)


def test_for_inference_is_channels_last_on_cpu_with_the_same_outputs():
    torch.manual_seed(1)
    block = _with_statistics(nn.Sequential(_conv_bn_relu(3, 8), _conv_bn_relu(8, 4)))
    x = torch.randn(2, 3, 20, 24)
    with torch.no_grad():
        ref = block(x)
        fast = for_inference(block, "cpu")
        assert fast is block and not block.training
        assert fast[0][0].weight.is_contiguous(memory_format=torch.channels_last)
        out = fast(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(ref, out, atol=1e-5)
