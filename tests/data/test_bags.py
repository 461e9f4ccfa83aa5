"""Slides of a patch folder as MIL bags: grouping, the split by slide, and the refusals."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from histo_wsl.data.bags import load_bags
from histo_wsl.data.extract import MANIFEST_COLUMNS
from histo_wsl.errors import InputError


def _folder(root, slides, *, empty_path=False):
    """A patch folder: ``slides`` maps slide name -> list of patch labels (one patch each)."""
    rows = []
    for slide, labels in slides.items():
        (root / slide / "patches").mkdir(parents=True, exist_ok=True)
        for i, label in enumerate(labels):
            rel = f"{slide}/patches/{slide}_x{i * 8}_y0.png"
            Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(root / rel)
            row = dict.fromkeys(MANIFEST_COLUMNS, "")
            row.update(slide=slide, path="" if empty_path else rel, x=i * 8, y=0, label=label)
            rows.append(row)
        record = {"name": slide, "status": "done", "patches": len(labels)}
        (root / slide / "slide.json").write_text(json.dumps(record))
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return root


def _balanced(n=4, k=3):
    out = {f"t{i}": ["tumour"] * k for i in range(n)}
    out.update({f"n{i}": ["normal"] * k for i in range(n)})
    return out


def test_bags_group_patches_by_slide_and_split_by_slide_stratified(tmp_path):
    bags = load_bags(_folder(tmp_path, _balanced()), val_fraction=0.25, seed=3)
    assert bags.class_names == ["normal", "tumour"]
    assert bags.negative_class == "normal"  # guessed: the one negative-sounding name of two
    assert [b.slide for b in bags.bags] == sorted(b.slide for b in bags.bags)
    assert all(len(b.paths) == 3 for b in bags.bags)
    val = bags.split("val")
    assert sorted(b.label for b in val) == ["normal", "tumour"]  # one slide of each class
    assert len(bags.paths()) == 24
    again = load_bags(tmp_path, val_fraction=0.25, seed=3)
    assert [b.split for b in again.bags] == [b.split for b in bags.bags]
    desc = bags.describe()
    assert desc["val"]["tumour"] == {"slides": 1, "patches": 3}
    assert len(bags.manifest_sha256) == 64


def test_a_slide_without_label_is_refused(tmp_path):
    slides = _balanced()
    slides["t0"] = ["tumour", ""]
    with pytest.raises(InputError, match="slide 't0' has no label.*--label"):
        load_bags(_folder(tmp_path, slides))


def test_a_slide_with_mixed_labels_is_refused(tmp_path):
    slides = _balanced()
    slides["t1"] = ["tumour", "normal"]
    with pytest.raises(InputError, match="slide 't1' has patches labelled 'tumour' and 'normal'"):
        load_bags(_folder(tmp_path, slides))


def test_one_class_only_is_refused(tmp_path):
    slides = {f"t{i}": ["tumour"] for i in range(3)}
    with pytest.raises(InputError, match="every slide is labelled 'tumour'.*two classes"):
        load_bags(_folder(tmp_path, slides))


def test_an_empty_bag_is_refused(tmp_path):
    root = _folder(tmp_path, _balanced())
    (root / "blank").mkdir()
    (root / "blank" / "slide.json").write_text('{"name": "blank", "status": "done", "patches": 0}')
    with pytest.raises(InputError, match="blank gave no patch \\(an empty bag\\)"):
        load_bags(root)


def test_coordinates_only_is_refused_as_bags_without_patches(tmp_path):
    with pytest.raises(InputError, match="no patch images.*--coords-only"):
        load_bags(_folder(tmp_path, _balanced(), empty_path=True))


def test_the_negative_class_must_be_named_when_ambiguous(tmp_path):
    slides = {f"a{i}": ["adeno"] for i in range(2)} | {f"s{i}": ["squamous"] for i in range(2)}
    root = _folder(tmp_path, slides)
    with pytest.raises(InputError, match="pass --negative-class"):
        load_bags(root)
    with pytest.raises(InputError, match="'normal' is not one of the slide classes"):
        load_bags(root, negative_class="normal")
    assert load_bags(root, negative_class="squamous").negative_class == "squamous"


def test_a_single_negative_slide_is_refused(tmp_path):
    slides = {f"t{i}": ["tumour"] for i in range(3)} | {"n0": ["normal"]}
    with pytest.raises(InputError, match="at least two are needed"):
        load_bags(_folder(tmp_path, slides))


def test_a_folder_without_manifest_is_refused(tmp_path):
    with pytest.raises(InputError, match="no manifest.csv here"):
        load_bags(tmp_path)


def test_a_validation_folder_gives_the_validation_slides(tmp_path):
    train = _folder(tmp_path / "train", _balanced(3))
    val = _folder(tmp_path / "val", {"vt0": ["tumour"] * 2, "vn0": ["normal"] * 2})
    bags = load_bags(train, val_folder=val)
    assert {b.slide for b in bags.split("val")} == {"vt0", "vn0"}  # no draw from train
    assert len(bags.split("train")) == 6
    for b in bags.split("val"):
        assert all((bags.folder / p).is_file() for p in b.paths)  # relative to the train folder
        assert b.paths[0].startswith("../val/")
    alone = load_bags(train)
    assert bags.manifest_sha256 != alone.manifest_sha256  # cached features know both folders


def test_a_validation_folder_sharing_a_slide_or_cut_otherwise_is_refused(tmp_path):
    train = _folder(tmp_path / "train", _balanced(3))
    same = _folder(tmp_path / "same", {"t0": ["tumour"], "vn0": ["normal"]})
    with pytest.raises(InputError, match="t0 are in both the training and the validation"):
        load_bags(train, val_folder=same)
    other = _folder(tmp_path / "other", {"vt0": ["tumour"], "vn0": ["normal"]})
    with open(other / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(other / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows([{**r, "size": "64"} for r in rows])
    with pytest.raises(InputError, match="cut another way.*--patch-size"):
        load_bags(train, val_folder=other)
