"""histo-wsl evaluate on images: numbers against direct computations, calibration, bad input."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import SIZE, make_checkpoint
from PIL import Image
from typer.testing import CliRunner

from histo_wsl.cli.app import app
from histo_wsl.data.images import LabelledImages, eval_transform
from histo_wsl.data.sources import load_samples
from histo_wsl.evaluation.bootstrap import bootstrap_ci, bootstrap_histograms
from histo_wsl.evaluation.data import EvalSettings
from histo_wsl.evaluation.images import run_evaluate
from histo_wsl.evaluation.metrics import PxAPMeter, dice
from histo_wsl.inference.predictor import load_model
from histo_wsl.methods.base import evaluate_maps
from histo_wsl.registry.checkpoint import load_checkpoint
from histo_wsl.synthetic.patches import write_patch_dataset

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the tiny network runs faster so on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    csv_path = write_patch_dataset(root / "data", n_per_class=6, size=64)
    ckpt = make_checkpoint(root / "model.pt")
    return root, csv_path, ckpt


@pytest.fixture(scope="module")
def evaluated(setup):
    """One evaluation of all 12 images (6 gland, 6 normal = fully negative)."""
    root, csv_path, ckpt = setup
    out = root / "out"
    settings = EvalSettings(
        models=[ckpt],
        data=str(csv_path),
        out=out,
        split="all",
        bootstrap=200,
        examples=2,
        device="cpu",
    )
    summary = run_evaluate(settings, argv=["histo-wsl", "evaluate", "test"], quiet=True)
    metrics = json.loads((out / "metrics.json").read_text())
    return out, summary, metrics


@pytest.fixture(scope="module")
def direct(setup):
    _, csv_path, ckpt = setup
    return direct_maps(ckpt, csv_path)


def direct_maps(ckpt: Path, csv_path: Path):
    """Maps of the ground-truth class computed here, as train-classifier's validation does."""
    pred = load_model(ckpt)
    ds = load_samples(csv_path)
    items = LabelledImages(ds.samples, SIZE, eval_transform())
    batch = [items[i] for i in range(len(items))]
    images = torch.stack([it["image"] for it in batch])
    logits, maps = pred.predict(images, torch.tensor([it["label"] for it in batch]))
    out = [
        (lg, m.numpy().astype(np.float64), it["mask"].numpy() == 1, it)
        for lg, m, it in zip(logits, maps, batch, strict=True)
    ]
    return pred, ds, out


