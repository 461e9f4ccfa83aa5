"""Backbones (stride 8, stages), heads, classifier and learning-rate groups, ImageNet weight loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from histo_wsl.errors import InputError
from histo_wsl.networks import (
    BACKBONES,
    HEADS,
    WSOLClassifier,
    build_backbone,
    build_classifier,
    build_head,
    param_groups,
    split_params,
    weights_path,
)
from histo_wsl.networks.heads import wildcat_pool

WEIGHTS_HOME = Path(__file__).resolve().parents[3] / "shared" / "data" / "weights"

EXPECTED = {
    "resnet50": ([64, 256, 512, 1024, 2048], [2, 4, 8, 8, 8]),
    "resnet18": ([64, 64, 128, 256, 512], [2, 4, 8, 8, 8]),
    "vgg16": ([64, 128, 256, 1024], [1, 2, 4, 8]),
    "inceptionv3": ([64, 80, 288, 768, 1024], [2, 4, 8, 8, 8]),
    "mobilenetv2": ([16, 24, 32, 96, 1280], [2, 4, 8, 8, 8]),
    "tinycnn": ([16, 32, 64, 128], [2, 4, 8, 8]),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One thread for these small CPU models: on busy cores OpenMP spin-waits make 2 threads slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backbones():
    torch.manual_seed(0)
    return {name: build_backbone(name, pretrained=False).eval() for name in BACKBONES}


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_stages_small_input(backbones, name):
    net = backbones[name]
    channels, strides = EXPECTED[name]
    assert net.name == name
    assert net.stage_channels == channels
    assert net.stage_strides == strides
    assert net.out_channels == channels[-1]
    with torch.no_grad():
        stages = net(torch.randn(2, 3, 64, 64))
    assert [tuple(s.shape) for s in stages] == [
        (2, c, 64 // s, 64 // s) for c, s in zip(channels, strides, strict=True)
    ]


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_cam_layer_is_28_at_224(backbones, name):
    with torch.no_grad():
        stages = backbones[name](torch.randn(1, 3, 224, 224))
    assert tuple(stages[-1].shape) == (1, backbones[name].out_channels, 28, 28)
    assert [s.shape[-1] for s in stages] == [224 // s for s in backbones[name].stage_strides]


def test_unknown_names_raise_input_error():
    with pytest.raises(InputError, match="unknown backbone"):
        build_backbone("alexnet", pretrained=False)
    with pytest.raises(InputError, match="unknown head"):
        build_head("avg", 8, 2)
    with pytest.raises(InputError, match="no option kmax"):
        build_head("wgap", 8, 2, kmax=0.5)
    with pytest.raises(InputError, match="kmax"):
        build_head("wildcat", 8, 2, kmax=0)


# --------------------------------------------------------------------------------------------- heads


@pytest.mark.parametrize("name", HEADS)
def test_head_shapes(name):
    torch.manual_seed(0)
    head = build_head(name, 16, 3).eval()
    feats = torch.randn(2, 16, 5, 7)
    assert tuple(head(feats).shape) == (2, 3)
    assert tuple(head.cams(feats).shape) == (2, 3, 5, 7)


def test_wgap_cam_is_weighted_sum_and_its_mean_plus_bias_is_logits():
    torch.manual_seed(0)
    head = build_head("wgap", 6, 2)
    feats = torch.randn(3, 6, 4, 4)
    cams = head.cams(feats)
    w, b = head.fc.weight, head.fc.bias
    for i in range(3):
        for c in range(2):
            manual = sum(w[c, k] * feats[i, k] for k in range(6))
            torch.testing.assert_close(cams[i, c], manual)
    torch.testing.assert_close(cams.mean(dim=(2, 3)) + b, head(feats))


def test_map_head_pooling():
    torch.manual_seed(0)
    feats = torch.randn(2, 8, 3, 3)
    gap, mx, lse = build_head("gap", 8, 2), build_head("max", 8, 2), build_head("lse", 8, 2)
    torch.testing.assert_close(gap(feats), gap.cams(feats).mean(dim=(2, 3)))
    torch.testing.assert_close(mx(feats), mx.cams(feats).amax(dim=(2, 3)))
    lse.conv.load_state_dict(mx.conv.state_dict())
    maps = mx.cams(feats)
    manual = torch.log(torch.exp(10 * maps).mean(dim=(2, 3))) / 10
    torch.testing.assert_close(lse(feats), manual)
    assert torch.all(lse(feats) <= mx(feats) + 1e-6)
    assert torch.all(lse(feats) >= maps.mean(dim=(2, 3)) - 1e-6)


def test_wildcat_pool_hand_computed():
    maps = torch.arange(1.0, 11.0).view(1, 1, 2, 5)  # values 1..10
    # top 50% = 10,9,8,7,6 -> 8; bottom 10% = 1 -> 8 + 0.6 * 1
    torch.testing.assert_close(wildcat_pool(maps, 0.5, 0.1, 0.6), torch.tensor([[8.6]]))
    torch.testing.assert_close(wildcat_pool(maps, 0.5, 0.0, 0.6), torch.tensor([[8.0]]))
    # integer k = counts: top 2 = 9.5, bottom 3 = 2 -> 9.5 + 0.5 * 2
    torch.testing.assert_close(wildcat_pool(maps, 2, 3, 0.5), torch.tensor([[10.5]]))


def test_wildcat_head_averages_modalities():
    head = build_head("wildcat", 1, 2, modalities=2, kmax=1, kmin=1, alpha=1.0)
    with torch.no_grad():
        head.conv.weight.copy_(torch.tensor([1.0, 3.0, -1.0, 0.0]).view(4, 1, 1, 1))
        head.conv.bias.zero_()
    feats = torch.tensor([1.0, 2.0, 4.0]).view(1, 1, 1, 3)
    cams = head.cams(feats)  # class 0: mean(1x, 3x) = 2x; class 1: mean(-x, 0) = -x/2
    torch.testing.assert_close(cams, torch.stack([2 * feats[0, 0], -feats[0, 0] / 2]).unsqueeze(0))
    # class 0: max 8 + min 2 = 10; class 1: max -0.5 + min -2 = -2.5
    torch.testing.assert_close(head(feats), torch.tensor([[10.0, -2.5]]))


def test_mil_cams_sum_plus_bias_is_logits_and_attention_sums_to_one():
    torch.manual_seed(0)
    feats = torch.randn(2, 8, 3, 4)
    for gated in (False, True):
        head = build_head("mil", 8, 3, mid_channels=5, gated=gated)
        torch.testing.assert_close(head.cams(feats).sum(dim=(2, 3)) + head.fc.bias, head(feats))
        att = head.attention(feats)
        assert tuple(att.shape) == (2, 3, 4)
        torch.testing.assert_close(att.sum(dim=(1, 2)), torch.ones(2))


# ---------------------------------------------------------------------------------------- classifier


def test_classifier_forward_and_cams(backbones):
    head = build_head("wgap", 96, 2)
    with pytest.raises(ValueError, match="channels"):
        WSOLClassifier(backbones["mobilenetv2"], head)
    model = build_classifier("mobilenetv2", "wildcat", 3, pretrained=False, kmin=0).eval()
    assert model.head.kmin == 0 and model.num_classes == 3
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert tuple(model(x).shape) == (2, 3)
        assert tuple(model.cams(x).shape) == (2, 3, 8, 8)
        assert [f.shape[1] for f in model.forward_features(x)] == model.backbone.stage_channels


def _groups_by_name(model):
    base, x10 = split_params(model)
    ids = {id(p): n for n, p in model.named_parameters()}
    return {ids[id(p)] for p in base}, {ids[id(p)] for p in x10}


@pytest.mark.parametrize("name", BACKBONES)
def test_param_groups_partition(backbones, name):
    model = WSOLClassifier(backbones[name], build_head("wgap", backbones[name].out_channels, 2))
    base, x10 = _groups_by_name(model)
    everything = {n for n, _ in model.named_parameters()}
    assert base and x10
    assert not base & x10
    assert base | x10 == everything
    assert {"head.fc.weight", "head.fc.bias"} <= x10
    assert {f"backbone.{n}" for n in model.backbone.lr10_parameter_names()} == x10 - {
        "head.fc.weight",
        "head.fc.bias",
    }
    rules = {
        "resnet50": ("backbone.layer4.", "backbone.layer3."),
        "resnet18": ("backbone.layer4.", "backbone.conv1."),
        "vgg16": ("backbone.conv6.", "backbone.features."),
        "inceptionv3": ("backbone.SPG_", ("backbone.Mixed_", "backbone.Conv2d_")),
        "mobilenetv2": ("backbone.features.14.", "backbone.features.13."),
        "tinycnn": ("backbone.stage4.", "backbone.stage3."),
    }
    fast, slow = rules[name]
    assert all(n in x10 for n in everything if n.startswith(fast))
    assert all(n in base for n in everything if n.startswith(slow))

    groups = param_groups(model, lr=0.01)
    assert [(g["name"], g["lr"]) for g in groups] == [("base", 0.01), ("x10", pytest.approx(0.1))]
    torch.optim.SGD(groups, lr=0.01, momentum=0.9, nesterov=True)  # accepted by an optimizer


def test_param_groups_other_modules_and_frozen(backbones):
    class WithDecoder(WSOLClassifier):
        def __init__(self, backbone):
            super().__init__(backbone, build_head("wgap", backbone.out_channels, 2))
            self.decoder = nn.Conv2d(4, 2, 1)

    base, x10 = _groups_by_name(WithDecoder(backbones["resnet18"]))
    assert "decoder.weight" in base  # ResNet: decoder at the base lr (method.md §1.4)
    base, x10 = _groups_by_name(WithDecoder(backbones["vgg16"]))
    assert "decoder.weight" in x10  # VGG/Inception: everything outside features at 10x

    model = build_classifier("resnet18", "gap", 2, pretrained=False)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    groups = param_groups(model, lr=1.0)
    assert [g["name"] for g in groups] == ["x10"]
    assert len(groups[0]["params"]) == 2
    wrapped = param_groups(nn.DataParallel(model), lr=1.0)  # DDP/DataParallel are unwrapped
    assert [id(p) for p in wrapped[0]["params"]] == [id(p) for p in groups[0]["params"]]


# ------------------------------------------------------------------------------------ ImageNet weights


def test_pretrained_mobilenetv2_loads_from_torch_home(monkeypatch):
    if not (WEIGHTS_HOME / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth").is_file():
        pytest.skip(f"MobileNetV2 ImageNet weights not available under {WEIGHTS_HOME}")
    monkeypatch.setenv("TORCH_HOME", str(WEIGHTS_HOME))
    torch.manual_seed(0)
    random = build_backbone("mobilenetv2", pretrained=False)
    loaded = build_backbone("mobilenetv2", pretrained=True)
    reference = torch.load(weights_path("mobilenetv2"), map_location="cpu", weights_only=True)
    for key, value in loaded.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(value, reference[key], rtol=0, atol=0)
    w0 = "features.0.0.weight"
    assert not torch.equal(loaded.state_dict()[w0], random.state_dict()[w0])


def test_missing_weights_raise_input_error_naming_the_path(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    assert weights_path("mobilenetv2") == expected
    with pytest.raises(InputError) as info:
        build_classifier("mobilenetv2", "wgap", 2, pretrained=True)
    assert info.value.path == str(expected)
    assert "download.pytorch.org" in str(info.value) and "--no-pretrained" in str(info.value)


def test_unreadable_weights_raise_input_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = weights_path("resnet18")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read"):
        build_backbone("resnet18", pretrained=True)


def _torchvision_like_state(name):
    """A random state dict laid out like torchvision's ImageNet checkpoint of ``name``."""
    import torchvision

    if name == "vgg16":
        from torchvision.models.vgg import cfgs, make_layers

        features = make_layers(cfgs["D"])
        state = {f"features.{k}": v for k, v in features.state_dict().items()}
        state["classifier.6.bias"] = torch.zeros(1000)
        return state
    if name == "inceptionv3":
        net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
        return net.state_dict()
    return torchvision.models.resnet18(weights=None).state_dict()


