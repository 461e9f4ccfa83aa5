"""CAM and Grad-CAM family: shapes, per-image [0, 1] normalisation, no gradients left on parameters."""

from __future__ import annotations

import pytest
import torch

from histo_wsl.errors import InputError
from histo_wsl.networks import CAM_METHODS, build_classifier, compute_cams, normalize_cams


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One thread for these small CPU models: on busy cores OpenMP spin-waits make 2 threads slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_classifier("resnet18", "wgap", 3, pretrained=False).eval()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 64, 64)


def _assert_normalised(cams):
    assert cams.dtype == torch.float32
    assert torch.all(cams >= 0) and torch.all(cams <= 1)
    for cam in cams:
        if cam.amax() > 0:  # not a constant map
            assert cam.amin() == 0 and cam.amax() == 1


@pytest.mark.parametrize("method", CAM_METHODS)
@pytest.mark.parametrize("no_grad", [True, False])
def test_cam_methods_shapes_range_and_no_param_grad(model, images, method, no_grad):
    classes = torch.tensor([0, 2, 1])
    ctx = torch.no_grad() if no_grad else torch.enable_grad()
    with ctx:
        small = compute_cams(model, images, classes, method)
        big = compute_cams(model, images, classes, method, size=(64, 48))
    assert tuple(small.shape) == (3, 8, 8)
    assert tuple(big.shape) == (3, 64, 48)
    _assert_normalised(small)
    _assert_normalised(big)
    assert not small.requires_grad and not big.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert small.amax() == 1  # random features: the maps are not all constant


def test_cam_is_normalised_wgap_weighted_sum(model, images):
    classes = torch.tensor([1, 0, 2])
    with torch.no_grad():
        feats = model.forward_features(images)[-1]
    w = model.head.fc.weight
    manual = torch.stack(
        [torch.einsum("c,chw->hw", w[k], f) for k, f in zip(classes, feats, strict=True)]
    )
    lo = manual.amin(dim=(1, 2), keepdim=True)
    hi = manual.amax(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(compute_cams(model, images, classes), (manual - lo) / (hi - lo))
    wrapped = torch.nn.DataParallel(model)
    torch.testing.assert_close(compute_cams(wrapped, images, classes), (manual - lo) / (hi - lo))


def test_gradient_methods_on_wgap_reduce_to_relu_cam(model, images):
    """With WGAP, ∂logit_c/∂A_k = w_ck/(hw) everywhere: Grad-CAM and XGrad-CAM give ReLU(CAM)."""
    classes = torch.tensor([2, 1, 0])
    with torch.no_grad():
        raw = model.cams(images)[torch.arange(3), classes]
    expected = normalize_cams(torch.relu(raw))
    for method in ("gradcam", "xgradcam"):
        torch.testing.assert_close(compute_cams(model, images, classes, method), expected)


def test_smoothgradcampp_reproducible_with_generator(model, images):
    classes = torch.tensor([0, 1, 2])
    a = compute_cams(
        model, images, classes, "smoothgradcampp", generator=torch.Generator().manual_seed(3)
    )
    b = compute_cams(
        model, images, classes, "smoothgradcampp", generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("method", CAM_METHODS)
def test_given_features_give_the_same_maps(model, images, method):
    """NEGEV's training step passes the activations it already has: same maps, one pass fewer."""
    classes = torch.tensor([2, 0, 1])
    with torch.no_grad():
        acts = model.forward_features(images)[-1]
    gen = {"generator": torch.Generator().manual_seed(3)}
    plain = compute_cams(model, images, classes, method, size=64, **gen)
    gen = {"generator": torch.Generator().manual_seed(3)}
    given = compute_cams(model, images, classes, method, size=64, features=acts, **gen)
    torch.testing.assert_close(given, plain)
    with pytest.raises(ValueError, match="CAM-layer activations"):
        compute_cams(model, images, classes, method, features=acts[:2])


def test_frozen_model_still_gives_gradient_cams(images):
    torch.manual_seed(0)
    frozen = build_classifier("mobilenetv2", "wildcat", 2, pretrained=False).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        cams = compute_cams(frozen, images, torch.tensor([0, 1, 1]), "layercam", size=64)
    assert tuple(cams.shape) == (3, 64, 64)
    _assert_normalised(cams)


def test_normalize_constant_and_nan_maps_to_zero():
    maps = torch.stack(
        [torch.full((4, 4), 3.0), torch.full((4, 4), float("nan")), torch.rand(4, 4)]
    )
    out = normalize_cams(maps)
    assert torch.all(out[0] == 0) and torch.all(out[1] == 0)
    assert out[2].amin() == 0 and out[2].amax() == 1


def test_against_a_class_maps_the_difference_of_the_two_class_maps(model, images):
    """``against``: the class's raw map minus the other class's, normalised; its own images 0."""
    classes = torch.tensor([2, 1, 0])
    with torch.no_grad():
        raw = model.cams(images)
    diff = raw[torch.arange(3), classes] - raw[:, 0]
    got = compute_cams(model, images, classes, against=0)
    torch.testing.assert_close(got[:2], normalize_cams(diff[:2]))
    assert not got[2].any()  # an image of the class itself has no evidence over it
    # the map is not the class's own map: the negative class's map is taken away
    assert not torch.allclose(got[:2], compute_cams(model, images, classes)[:2])


def test_against_a_class_in_gradient_methods_is_the_logit_margin(model, images):
    """With WGAP, ∂(logit_c − logit_a)/∂A_k = (w_ck − w_ak)/(hw): Grad-CAM gives ReLU(difference)."""
    classes = torch.tensor([2, 1, 2])
    with torch.no_grad():
        raw = model.cams(images)
    expected = normalize_cams(torch.relu(raw[torch.arange(3), classes] - raw[:, 0]))
    torch.testing.assert_close(compute_cams(model, images, classes, "gradcam", against=0), expected)


def test_bad_arguments(model, images):
    with pytest.raises(InputError, match="unknown CAM method"):
        compute_cams(model, images, torch.tensor([0, 1, 2]), "scorecam")
    with pytest.raises(ValueError, match="integer"):
        compute_cams(model, images, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="integer"):
        compute_cams(model, images, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="lie in"):
        compute_cams(model, images, torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="against must lie in"):
        compute_cams(model, images, torch.tensor([0, 1, 2]), against=3)


def test_gradient_methods_under_inference_mode(model, images):
    classes = torch.tensor([0, 1, 2])
    expected = compute_cams(model, images, classes, "gradcampp")
    with torch.inference_mode():
        got = compute_cams(model, images.clone(), classes.clone(), "gradcampp")
    torch.testing.assert_close(got, expected)
    assert all(p.grad is None for p in model.parameters())
