"""histo_wsl.networks.mobilenetv2 builds what torchvision builds, without importing torchvision."""

from __future__ import annotations

import subprocess
import sys

import torch

from histo_wsl.networks.mobilenetv2 import mobilenet_v2_features


def _torchvision_features() -> torch.nn.Sequential:
    from torchvision.models import mobilenet_v2

    return mobilenet_v2(weights=None).features


def test_the_same_names_shapes_and_types_as_torchvision():
    ours, theirs = mobilenet_v2_features(), _torchvision_features()
    own = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert own == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    kinds = [type(m).__name__ for m in ours.modules()]
    assert kinds.count("InvertedResidual") == 17
    for a, b in zip(ours.modules(), theirs.modules(), strict=True):
        if isinstance(a, torch.nn.Conv2d):
            assert (a.stride, a.padding, a.groups, a.bias) == (b.stride, b.padding, b.groups, None)
        if hasattr(b, "use_res_connect"):
            assert (a.stride, a.use_res_connect, a.out_channels) == (
                b.stride,
                b.use_res_connect,
                b.out_channels,
            )


def test_a_seed_gives_torchvision_s_weights_and_the_same_draws_after():
    torch.manual_seed(3)
    ours = mobilenet_v2_features()
    after_ours = torch.rand(4)
    torch.manual_seed(3)
    theirs = _torchvision_features()
    after_theirs = torch.rand(4)
    torch.testing.assert_close(after_ours, after_theirs, rtol=0, atol=0)
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_the_same_output_in_eval_and_train_mode():
    torch.manual_seed(0)
    theirs = _torchvision_features()
    ours = mobilenet_v2_features()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 64, 48)
    for mode in (False, True):
        ours.train(mode), theirs.train(mode)
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def test_the_default_backbone_and_a_shipped_model_load_without_torchvision():
    code = (
        "import sys\n"
        "from histo_wsl.networks.backbones import build_backbone\n"
        "net = build_backbone('mobilenetv2', pretrained=False)\n"
        "from histo_wsl.inference.predictor import Predictor\n"
        "from histo_wsl.inference.localize import localize\n"
        "print('TV=' + str(sorted(m for m in sys.modules if m.startswith(('torchvision', 'torch._dynamo')))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "TV=[]" in out.stdout, out.stdout