@pytest.mark.parametrize("name", ["resnet18", "vgg16", "inceptionv3"])
def test_pretrained_key_mapping(monkeypatch, tmp_path, name):
    """Checkpoints with torchvision's layout load into the modified backbones (non-strict where new)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(1)
    state = _torchvision_like_state(name)
    path = weights_path(name)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    net = build_backbone(name, pretrained=True)
    own = net.state_dict()
    if name == "vgg16":
        torch.testing.assert_close(own["features.0.weight"], state["features.0.weight"])
        torch.testing.assert_close(own["features.23.weight"], state["features.24.weight"])
        torch.testing.assert_close(own["features.27.bias"], state["features.28.bias"])
    else:
        shared = [k for k in own if k in state and not k.endswith("num_batches_tracked")]
        new = [k for k in own if k not in state]
        assert all(k.startswith("SPG_") for k in new)
        assert len(shared) > 50
        for key in shared:
            torch.testing.assert_close(own[key], state[key], rtol=0, atol=0)

    # a checkpoint of another network does not fit
    other = "resnet18" if name != "resnet18" else "vgg16"
    torch.save(_torchvision_like_state(other), path)
    with pytest.raises(InputError, match="does not hold ImageNet weights"):
        build_backbone(name, pretrained=True)


def test_tinycnn_has_no_imagenet_weights_and_a_narrow_groupnorm_decoder():
    from histo_wsl.networks.negev import NEGEVModel

    with pytest.raises(InputError, match="--no-pretrained"):
        build_backbone("tinycnn", pretrained=True)
    model = NEGEVModel(build_classifier("tinycnn", "wgap", 2, pretrained=False))
    assert model.decoder.channels == (64, 32, 16, 8)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize(
    ("size", "target"), [((28, 28), (28, 28)), ((7, 9), (28, 30)), ((13, 17), (26, 35))]
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_decoder_upsampling_is_nearest_then_bilinear(size, target, channels_last):
    import torch.nn.functional as F  # noqa: N812

    from histo_wsl.networks.negev import upsample

    x = torch.randn(2, 6, *size, generator=torch.Generator().manual_seed(0))
    want = F.interpolate(x, scale_factor=2.0, mode="nearest")
    if tuple(want.shape[-2:]) != target:
        want = F.interpolate(want, size=target, mode="bilinear", align_corners=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    got = upsample(x, target)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(upsample(x, (2 * size[0], 2 * size[1])), F.interpolate(x, scale_factor=2.0))
