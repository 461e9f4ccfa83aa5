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


def test_the_shipped_default_model_loads_and_predicts_without_torchvision():
    code = (
        "import sys, torch\n"
        "from histo_wsl.inference.engine import Engine\n"
        "from histo_wsl.inference.params import LocalizeParams\n"
        "engine = Engine(LocalizeParams(model='glas-negev-mobilenetv2', device='cpu'))\n"
        "engine.predict(torch.zeros((1, engine.size, engine.size, 3), dtype=torch.uint8))\n"
        "late = ('torchvision', 'torch._dynamo')\n"
        "print('LATE=' + str(sorted(m for m in sys.modules if m.startswith(late))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "LATE=[]" in out.stdout, out.stdout
