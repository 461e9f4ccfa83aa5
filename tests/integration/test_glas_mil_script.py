"""benchmarks/glas_mil.py: GlaS images laid out as labelled slides, split by patient, and the MIL chain."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import glas_mil  # noqa: E402
import glas_slide  # noqa: E402
from _runs import DEFAULT_GLAS  # noqa: E402

from histo_wsl.slideio.slide import open_slide  # noqa: E402

needs_glas = pytest.mark.skipif(
    not (DEFAULT_GLAS / "Grade.csv").is_file() or not (DEFAULT_GLAS / "train").is_dir(),
    reason=f"GlaS not found at {DEFAULT_GLAS} (../shared/data/glas next to the repository)",
)


def test_missing_glas_is_an_error_unless_skipped(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    out = tmp_path / "out"
    assert glas_mil.main(["--data", missing, "--out", str(out)]) == 2
    assert glas_mil.main(["--data", missing, "--out", str(out), "--skip-missing"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "skipped"
    assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [["--rows", "mil,mil"], ["--rows", "mil,upper"], ["--test-slides", "1"]],
)
def test_bad_options_are_refused_before_anything_runs(tmp_path, capsys, argv):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        glas_mil.main([*argv, "--out", str(out), "--data", str(tmp_path)])
    assert exc.value.code == 2 and not out.exists()
    assert "error" in capsys.readouterr().err


def _grades() -> list[dict[str, str]]:
    return [
        {"name": f"{g[0]}{p}_{i}", "patient": str(p), "grade": g}
        for p, (nb, nm) in enumerate([(4, 0), (0, 6), (5, 2), (3, 3), (4, 0), (0, 2)], start=1)
        for g, n in (("benign", nb), ("malignant", nm))
        for i in range(n)
    ]


def test_patient_split_is_disjoint_seeded_and_gives_every_split_both_grades():
    grades = _grades()
    split = glas_mil.split_patients(grades, seed=3, min_benign=2)
    assert split == glas_mil.split_patients(grades, seed=3, min_benign=2)
    patients = [p for v in split.values() for p in v]
    assert sorted(patients) == sorted({r["patient"] for r in grades})  # each once
    for members in split.values():
        have = {r["grade"] for r in grades if r["patient"] in members}
        assert have == {"benign", "malignant"}
        assert sum(r["grade"] == "benign" and r["patient"] in members for r in grades) >= 2
    with pytest.raises(ValueError, match="benign"):
        glas_mil.split_patients(grades, seed=0, min_benign=20)


def test_slides_draw_images_from_their_split_only_one_to_three_malignant():
    grades = _grades()
    patients = {"train": ["1", "2", "4"], "val": ["3"], "test": ["5", "6"]}
    counts = {"train": 5, "val": 2, "test": 2}
    slides = glas_mil.plan_slides(grades, patients, counts, images_per_slide=4, seed=1)
    assert slides == glas_mil.plan_slides(grades, patients, counts, images_per_slide=4, seed=1)
    assert len(slides) == 2 * sum(counts.values())
    grade = {r["name"]: r["grade"] for r in grades}
    patient = {r["name"]: r["patient"] for r in grades}
    used: dict[str, set[str]] = {}
    for s in slides:
        assert len(set(s["images"])) == len(s["images"])  # no repeat within a slide
        assert all(patient[n] in patients[s["split"]] for n in s["images"])
        assert s["patients"] == sorted({patient[n] for n in s["images"]}, key=int)
        malignant = [n for n in s["images"] if grade[n] == "malignant"]
        assert s["malignant_images"] == malignant
        if s["label"] == "malignant":
            assert 1 <= len(malignant) <= 3 and len(malignant) < len(s["images"])
        else:
            assert malignant == [] and len(s["images"]) == 4
        used.setdefault(s["split"], set()).update(s["images"])
    assert not used["train"] & used["val"] and not used["train"] & used["test"]
    assert not used["val"] & used["test"]


def test_patch_truth_is_the_grade_of_the_image_under_the_patch():
    placed = [
        {"name": "a", "grade": "benign", "x": 100, "y": 100, "width": 300, "height": 200},
        {"name": "b", "grade": "malignant", "x": 700, "y": 100, "width": 300, "height": 200},
    ]
    row = {"x": "650", "y": "150", "size_level0": "243.1"}
    assert glas_mil.patch_truth(row, placed) == ("malignant", "b")
    assert glas_mil.patch_truth({**row, "x": "50"}, placed) == ("benign", "a")
    assert glas_mil.patch_truth({**row, "x": "5000"}, placed) == ("benign", None)


@needs_glas
def test_grade_table_is_read_without_its_leading_spaces():
    grades = glas_mil.read_grades(DEFAULT_GLAS)
    assert len(grades) == 85 and {r["grade"] for r in grades} == {"benign", "malignant"}
    assert all(r["patient"].isdigit() and not r["name"].startswith(" ") for r in grades)
    split = glas_mil.split_patients(grades, seed=0, min_benign=6)
    assert not set(split["train"]) & set(split["test"])


@needs_glas
def test_layout_writes_a_0_62_slide_and_the_malignant_extent_as_its_mask(tmp_path):
    names = ["train_12", "train_1", "train_2"]  # benign, malignant, ...
    grade = {r["name"]: r["grade"] for r in glas_mil.read_grades(DEFAULT_GLAS)}
    slide = {
        "name": "s",
        "images": names,
        "malignant_images": [n for n in names if grade[n] == "malignant"],
    }
    path, mask, placed = glas_mil.layout_slide(DEFAULT_GLAS, slide, tmp_path, columns=2, gap=256)
    assert mask == tmp_path / "annotations" / "s_mask.png"
    truth = np.asarray(Image.open(mask)) > 0
    expected = np.zeros_like(truth)
    for p in placed:
        assert p["grade"] == grade[p["name"]]
        if p["grade"] == "malignant":
            expected[p["y"] : p["y"] + p["height"], p["x"] : p["x"] + p["width"]] = True
    assert np.array_equal(truth, expected) and expected.any()
    with open_slide(path) as s:
        assert s.mpp == pytest.approx(0.62) and s.dimensions == truth.shape[::-1]
        assert s.level_count >= 2
        glass = np.asarray(s.read_region((0, 0), 0, (64, 64)))
        assert np.all(np.abs(glass.astype(int) - glas_slide.GLASS) <= 3)


@needs_glas
@pytest.mark.slow
def test_tiny_run_goes_from_slide_labels_to_an_evaluated_map(tmp_path, capsys):
    out = tmp_path / "run"
    assert glas_mil.main(["--tiny", "--rows", "mil", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["targets_checked"] is False and set(result["rows"]) == {"mil"}
    assert 0.0 <= result["rows"]["mil"]["pxap"] <= 100.0
    assert 0.0 < result["test_roi_share"] < 100.0  # malignant images among benign ones
    splits = {s["name"]: s["split"] for s in result["slides"]}
    assert sorted(splits.values()).count("test") == 4  # 2 per class
    images = {
        k: {n for s in result["slides"] if s["split"] == k for n in s["images"]}
        for k in splits.values()
    }
    assert not images["train"] & images["test"] and not images["val"] & images["test"]
    for key in ("val_slide_auc", "test_slide_auc", "patch_auc_train_slides"):
        assert result["mil"][key] is None or 0.0 <= result["mil"][key] <= 1.0
    assert (out / "slides" / "test" / "annotations" / "test-malignant-00_mask.png").is_file()
    assert (out / "runs" / "mil" / "evaluate" / "metrics.json").is_file()
    assert json.loads((out / "report.json").read_text()) == result
