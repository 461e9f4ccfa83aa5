"""--geometry isotropic: training images keep their aspect ratio, at the card's one µm/px."""

from __future__ import annotations

import torch
from knn_helpers import TINY
from PIL import Image
from typer.testing import CliRunner

from histo_wsl.cli.app import app
from histo_wsl.data.images import LabelledImages, eval_transform, train_transform
from histo_wsl.data.sources import Sample
from histo_wsl.inference.predictor import load_model
from histo_wsl.synthetic.patches import write_patch_dataset

runner = CliRunner()


def _wide_dataset(tmp_path):
    """The synthetic patches cut to 64×40 (landscape, as GlaS's 775×522)."""
    csv = write_patch_dataset(tmp_path / "data", n_per_class=4, size=64, seed=5)
    for folder in ("images", "masks"):
        for f in (csv.parent / folder).glob("*.png"):
            with Image.open(f) as im:
                im.crop((0, 0, 64, 40)).save(f)
    return csv


def test_isotropic_images_keep_their_aspect_and_crops_are_reflected_out(tmp_path):
    data = _wide_dataset(tmp_path).parent
    sample = Sample(data / "images" / "gland_000.png", 1, data / "masks" / "gland_000.png")
    item = LabelledImages([sample], 0, eval_transform(), scale=0.5)[0]
    assert item["image"].shape == (3, 20, 32) and item["mask"].shape == (20, 32)
    squash = LabelledImages([sample], 24, eval_transform())[0]
    assert squash["image"].shape == (3, 24, 24)
    crop = LabelledImages([sample], 0, train_transform(24), scale=0.5)[0]  # 20 px high: padded
    assert crop["image"].shape == (3, 24, 24) and crop["mask"].shape == (24, 24)
    assert set(torch.unique(crop["mask"]).tolist()) <= {0, 1}


def test_train_both_stages_isotropic_and_a_mismatched_decoder_is_refused(tmp_path):
    data = _wide_dataset(tmp_path)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("crop_size: 32\nresize_size: 40\nmax_steps_per_epoch: 2\n")
    common = ["--config", str(cfg), "--epochs", "1", "--geometry", "isotropic", *TINY]
    cam = tmp_path / "cam"
    r = runner.invoke(
        app, ["train-classifier", str(data), "--out", str(cam), "--no-pretrained", *common]
    )
    assert r.exit_code == 0, r.stderr
    card = load_model(cam / "best-loc.pt").card
    assert card["geometry"] == "isotropic" and card["input_size"] == 32
    negev = tmp_path / "negev"
    args = ["train-decoder", str(data), "--classifier", str(cam / "best-loc.pt")]
    r = runner.invoke(
        app,
        [*args, "--out", str(negev), "--seeds-fg", "2", "--seeds-bg", "2", "--seed-map", "knn"]
        + ["--refine", "knn", "--knn-bank", "64", *common],
    )
    assert r.exit_code == 0, r.stderr
    assert load_model(negev / "best-loc.pt").card["geometry"] == "isotropic"
    squash = [a for a in common if a not in ("--geometry", "isotropic")]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "bad"), *squash])
    assert r.exit_code == 2 and "--geometry isotropic" in r.stderr
    assert not (tmp_path / "bad" / "best-loc.pt").exists()


def test_slide_geometry_places_images_on_marked_glass(tmp_path):
    from histo_wsl.data.images import GLASS_LABEL, GLASS_RGB, IMAGENET_MEAN, IMAGENET_STD

    data = _wide_dataset(tmp_path).parent
    sample = Sample(data / "images" / "gland_000.png", 1, data / "masks" / "gland_000.png")
    torch.manual_seed(0)
    seen_glass = 0
    for _ in range(12):
        item = LabelledImages(
            [sample], 0, train_transform(24, jitter=False, glass=True), scale=0.5
        )[0]
        image, mask = item["image"], item["mask"]
        assert image.shape == (3, 24, 24) and set(torch.unique(mask).tolist()) <= {
            0,
            1,
            GLASS_LABEL,
        }
        glass = mask == GLASS_LABEL
        assert glass.any()  # 20 px high: 4 rows at least are glass
        want = [
            (g / 255 - m) / s
            for g, m, s in zip(GLASS_RGB, IMAGENET_MEAN, IMAGENET_STD, strict=True)
        ]
        for c in range(3):
            assert torch.allclose(image[c][glass], torch.tensor(want[c]), atol=1e-5)
        seen_glass += int(glass.sum())
    assert seen_glass > 12 * 4 * 24  # margins add glass beyond the padding


def test_pixel_negative_loss_is_the_negative_term_on_marked_pixels():
    from histo_wsl.methods.negev_losses import negative_loss, pixel_negative_loss

    logits = torch.randn(2, 2, 5, 5)
    none = torch.zeros(2, 5, 5, dtype=torch.bool)
    assert float(pixel_negative_loss(logits, none)) == 0.0
    every = torch.ones(2, 5, 5, dtype=torch.bool)
    assert torch.allclose(pixel_negative_loss(logits, every), negative_loss(logits))
    some = none.clone()
    some[0, :2] = True
    want = -torch.log_softmax(logits, 1)[:, 0][some].mean()
    assert torch.allclose(pixel_negative_loss(logits, some), want)


def test_train_both_stages_on_glass(tmp_path):
    import csv

    data = _wide_dataset(tmp_path)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("crop_size: 32\nresize_size: 40\nmax_steps_per_epoch: 2\n")
    common = ["--config", str(cfg), "--epochs", "1", "--geometry", "isotropic", "--glass", *TINY]
    cam = tmp_path / "cam"
    r = runner.invoke(
        app, ["train-classifier", str(data), "--out", str(cam), "--no-pretrained", *common]
    )
    assert r.exit_code == 0, r.stderr
    negev = tmp_path / "negev"
    args = ["train-decoder", str(data), "--classifier", str(cam / "best-loc.pt")]
    r = runner.invoke(
        app,
        [*args, "--out", str(negev), "--seeds-fg", "2", "--seeds-bg", "2", "--refine", "knn"]
        + ["--knn-bank", "64", *common],
    )
    assert r.exit_code == 0, r.stderr
    model = load_model(negev / "best-loc.pt")
    card = model.card
    assert card["geometry"] == "isotropic" and card["glass"] and card["input_size"] == 32
    # the refiner's bank also holds glass beside tissue, valued 0, under owners of its own
    refiner = model.model.refiner
    n_train = sum(card["training_data"]["train"].values())
    glass = refiner.owners >= n_train
    assert "glass" in card["refine"] and card["refine"]["bank_pixels"] == len(refiner)
    assert 0 < int(glass.sum()) < len(refiner) and torch.all(refiner.values[glass] == 0)
    with open(negev / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert float(rows[-1]["glass_loss"]) > 0  # the decoder was told glass is background