def test_numbers_equal_direct_computations(evaluated, direct):
    _, _, metrics = evaluated
    m = metrics["models"][0]
    pred, ds, maps = direct
    assert m["n_images"] == 12 and m["n_images_with_roi"] == 6 and m["n_images_without_roi"] == 6

    px = PxAPMeter()
    for _, s, gt, _ in maps:
        px.update(s, gt)
    assert m["localization"]["pxap"]["value"] == pytest.approx(px.pxap(), abs=1e-9)

    # dataset-level counts at the card threshold (0.5): pixels of all images pooled
    tp = sum(int(((s >= 0.5) & gt).sum()) for _, s, gt, _ in maps)
    fp = sum(int(((s >= 0.5) & ~gt).sum()) for _, s, gt, _ in maps)
    fn = sum(int(((s < 0.5) & gt).sum()) for _, s, gt, _ in maps)
    tn = sum(int(((s < 0.5) & ~gt).sum()) for _, s, gt, _ in maps)
    card = m["localization"]["at_threshold"]["card"]
    assert (card["tp"], card["fp"], card["fn"], card["tn"]) == (tp, fp, fn, tn)
    assert card["dice_fg"]["value"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert card["dice_bg"]["value"] == pytest.approx(2 * tn / (2 * tn + fp + fn))
    assert card["iou_fg"]["value"] == pytest.approx(tp / (tp + fp + fn))
    assert card["miou"]["value"] == pytest.approx((tp / (tp + fp + fn) + tn / (tn + fp + fn)) / 2)
    # normal images only add negatives: positives = gland pixels of the gland images
    assert m["n_pixels"]["positive"] == sum(int(gt.sum()) for *_, gt, _ in maps)
    assert m["n_pixels"]["positive"] + m["n_pixels"]["negative"] == 12 * SIZE * SIZE

    # F1+ over images with ROI only, F1- over images with background (TMI protocol)
    f1p = [dice(s >= 0.5, gt) for _, s, gt, _ in maps if gt.any()]
    f1n = [dice(s < 0.5, ~gt) for _, s, gt, _ in maps if (~gt).any()]
    f1 = m["localization"]["f1"]
    assert f1["f1_pos"]["n_images"] == 6 and f1["f1_neg"]["n_images"] == 12
    assert f1["f1_pos"]["value"] == pytest.approx(np.mean(f1p))
    assert f1["f1_neg"]["value"] == pytest.approx(np.mean(f1n))

    labels = [it["label"] for *_, it in maps]
    predicted = [int(lg.argmax()) for lg, *_ in maps]
    acc = 100 * np.mean(np.array(labels) == np.array(predicted))
    assert m["classification"]["accuracy"]["value"] == pytest.approx(acc)
    conf = np.zeros((2, 2), int)
    for y, p in zip(labels, predicted, strict=True):
        conf[y, p] += 1
    assert m["classification"]["confusion_matrix"]["counts"] == conf.tolist()

    # the same numbers as train-classifier's validation loop on the same images
    val = evaluate_maps(
        pred.model,
        ds.samples,
        ds.samples,
        lambda model, x, y: pred.predict(x, y),
        torch.device("cpu"),
        2,
        size=SIZE,
    )
    assert val["valpx_pxap"] == pytest.approx(m["localization"]["pxap"]["value"], abs=1e-9)
    assert val["val_acc"] == pytest.approx(m["classification"]["accuracy"]["value"])
    assert val["valpx_dice_fg@0.5"] == pytest.approx(card["dice_fg"]["value"])


def test_pxap_matches_scikit_learn_on_the_same_pixels(evaluated, direct):
    metrics_mod = pytest.importorskip("sklearn.metrics")
    _, _, metrics = evaluated
    _, _, maps = direct
    scores = np.concatenate([s.ravel() for _, s, _, _ in maps])
    gts = np.concatenate([gt.ravel() for _, _, gt, _ in maps])
    quantised = np.floor(scores * 1000) / 1000  # the 0.001 grid PxAP bins on
    ap = 100 * metrics_mod.average_precision_score(gts, quantised)
    assert metrics["models"][0]["localization"]["pxap"]["value"] == pytest.approx(ap, abs=0.1)


def test_per_image_csv_and_thresholds(evaluated):
    out, _, metrics = evaluated
    rows = list(csv.DictReader(open(out / "per_image.csv", encoding="utf-8")))
    assert len(rows) == 12
    assert {"image", "label", "predicted", "dice_fg@0.5", "miou@0.5", "has_roi"} <= set(rows[0])
    m = metrics["models"][0]
    roi = [float(r["dice_fg@0.5"]) for r in rows if r["has_roi"] == "True"]
    assert np.mean(roi) == pytest.approx(m["localization"]["f1"]["f1_pos"]["value"], abs=1e-5)
    at = m["localization"]["at_threshold"]
    assert at["best"]["name"] == "best_threshold (optimistic)"
    assert at["best"]["miou"]["value"] >= at["card"]["miou"]["value"]
    assert len(metrics["threshold_grid"]) == 1000 and metrics["threshold_grid"][1] == 0.001
    assert len(m["curves"]["dice_fg"]) == 1000
    for key in ("pxap", "f1_pos", "dice_fg", "accuracy"):
        assert key in metrics["definitions"]
    assert metrics["argv"] == ["histo-wsl", "evaluate", "test"]
    assert metrics["versions"]["histo-wsl"] and metrics["versions"]["torch"]
    lo, hi = m["localization"]["pxap"]["ci95"]
    assert lo <= m["localization"]["pxap"]["value"] <= hi
    assert m["per_class"]["normal"]["pxap"] is None  # no positive pixel in normal images
    assert m["per_class"]["gland"]["n_images_with_roi"] == 6
    assert (out / "run.json").is_file()


def test_report_shows_every_image_and_no_absolute_path(setup, evaluated):
    root, _, _ = setup
    out, _, metrics = evaluated
    text = (out / "report.html").read_text(encoding="utf-8")
    md = (out / "report.md").read_text(encoding="utf-8")
    n = metrics["models"][0]["n_images"]
    assert n == 12
    # one thumbnail per image (not the 2 + 2 examples), one table row per image
    assert text.count('src="data:image/jpeg;base64,') == n
    assert len(re.findall(r'<figure class="tile" data-k="\d+"', text)) == n
    assert len(re.findall(r'<tr data-k="\d+">', text)) == n
    assert text.count('<th data-sort="') >= 8
    for doc in (text, md):
        assert str(root) not in doc and str(root.resolve()) not in doc
        assert "card threshold (not calibrated: the card has no calibration record)" in doc
    assert "model: model.pt — cam" in md


def test_bootstrap_histograms_uses_the_draws_of_bootstrap_ci():
    rng = np.random.default_rng(1)
    pos = rng.integers(0, 50, size=(9, 1002))
    neg = rng.integers(0, 50, size=(9, 1002))

    def stat(m):
        return {"n_pos": m.n_pos, "pxap": m.pxap()}

    ci = bootstrap_histograms(pos, neg, stat, n=300, seed=4)
    expected = bootstrap_ci(pos.sum(axis=1), n=300, seed=4, statistic=np.sum)
    assert ci["n_pos"] == pytest.approx(expected)
    assert bootstrap_histograms(pos, neg, stat, n=300, seed=4) == ci  # seeded
    assert bootstrap_histograms(pos, neg, stat, n=300, seed=5) != ci
    whole = PxAPMeter.from_histograms(pos.sum(0), neg.sum(0)).pxap()
    assert ci["pxap"][0] <= whole <= ci["pxap"][1]


def test_split_auto_picks_val_and_calibrate_writes_a_new_checkpoint(setup, tmp_path):
    _, csv_path, ckpt = setup
    before = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    out = tmp_path / "cal"
    args = ["evaluate", str(ckpt), "--data", str(csv_path), "--out", str(out)]
    args += ["--examples", "1"]
    result = runner.invoke(app, args + ["--calibrate", "--bootstrap", "0", "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["split"] == "val" and metrics["data"]["n_images"] == 4
    new = out / "model.calibrated.pt"
    assert summary["calibrated_checkpoints"] == [str(new)]
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == before  # never in place
    card = load_checkpoint(new)["card"]
    best = metrics["models"][0]["localization"]["at_threshold"]["best"]
    assert card["threshold"] == best["threshold"]
    assert {"set", "criterion", "value"} <= set(card["calibration"])
    assert card["calibration"]["value"] == pytest.approx(best["miou"]["value"])
    assert "miou" in card["calibration"]["criterion"] and "val" in card["calibration"]["set"]
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "written to model.calibrated.pt" in md and str(tmp_path) not in md
    assert "card threshold (not calibrated" in md  # the evaluated card was not calibrated
    # never overwritten: a second calibration into the same folder is refused before any work
    again = runner.invoke(app, args + ["--calibrate", "--bootstrap", "0", "--quiet"])
    assert again.exit_code == 2 and "never overwritten" in again.stderr
    # the calibrated model's card threshold is the best threshold of the set
    out2 = tmp_path / "cal2"
    result = runner.invoke(
        app,
        ["evaluate", str(new), "--data", str(csv_path), "--out", str(out2), "--bootstrap", "0"]
        + ["--examples", "0"],
    )
    assert result.exit_code == 0, result.output
    m2 = json.loads((out2 / "metrics.json").read_text())["models"][0]
    at = m2["localization"]["at_threshold"]
    assert at["card"]["threshold"] == best["threshold"]
    assert at["card"]["miou"]["value"] == pytest.approx(best["miou"]["value"])
    assert "calibrated on" in at["card"]["name"]
    for doc in ("report.md", "report.html"):  # the calibrated card's threshold, in the same words
        text = (out2 / doc).read_text(encoding="utf-8")
        assert "card threshold (calibrated on dataset.csv [val, 4 images])" in text
        assert "card threshold (not calibrated" not in text and str(tmp_path) not in text
        assert str(csv_path.parent) not in text


def _copy_data(csv_path: Path, dest: Path) -> Path:
    shutil.copytree(csv_path.parent, dest)
    return dest / csv_path.name


def test_missing_mask_is_named_and_skip_missing_works(setup, tmp_path):
    _, csv_path, ckpt = setup
    data = _copy_data(csv_path, tmp_path / "data")
    (data.parent / "masks" / "gland_002.png").unlink()
    args = ["evaluate", str(ckpt), "--data", str(data), "--split", "all", "--bootstrap", "0"]
    args += ["--examples", "1"]
    result = runner.invoke(app, args + ["--out", str(tmp_path / "o1"), "--quiet"])
    assert result.exit_code == 2
    assert "gland_002.png" in result.stderr and "--skip-missing" in result.stderr
    result = runner.invoke(app, args + ["--out", str(tmp_path / "o2"), "--skip-missing", "-q"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "o2" / "metrics.json").read_text())
    assert metrics["data"]["skipped_missing_masks"] == ["images/gland_002.png"]
    assert metrics["models"][0]["n_images"] == 11


def test_a_mask_of_another_size_is_refused_or_left_out_and_listed(setup, tmp_path):
    _, csv_path, ckpt = setup
    data = _copy_data(csv_path, tmp_path / "data")
    mask = data.parent / "masks" / "gland_001.png"
    Image.open(mask).resize((32, 32), Image.Resampling.NEAREST).save(mask)
    out = tmp_path / "o"
    args = ["evaluate", str(ckpt), "--data", str(data), "--split", "all", "--bootstrap", "0"]
    args += ["--protocol", "native", "--out", str(out), "--examples", "0", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "gland_001.png" in result.stderr and "32x32" in result.stderr
    assert "64x64" in result.stderr and "--skip-missing" in result.stderr
    assert not out.exists() or not any(out.iterdir())  # refused before anything was evaluated
    result = runner.invoke(app, [*args, "--skip-missing"])
    assert result.exit_code == 0, result.output
    assert "gland_001.png: left out" in result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    skipped = metrics["data"]["skipped_mask_size_mismatch"]
    assert skipped == {"images/gland_001.png": {"image": [64, 64], "mask": [32, 32]}}
    m = metrics["models"][0]
    assert m["n_pixels"]["positive"] + m["n_pixels"]["negative"] == 11 * 64 * 64


def test_compare_puts_models_side_by_side(setup, tmp_path):
    _, csv_path, ckpt = setup
    other = make_checkpoint(tmp_path / "other" / "model.pt", seed=1)
    out = tmp_path / "cmp"
    base = ["evaluate", str(ckpt), str(other), "--data", str(csv_path), "--out", str(out)]
    refused = runner.invoke(app, base + ["-q"])
    assert refused.exit_code == 2 and "--compare" in refused.stderr
    result = runner.invoke(app, base + ["--compare", "--bootstrap", "0", "--examples", "1", "-q"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    names = [m["name"] for m in metrics["models"]]
    assert len(names) == 2 and len(set(names)) == 2
    html = (out / "report.html").read_text()
    assert all(n in html for n in names)
    rows = list(csv.DictReader(open(out / "per_image.csv", encoding="utf-8")))
    assert len(rows) == 8 and {r["model"] for r in rows} == set(names)


def test_bad_settings_exit_2(setup, tmp_path):
    _, csv_path, ckpt = setup
    base = ["evaluate", str(ckpt), "--data", str(csv_path), "--out", str(tmp_path / "o"), "-q"]
    for extra, needle in (
        (["--protocol", "crop"], "--protocol"),
        (["--split", "test"], "test split"),
        (["--map-class", "other"], "--map-class"),
    ):
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 2, extra
        assert needle in result.stderr, (extra, result.stderr)
    result = runner.invoke(app, ["evaluate", str(tmp_path / "nope.pt"), "--data", str(csv_path)])
    assert result.exit_code == 2 and "checkpoint not found" in result.stderr
    # an --out that cannot be written is refused before the evaluation runs
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    bad_out = ["evaluate", str(ckpt), "--data", str(csv_path), "--out", str(blocker / "o"), "-q"]
    result = runner.invoke(app, bad_out)
    assert result.exit_code == 2 and "the output folder cannot be written" in result.stderr
    assert "Traceback" not in result.stderr


def test_tta_flips_numbers_equal_the_flipped_predictor(setup, tmp_path):
    _, csv_path, ckpt = setup
    out = tmp_path / "tta"
    settings = EvalSettings(
        models=[ckpt], data=str(csv_path), out=out, split="all", bootstrap=0, tta="flips"
    )
    run_evaluate(settings, argv=["histo-wsl", "evaluate", "test"], quiet=True)
    m = json.loads((out / "metrics.json").read_text())["models"][0]
    assert m["tta"] == "flips" and "4 flipped views" in m["map"]
    pred = load_model(ckpt, tta="flips")
    items = LabelledImages(load_samples(csv_path).samples, SIZE, eval_transform())
    batch = [items[i] for i in range(len(items))]
    _, maps = pred.predict(
        torch.stack([it["image"] for it in batch]), torch.tensor([it["label"] for it in batch])
    )
    px = PxAPMeter()
    for s, it in zip(maps, batch, strict=True):
        px.update(s.numpy().astype(np.float64), it["mask"].numpy() == 1)
    assert m["localization"]["pxap"]["value"] == pytest.approx(px.pxap(), abs=1e-9)
    r = runner.invoke(app, ["evaluate", str(ckpt), "--data", str(csv_path), "--tta", "rot", "-q"])
    assert r.exit_code == 2 and "--tta 'rot' is not one of none, flips" in r.stderr
