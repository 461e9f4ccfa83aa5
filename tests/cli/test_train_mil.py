"""``histo-wsl train-mil``: the command's wiring, its output files, its JSON and its refusals."""

import csv
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from histo_wsl.cli.app import app
from histo_wsl.data.extract import MANIFEST_COLUMNS

runner = CliRunner()


def _patch_folder(root, n=3, per_slide=4, classes=("normal", "tumour"), prefix=""):
    """A patch folder of flat-coloured patches: tumour slides hold some purple patches."""
    rows = []
    rng = np.random.default_rng(0)
    for label in classes:
        for i in range(n):
            slide = f"{prefix}{label}-{i}"
            (root / slide / "patches").mkdir(parents=True)
            for j in range(per_slide):
                purple = label != classes[0] and j == 0
                colour = (120, 40, 150) if purple else (230, 150, 190)
                pixels = np.clip(rng.normal(colour, 8, (16, 16, 3)), 0, 255).astype(np.uint8)
                rel = f"{slide}/patches/{slide}_x{j * 16}_y0.png"
                Image.fromarray(pixels).save(root / rel)
                row = dict.fromkeys(MANIFEST_COLUMNS, "")
                row.update(slide=slide, path=rel, x=j * 16, y=0, label=label, mpp="1", size="16")
                rows.append(row)
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return root


TINY = ["--backbone", "tinycnn", "--no-pretrained", "--input-size", "16", "--device", "cpu"]


def test_train_mil_writes_its_outputs_and_json(tmp_path):
    data = _patch_folder(tmp_path / "patches")
    out = tmp_path / "mil"
    args = ["train-mil", str(data), "--out", str(out), *TINY, "--epochs", "5", "--seed", "7"]
    result = runner.invoke(app, [*args, "--json", "--val-fraction", "0.34"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["slides"] == 6 and summary["patches"] == 24 and summary["seed"] == 7
    for name in ("mil.pt", "instances.csv", "slides.csv", "pseudo-labels.csv", "features.pt"):
        assert (out / name).is_file(), name
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "train-mil" and run["seed"] == 7
    assert run["params"]["negative_class"] is None  # guessed: normal
    assert summary["threshold"]["negative_fpr"] == 0.02
    with open(out / "pseudo-labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["image", "label", "split", "slide", "mpp"]
    assert {r["mpp"] for r in rows} == {"1"}  # train-classifier reads the resolution from it
    assert all((out / r["image"]).is_file() for r in rows)  # relative to the CSV
    from histo_wsl.registry.checkpoint import load_checkpoint

    patch = load_checkpoint(out / "mil.pt")["card"]["patch"]  # what localize --mil cuts
    assert patch["size"] == 16 and patch["mpp"] == 1.0 and patch["source"] == "manifest.csv"


def test_validation_slides_from_another_folder(tmp_path):
    data = _patch_folder(tmp_path / "patches")
    val = _patch_folder(tmp_path / "val", n=2, prefix="v")
    out = tmp_path / "mil"
    args = ["train-mil", str(data), "--val-data", str(val), "--out", str(out), *TINY]
    result = runner.invoke(app, [*args, "--epochs", "3", "--json"])
    assert result.exit_code == 0, result.output
    with open(out / "slides.csv", newline="") as fh:
        split = {r["slide"]: r["split"] for r in csv.DictReader(fh)}
    assert {s for s, v in split.items() if v == "val"} == {
        f"v{c}-{i}" for c in ("normal", "tumour") for i in range(2)
    }
    assert sum(v == "train" for v in split.values()) == 6  # every slide of DATA trains
    with open(out / "pseudo-labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    val_rows = [r for r in rows if r["split"] == "val"]
    assert val_rows and all(r["image"].startswith("../val/") for r in val_rows)
    assert all((out / r["image"]).is_file() for r in rows)
    # a validation folder without a negative slide
    pos = _patch_folder(tmp_path / "pos", n=2, classes=("tumour",), prefix="p")
    args = ["train-mil", str(data), "--val-data", str(pos), "--out", str(tmp_path / "m2"), *TINY]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "add negative slides to --val-data" in result.output


def test_train_mil_help_shows_the_options():
    text = runner.invoke(app, ["train-mil", "--help"], terminal_width=200).output
    for needle in ("--negative-class", "--negative-fpr", "--negative-below", "--no-pretrained"):
        assert needle in text


@pytest.mark.parametrize(
    ("classes", "extra", "message"),
    [
        (("tumour",), [], "every slide is labelled 'tumour'"),
        (("adeno", "squamous"), [], "pass --negative-class"),
        (("normal", "tumour"), ["--negative-class", "benign"], "'benign' is not one of"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, classes, extra, message):
    data = _patch_folder(tmp_path / "patches", classes=classes)
    result = runner.invoke(
        app, ["train-mil", str(data), "--out", str(tmp_path / "m"), *TINY, *extra]
    )
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
