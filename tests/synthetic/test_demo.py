"""The demo runs the real pipeline end to end (a tiny recipe here; the real one in `histo-wsl demo`)."""

import json

import openslide
import pytest
from typer.testing import CliRunner

from histo_wsl.cli.app import app
from histo_wsl.synthetic.demo import DemoRecipe, run_demo

TINY = DemoRecipe(
    slide_size=1024,
    glands_per_section=4,
    patches_per_class=8,
    test_per_class=4,
    patch_size=64,
    crop_size=48,
    classifier_epochs=1,
    decoder_epochs=1,
)


def test_demo_runs_every_step_and_resumes(tmp_path):
    out = tmp_path / "demo"
    summary = run_demo(out, recipe=TINY, quiet=True)
    assert summary["exit_code"] == 0
    assert summary == json.loads((out / "demo.json").read_text())
    for key in ("slide", "ground_truth", "classifier", "decoder", "report", "qupath_geojson"):
        assert (out / summary[key]).exists() or (tmp_path / summary[key]).exists(), key
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert [m["method"] for m in metrics["models"]] == ["cam", "negev"]
    assert 0 <= summary["test"]["negev_pxap"] <= 100 and 0 <= summary["test"]["cam_pxap"] <= 100
    # the probability pyramid covers the slide; the QuPath file is a FeatureCollection
    slide = openslide.OpenSlide(summary["slide"])
    prob = openslide.OpenSlide(summary["probability_tiff"])
    ratio = slide.dimensions[0] / prob.dimensions[0]
    assert abs(ratio - slide.dimensions[1] / prob.dimensions[1]) < 0.05 * ratio
    geo = json.loads(open(summary["qupath_geojson"]).read())
    assert geo["type"] == "FeatureCollection"
    assert (out / "patches" / "manifest.csv").is_file()
    # every command's run.json has the one shape (runtime/record.py)
    runs = ["patches", "runs/cam", "runs/negev", "localize", "evaluate", "evaluate-slide"]
    head = {"tool", "command", "argv", "cwd", "params", "seed", "device", "started", "versions"}
    for folder in runs:
        run = json.loads((out / folder / "run.json").read_text())
        assert head | {"ended", "seconds", "exit_code"} <= set(run), folder
    again = run_demo(out, recipe=TINY, quiet=True)
    assert again["test"] == summary["test"]
    assert again["seconds"]["train-classifier"] < 5 and again["seconds"]["localize"] < 5


def test_demo_help_lists_its_options():
    result = CliRunner().invoke(app, ["demo", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--quick" in result.stdout and "--out" in result.stdout


@pytest.mark.slow
def test_quick_demo_decoder_beats_the_cam_it_starts_from(tmp_path):
    """Issue 9: the demo's NEGEV decoder (trained, not its epoch 0) beats its stage-1 CAM."""
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path / "d"), "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    run = json.loads((tmp_path / "d" / "runs" / "negev" / "run.json").read_text())
    assert run["summary"]["checkpoints"]["best-loc.pt"]["epoch"] > 0
    assert summary["test"]["negev_pxap"] > summary["test"]["cam_pxap"] + 5, summary["test"]
    assert "report.html" in summary["report"] and "QuPath" in result.stderr


@pytest.mark.slow
def test_full_demo_holds_its_band_and_its_geojson_lies_on_the_glands(tmp_path):
    """The full demo (seed 0) stays inside the band measured across seeds and thread counts.

    Measured (docs/results.md, Demo): held-out NEGEV PxAP 80.7–86.7 (gain over the CAM 62.0–71.6),
    slide PxAP 82.3–89.8 and Dice 0.744–0.817 over seeds 0–3 with 1 and 2 threads. The lower edges
    below sit just under those minima. Issue 7: localize's QuPath polygons overlap the true glands.
    """
    import numpy as np
    import openslide

    from histo_wsl.slideio.annotations import annotation_mask

    summary = run_demo(tmp_path / "d", quiet=True)  # the full demo recipe
    test, on_slide = summary["test"], summary["slide_metrics"]
    assert test["negev_pxap"] >= 78 and test["negev_pxap"] - test["cam_pxap"] >= 60, test
    assert on_slide["pxap"] >= 80 and on_slide["dice_fg@card"] >= 0.72, on_slide
    slide = openslide.OpenSlide(summary["slide"])
    ds = 8.0
    shape = (int(slide.dimensions[1] / ds), int(slide.dimensions[0] / ds))
    pred = annotation_mask(summary["qupath_geojson"], shape, ds).mask
    truth = annotation_mask(summary["ground_truth"], shape, ds).mask
    iou = np.logical_and(pred, truth).sum() / max(1, np.logical_or(pred, truth).sum())
    # a random mask of the same size would reach about pred.mean() * truth.mean() / union
    assert pred.any() and iou > max(0.2, 4 * truth.mean()), (iou, truth.mean())
