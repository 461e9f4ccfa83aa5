"""train-mil: AUC and threshold helpers, and a tiny run on synthetic slides with known glands."""

import csv
import json
import sys

import numpy as np
import pytest
import torch

from histo_wsl.errors import InputError
from histo_wsl.methods.mil import (
    MILParams,
    binary_auc,
    load_mil,
    positive_threshold,
    predicted_class,
    slide_threshold,
    train_mil,
)

PATCH = 64  # patch side (px) at 1 µm/px: 128 level-0 px of a 0.5 µm/px synthetic slide


def synthetic_bags(root, n_pos=4, n_neg=4, side=1024):
    """Slides with glands (``tumour``) and without (``normal``), extracted; returns (folder, layouts)."""
    from histo_wsl.data.extract import ExtractParams, extract_patches
    from histo_wsl.runtime.batch import BatchOptions
    from histo_wsl.runtime.inputs import InputItem
    from histo_wsl.synthetic.slides import make_layout, write_pyramid_tiff

    items, layouts = [], {}
    for i in range(n_pos + n_neg):
        positive = i < n_pos
        name = f"{'tumour' if positive else 'normal'}-{i}"
        layout = make_layout(
            side, side, n_sections=1, glands_per_section=3 if positive else 0, seed=100 + i
        )
        path = write_pyramid_tiff(root / "slides" / f"{name}.tif", layout)
        items.append(InputItem(path, name, label="tumour" if positive else "normal"))
        layouts[name] = layout
    folder = root / "patches"
    params = ExtractParams(patch_size=PATCH, mpp=1.0, min_tissue=0.5)
    extract_patches(items, folder, params, BatchOptions(quiet=True))
    return folder, layouts


def gland_truth(folder, layouts):
    """Patch path -> whether the patch holds gland pixels (from the layout, not from labels)."""
    from histo_wsl.synthetic.slides import gland_mask_region

    out = {}
    with open(folder / "manifest.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            ds = float(r["size_level0"]) / PATCH
            glands = gland_mask_region(
                layouts[r["slide"]], int(r["x"]), int(r["y"]), PATCH, PATCH, ds
            )
            out[r["path"]] = bool(glands.any())
    return out


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    return synthetic_bags(tmp_path_factory.mktemp("mil"))


def _params(folder, out, **kw):
    base = dict(
        data=folder,
        out=out,
        backbone="tinycnn",
        pretrained=False,
        input_size=PATCH,
        epochs=60,
        val_fraction=0.34,
        device="cpu",
        seed=0,
    )
    return MILParams(**{**base, **kw})


def test_binary_auc_matches_hand_values_with_ties():
    assert binary_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert binary_auc([0.5, 0.5, 0.5], [0, 1, 1]) == pytest.approx(0.5)
    assert binary_auc([0.2, 0.9], [1, 1]) is None
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 5, 200) / 4, rng.integers(0, 2, 200)
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y == 1] for b in s[y == 0]]
    assert binary_auc(s, y) == pytest.approx(np.mean(pairs))


def test_positive_threshold_keeps_at_most_the_share_of_negatives_above_it():
    neg = np.array([0.1, 0.2, 0.3, 0.9])
    t = positive_threshold(neg, 0.0)
    assert t > 0.9 and np.mean(neg >= t) == 0
    t = positive_threshold(neg, 0.25)
    assert 0.3 < t <= 0.9 and np.mean(neg >= t) <= 0.25
    assert positive_threshold(neg, 0.5) == pytest.approx(0.2, abs=1e-9)


def test_slide_threshold_has_the_best_balanced_accuracy_nearest_one_half():
    # negatives all above 0.5 (a miscalibrated bag score): 0.5 calls them all positive
    neg, pos = [0.52, 0.59, 0.68, 0.94], [0.93, 0.97, 0.97, 0.99]
    t = slide_threshold(neg + pos, [False] * 4 + [True] * 4)
    assert t == pytest.approx((0.68 + 0.93) / 2)  # 7 of 8 right, the tie nearest 0.5
    assert predicted_class(["benign", "malignant"], "benign", 0.7, t) == "benign"
    assert predicted_class(["benign", "malignant"], "benign", 0.7) == "malignant"
    assert slide_threshold([0.1, 0.9], [False, True]) == 0.5  # 0.5 separates them already
    assert slide_threshold([0.2, 0.3], [False, False]) == 0.5  # one kind only


