"""Predictor: test-time flip averaging (``tta``) for every method, and its card and CLI handling."""

from __future__ import annotations

import pytest
import torch
from factories import make_checkpoint, maxmin_card

from histo_wsl.errors import InputError
from histo_wsl.inference.predictor import TTA_MODES, load_model
from histo_wsl.networks.backbones import build_backbone
from histo_wsl.networks.cams import compute_cams
from histo_wsl.networks.maxmin import MaxMinModel
from histo_wsl.registry.checkpoint import save_checkpoint

VIEWS = [(), (-1,), (-2,), (-2, -1)]


def _maxmin_checkpoint(path):
    torch.manual_seed(3)
    model = MaxMinModel(build_backbone("mobilenetv2", False), 2, sigma=0.15, cl_scale=0.8).eval()
    card = maxmin_card()
    return save_checkpoint(path, card, model.state_dict()), model


def _flip(t, dims):
    return t.flip(dims) if dims else t


def test_modes_are_the_four_flips():
    assert TTA_MODES["none"] == ((),) and sorted(TTA_MODES["flips"]) == sorted(VIEWS)


def test_flips_average_the_views_of_a_maxmin_model(tmp_path):
    path, _ = _maxmin_checkpoint(tmp_path / "mm.pt")
    x = torch.randn(2, 3, 48, 40)  # not square: flips of H and W must not be mixed up
    plain = load_model(path)
    model = plain.model  # the inference form the predictor runs (an untrained network's
    # near-zero deep features make its mask sensitive to the float rounding of the folding)
    assert plain.tta == "none" and plain.card["tta"] == "none"
    pred = load_model(path, tta="flips")
    assert pred.tta == "flips" and pred.card["tta"] == "flips"
    logits, maps = pred.predict(x)
    with torch.no_grad():
        views = [model.localize(_flip(x, d)) for d in VIEWS]
    ref_logits = torch.stack([lg for lg, _ in views]).mean(0)
    ref_maps = torch.stack([_flip(m, d) for (_, m), d in zip(views, VIEWS, strict=True)]).mean(0)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert torch.allclose(maps, ref_maps, atol=1e-5) and maps.shape == (2, 48, 40)
    # the untransformed view alone is not the average: the test can tell them apart
    assert not torch.allclose(maps, plain.predict(x)[1], atol=1e-4)
    # averaged over the flip group, the prediction of a flipped image is the flipped prediction
    _, flipped = pred.predict(x.flip(-1))
    assert torch.allclose(flipped, maps.flip(-1), atol=1e-5)


def test_flips_of_a_cam_model_use_the_class_of_the_mean_logits(tmp_path):
    path = make_checkpoint(tmp_path / "cam.pt", seed=2)
    pred = load_model(path, tta="flips")
    x = torch.randn(3, 3, 48, 48)
    logits, maps = pred.predict(x)
    net = pred.model
    with torch.no_grad():
        ref_logits = torch.stack([net(_flip(x, d)) for d in VIEWS]).mean(0)
    cls = ref_logits.argmax(1)
    ref = torch.stack(
        [_flip(compute_cams(net, _flip(x, d), cls, method="cam", size=(48, 48)), d) for d in VIEWS]
    ).mean(0)
    assert torch.allclose(logits, ref_logits, atol=1e-5) and torch.allclose(maps, ref, atol=1e-5)
    # given classes (evaluation's ground truth) are used as they are
    given = torch.tensor([1, 1, 1])
    _, maps1 = pred.predict(x, given)
    ref1 = torch.stack(
        [
            _flip(compute_cams(net, _flip(x, d), given, method="cam", size=(48, 48)), d)
            for d in VIEWS
        ]
    ).mean(0)
    assert torch.allclose(maps1, ref1, atol=1e-5)


def test_card_tta_is_the_default_and_the_argument_overrides_it(tmp_path):
    path, _ = _maxmin_checkpoint(tmp_path / "mm.pt")
    ckpt = torch.load(path, weights_only=True)
    save_checkpoint(tmp_path / "flips.pt", dict(ckpt["card"], tta="flips"), ckpt["state_dict"])
    assert load_model(tmp_path / "flips.pt").tta == "flips"
    assert load_model(tmp_path / "flips.pt", tta="none").tta == "none"


def test_unknown_tta_is_refused(tmp_path):
    path, model = _maxmin_checkpoint(tmp_path / "mm.pt")
    with pytest.raises(InputError, match="--tta 'rot90' is not one of none, flips"):
        load_model(path, tta="rot90")
    ckpt = torch.load(path, weights_only=True)
    bad = save_checkpoint(tmp_path / "bad.pt", dict(ckpt["card"], tta="rot"), ckpt["state_dict"])
    with pytest.raises(InputError, match="bad.pt: the model card's tta 'rot'"):
        load_model(bad)


def test_predict_puts_a_model_left_in_training_mode_back_in_eval(tmp_path):
    path, _ = _maxmin_checkpoint(tmp_path / "mm.pt")
    predictor = load_model(path)
    x = torch.randn(2, 3, 48, 48)
    expected = predictor.predict(x)[1]
    predictor.model.train()  # e.g. a training loop that evaluates with the same module
    assert torch.allclose(predictor.predict(x)[1], expected)
    assert not any(m.training for m in predictor.model.modules())
