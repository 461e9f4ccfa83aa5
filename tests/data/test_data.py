import csv

import numpy as np
import pytest
import torch
from PIL import Image

from histo_wsl.data.images import LabelledImages, check_samples, eval_transform, train_transform
from histo_wsl.data.sources import load_samples
from histo_wsl.errors import InputError
from histo_wsl.synthetic.patches import write_patch_dataset


@pytest.fixture(scope="module")
def patch_csv(tmp_path_factory):
    return write_patch_dataset(tmp_path_factory.mktemp("patches"), n_per_class=8, size=64)


def test_csv_dataset_has_splits_masks_and_negative_class(patch_csv):
    ds = load_samples(patch_csv, negative_class="normal")
    assert ds.class_names == ["gland", "normal"] and ds.negative_class == 1
    d = ds.describe()
    assert d["train"] == {"gland": 6, "normal": 6} and d["val"] == {"gland": 2, "normal": 2}
    # no valpx column: every validation image with a mask is used for pixel selection
    assert len(ds.split("valpx")) == 4
    for s in ds.samples:
        m = np.asarray(Image.open(s.mask))
        assert (m.max() > 0) == (ds.class_names[s.label] == "gland")


def test_an_mpp_column_gives_the_data_resolution(tmp_path, patch_csv):
    rows = list(csv.DictReader(open(patch_csv)))
    assert load_samples(patch_csv).data_mpp is None  # no mpp column
    out = tmp_path / "with-mpp.csv"
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, [*rows[0], "mpp"])
        w.writeheader()
        for i, r in enumerate(rows):
            paths = {k: (patch_csv.parent / r[k]).as_posix() for k in ("image", "mask") if r[k]}
            w.writerow({**r, **paths, "mpp": "1.0" if i else ""})
    assert load_samples(out).data_mpp == 1.0
    bad = tmp_path / "bad-mpp.csv"
    bad.write_text(out.read_text().replace(",1.0\n", ",one\n", 1))
    with pytest.raises(InputError, match="mpp column"):
        load_samples(bad)


def test_class_folders_draw_a_seeded_stratified_split(tmp_path):
    for cls in ("tumour", "normal"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.new("RGB", (32, 32), (200, 100, 150)).save(tmp_path / cls / f"{i}.png")
    a = load_samples(tmp_path, seed=1)
    b = load_samples(tmp_path, seed=1)
    assert [s.split for s in a.samples] == [s.split for s in b.samples]
    assert a.describe()["val"] == {"normal": 2, "tumour": 2}


def test_bad_labels_one_class_empty_split(tmp_path, patch_csv):
    rows = list(csv.reader(open(patch_csv)))
    bad = tmp_path / "bad.csv"
    rows2 = [rows[0]] + [[(patch_csv.parent / r[0]).as_posix(), r[1], "", r[3]] for r in rows[1:]]
    rows2[3][1] = "stroma"
    csv.writer(open(bad, "w", newline="")).writerows(rows2)
    with pytest.raises(InputError, match="label 'stroma' is not one of the classes"):
        load_samples(bad, classes=["gland", "normal"])
    one = tmp_path / "one.csv"
    csv.writer(open(one, "w", newline="")).writerows(
        [rows2[0]] + [[r[0], "gland", "", r[3]] for r in rows2[1:]]
    )
    with pytest.raises(InputError, match="only one class"):
        load_samples(one)
    noval = tmp_path / "noval.csv"
    csv.writer(open(noval, "w", newline="")).writerows(
        [rows2[0]] + [[r[0], r[1] if r[1] != "stroma" else "gland", "", "train"] for r in rows2[1:]]
    )
    with pytest.raises(InputError, match="val split is empty"):
        load_samples(noval)
    with pytest.raises(InputError, match="not one of the classes"):
        load_samples(patch_csv, negative_class="benign")


def test_corrupt_image_and_mask_size_are_caught_before_training(tmp_path, patch_csv):
    ds = load_samples(patch_csv)
    broken = tmp_path / "broken.png"
    broken.write_bytes(Image.open(ds.samples[0].image).tobytes()[:100])
    small = tmp_path / "small_mask.png"
    Image.new("L", (10, 10)).save(small)
    from dataclasses import replace

    samples = [
        replace(ds.samples[0], image=broken),
        replace(ds.samples[1], mask=small),
    ] + ds.samples[2:]
    with pytest.raises(InputError, match="cannot read the image") as err:
        check_samples(samples)
    assert "broken.png" in str(err.value)
    with pytest.raises(InputError, match="masks must have their image's size"):
        check_samples(samples[1:])
    good, dropped = check_samples(samples, skip_errors=True)
    assert len(good) == len(samples) - 2 and len(dropped) == 2


def test_transforms_move_masks_with_images(patch_csv):
    ds = load_samples(patch_csv)
    torch.manual_seed(0)
    data = LabelledImages(ds.samples, 64, train_transform(crop=48, jitter=False))
    item = data[next(i for i, s in enumerate(ds.samples) if s.label == 0)]
    assert item["image"].shape == (3, 48, 48) and item["mask"].shape == (48, 48)
    # the crop of image and mask is the same: gland lumen is bright in the image and ROI in the mask
    ev = LabelledImages(ds.samples, 64, eval_transform())[0]
    assert ev["image"].shape == (3, 64, 64) and set(ev["mask"].unique().tolist()) <= {0, 1}


@pytest.mark.shared
def test_glas_fold_zero(request):
    from conftest import SHARED

    root = SHARED / "data" / "glas"
    if not root.is_dir():
        pytest.skip("GlaS not available")
    ds = load_samples(root, fold=0)
    d = ds.describe()
    assert d["train"] == {"benign": 29, "malignant": 38}
    assert d["val"] == {"benign": 8, "malignant": 10}
    assert d["valpx"] == {"benign": 3, "malignant": 3}
    assert ds.data_mpp == 0.62