def test_mil_pseudo_labels_beat_stamped_slide_labels(slides, tmp_path):
    folder, layouts = slides
    summary = train_mil(_params(folder, tmp_path / "mil"), quiet=True, argv=["test"])
    truth = gland_truth(folder, layouts)
    with open(tmp_path / "mil" / "instances.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["path"] for r in rows} == set(truth)
    scores = [float(r["score"]) for r in rows]
    assert all(0.0 <= s <= 1.0 for s in scores)
    gland = [truth[r["path"]] for r in rows]
    assert binary_auc(scores, gland) > 0.6  # instance scores find glands (random tiny features)

    def agreement(labels):
        kept = [
            (lab == "tumour") == truth[r["path"]]
            for r, lab in zip(rows, labels, strict=True)
            if lab
        ]
        return float(np.mean(kept))

    mil = agreement([r["pseudo_label"] for r in rows])
    stamped = agreement([r["slide_label"] for r in rows])
    assert mil >= stamped + 0.1, (mil, stamped)
    tumour = [truth[r["path"]] for r in rows if r["pseudo_label"] == "tumour"]
    assert tumour and np.mean(tumour) > np.mean(
        [truth[r["path"]] for r in rows if r["slide_label"] == "tumour"]
    )
    # every patch of a negative slide is negative
    assert all(r["pseudo_label"] == "normal" for r in rows if r["slide_label"] == "normal")
    # the threshold comes from the negative validation slides only
    val_neg = [
        float(r["score"]) for r in rows if r["slide_label"] == "normal" and r["split"] == "val"
    ]
    t_pos = summary["threshold"]["t_pos"]
    assert np.mean(np.array(val_neg) >= t_pos) <= 0.02
    assert summary["threshold"]["negative_val_patches"] == len(val_neg)
    assert summary["val_slide_auc"] is not None and summary["seed"] == 0


def test_outputs_reload_and_pseudo_labels_are_a_dataset(slides, tmp_path):
    from histo_wsl.data.sources import load_samples

    folder, _ = slides
    out = tmp_path / "mil"
    first = train_mil(_params(folder, out, epochs=3), quiet=True, argv=["test"])
    assert not first["features_cached"]
    second = train_mil(_params(folder, out, epochs=3), quiet=True, argv=["test"])
    assert second["features_cached"]  # features.pt reused: same manifest, backbone and seed
    third = train_mil(_params(folder, out, epochs=3, seed=1), quiet=True, argv=["test"])
    assert not third["features_cached"]  # random weights: another seed, other features
    ds = load_samples(out / "pseudo-labels.csv")
    assert set(ds.class_names) <= {"normal", "tumour"} and "normal" in ds.class_names
    assert all(s.image.is_file() for s in ds.samples)
    assert {s.split for s in ds.samples} == {"train", "val"}
    model, card = load_mil(out / "mil.pt")
    raw = torch.load(out / "mil.pt", weights_only=True)
    assert raw["card"]["method"] == "mil" and card["seed"] == 1
    assert card["negative_class"] == "normal" and card["threshold"]["t_pos"] > 0
    assert card["feature_dim"] == 128 and card["backbone"] == "tinycnn"
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "train-mil" and run["seed"] == 1 and run["status"] == "done"
    with open(out / "slides.csv", newline="") as fh:
        slides_rows = list(csv.DictReader(fh))
    assert len(slides_rows) == 8 and {r["split"] for r in slides_rows} == {"train", "val"}
    assert not list(out.glob(".*partial*"))  # nothing left half-written


def test_low_scores_of_positive_slides_can_be_labelled_negative(slides, tmp_path):
    folder, _ = slides
    summary = train_mil(
        _params(folder, tmp_path / "mil", epochs=3, negative_below=0.99), quiet=True, argv=["t"]
    )
    with open(tmp_path / "mil" / "instances.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["slide_label"] == "tumour"]
    below = [
        r
        for r in rows
        if float(r["score"]) < 0.99 and float(r["score"]) < summary["threshold"]["t_pos"]
    ]
    assert below and all(r["pseudo_label"] == "normal" for r in below)


def test_a_negative_quantile_sets_t_neg_from_the_negative_validation_patches(slides, tmp_path):
    folder, _ = slides
    out = tmp_path / "mil"
    summary = train_mil(_params(folder, out, epochs=3, negative_quantile=0.5), quiet=True)
    th = summary["threshold"]
    with open(out / "instances.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    negatives = [
        float(r["score"]) for r in rows if r["split"] == "val" and r["slide_label"] == "normal"
    ]
    assert th["t_neg"] == pytest.approx(
        min(float(np.quantile(negatives, 0.5)), th["t_pos"]), abs=1e-5
    )
    for r in rows:
        if r["slide_label"] == "tumour":
            score = float(r["score"])
            want = "tumour" if score >= th["t_pos"] else "normal" if score < th["t_neg"] else ""
            assert r["pseudo_label"] == want


def test_missing_torchmil_names_the_extra(slides, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmil", None)
    with pytest.raises(InputError, match=r"pip install 'histo-wsl\[mil\]'"):
        train_mil(_params(slides[0], tmp_path / "mil"), quiet=True)


def test_bad_settings_are_refused(slides, tmp_path):
    with pytest.raises(InputError, match="--negative-below"):
        train_mil(_params(slides[0], tmp_path / "m", negative_below=1.5), quiet=True)
    with pytest.raises(InputError, match="not both"):
        params = _params(slides[0], tmp_path / "m", negative_below=0.5, negative_quantile=0.5)
        train_mil(params, quiet=True)
