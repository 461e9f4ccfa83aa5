"""histo-wsl evaluate --predictions: localize's slide maps against QuPath, ASAP and mask annotations."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from histo_wsl.cli.app import app

runner = CliRunner()


ASAP = """<?xml version="1.0"?>
<ASAP_Annotations>
  <Annotations>
    <Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="0" X="40" Y="40" />
        <Coordinate Order="1" X="120" Y="40" />
        <Coordinate Order="2" X="120" Y="120" />
        <Coordinate Order="3" X="40" Y="120" />
      </Coordinates>
    </Annotation>
    <Annotation Name="hole" Type="Polygon" PartOfGroup="_2" Color="#64FE2E">
      <Coordinates>
        <Coordinate Order="0" X="80" Y="80" />
        <Coordinate Order="1" X="120" Y="80" />
        <Coordinate Order="2" X="120" Y="120" />
        <Coordinate Order="3" X="80" Y="120" />
      </Coordinates>
    </Annotation>
    <Annotation Name="dot" Type="Dot" PartOfGroup="_0"><Coordinates>
      <Coordinate Order="0" X="5" Y="5" /></Coordinates></Annotation>
  </Annotations>
  <AnnotationGroups />
</ASAP_Annotations>
"""

SQUARE = {
    "type": "FeatureCollection",
    "features": [
        {
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[40, 40], [120, 40], [120, 120], [40, 120], [40, 40]]],
            },
            "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
        }
    ],
}


def write_localized(folder: Path, name: str, prob: np.ndarray, predicted: str, d: float = 4.0):
    """A slide as localize leaves it: <name>/<name>.prob.tif (level 0 first) and <name>.json."""
    import tifffile

    slide_dir = folder / name
    slide_dir.mkdir(parents=True)
    with tifffile.TiffWriter(slide_dir / f"{name}.prob.tif") as tw:
        tw.write(prob, tile=(16, 16), photometric="minisblack")
        tw.write(prob[::2, ::2].copy(), tile=(16, 16), photometric="minisblack", subfiletype=1)
    record = {
        "name": name,
        "path": str(folder / f"{name}.svs"),
        "status": "done",
        "predicted_class": predicted,
        "score": 0.9,
        "roi_class": "tumor",
        "threshold": 0.5,
        "model": {"path": "/models/tumor.pt", "class_names": ["not tumor", "tumor"]},
        "output_size": [prob.shape[1], prob.shape[0]],
        "output_downsample": d,
    }
    (slide_dir / f"{name}.json").write_text(json.dumps(record))


@pytest.fixture()
def slides(tmp_path):
    pred = tmp_path / "localized"
    ann = tmp_path / "annotations"
    ann.mkdir()
    perfect = np.zeros((40, 50), np.uint8)
    perfect[10:30, 10:30] = 255  # level-0 square [40, 120)² at downsample 4
    write_localized(pred, "tumor_a", perfect, "tumor")
    (ann / "tumor_a.geojson").write_text(json.dumps(SQUARE))
    write_localized(pred, "normal_b", np.zeros((40, 50), np.uint8), "not tumor")
    (ann / "normal_b.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    write_localized(pred, "tumor_c", perfect, "tumor")
    (ann / "tumor_c.xml").write_text(ASAP)
    return pred, ann


def test_slides_against_geojson_asap_and_empty_annotations(slides, tmp_path):
    pred, ann = slides
    out = tmp_path / "eval"
    args = ["evaluate", "--predictions", str(pred), "--annotations", str(ann), "--out", str(out)]
    result = runner.invoke(app, args + ["--bootstrap", "20", "--examples", "1", "-q"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    m = metrics["models"][0]
    assert m["n_images"] == 3 and m["n_images_with_roi"] == 2
    # tumor_a: 20x20 map pixels of ROI; tumor_c: the same minus the 10x10 exclusion (group _2)
    assert m["n_pixels"]["positive"] == 400 + 300
    assert m["n_pixels"]["positive"] + m["n_pixels"]["negative"] == 3 * 40 * 50
    at = m["localization"]["at_threshold"]["card"]
    assert at["tp"] == 700 and at["fp"] == 100 and at["fn"] == 0  # the excluded square is FP
    f1 = m["localization"]["f1"]
    assert f1["f1_pos"]["n_images"] == 2
    assert f1["f1_pos"]["value"] == pytest.approx((1.0 + 600 / 700) / 2)
    assert m["classification"]["accuracy"]["value"] == 100.0
    rows = {r["image"]: r for r in csv.DictReader(open(out / "per_image.csv", encoding="utf-8"))}
    assert set(rows) == {"tumor_a", "normal_b", "tumor_c"}
    assert float(rows["tumor_a"]["dice_fg@0.5"]) == 1.0
    notes = metrics["data"]["annotations"]["tumor_c"]
    assert (
        notes["format"] == "asap-xml" and notes["exclusions"] == 1 and notes["ignored"]["Dot"] == 1
    )
    text = (out / "report.html").read_text(encoding="utf-8")
    md = (out / "report.md").read_text(encoding="utf-8")
    # every slide as a thumbnail at the map's aspect ratio (50 x 40), one table row per slide
    jpegs = re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(jpegs) == 3
    for data in jpegs:
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            assert im.size == (160, 128)
    rows = re.findall(r'<tr data-k="\d+"><td[^>]*>\d+</td><td>([^<]*)</td>', text)
    assert sorted(rows) == ["normal_b", "tumor_a", "tumor_c"]
    # no absolute path: the folders by their names, the model by its file name
    for doc in (text, md):
        assert str(tmp_path) not in doc and "/models/tumor.pt" not in doc
    assert "tumor.pt" in md and "localized + annotations" in md


def test_slides_without_annotation_are_named_or_skipped(slides, tmp_path):
    pred, ann = slides
    (ann / "tumor_c.xml").unlink()
    args = ["evaluate", "--predictions", str(pred), "--annotations", str(ann), "--bootstrap", "0"]
    result = runner.invoke(app, args + ["--out", str(tmp_path / "a"), "-q"])
    assert result.exit_code == 2 and "tumor_c" in result.stderr
    result = runner.invoke(app, args + ["--out", str(tmp_path / "b"), "--skip-missing", "-q"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["data"]["skipped_missing_masks"] == ["tumor_c"]
    # predictions and annotations of different slide sets
    other = tmp_path / "other"
    other.mkdir()
    (other / "someone_else.geojson").write_text(json.dumps(SQUARE))
    result = runner.invoke(
        app,
        ["evaluate", "--predictions", str(pred), "--annotations", str(other), "-q"]
        + ["--out", str(tmp_path / "c")],
    )
    assert result.exit_code == 2 and "share no slide" in result.stderr
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = runner.invoke(app, args + ["--out", str(blocker / "d"), "-q"])
    assert result.exit_code == 2 and "the output folder cannot be written" in result.stderr


def test_xml_with_an_external_entity_is_refused(slides, tmp_path):
    pred, ann = slides
    evil = (
        '<?xml version="1.0"?>\n<!DOCTYPE foo [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
        '<ASAP_Annotations><Annotations><Annotation Name="&xxe;" Type="Polygon">'
        "</Annotation></Annotations></ASAP_Annotations>\n"
    )
    (ann / "tumor_c.xml").write_text(evil)
    result = runner.invoke(
        app,
        ["evaluate", "--predictions", str(pred), "--annotations", str(ann), "-q"]
        + ["--out", str(tmp_path / "o")],
    )
    assert result.exit_code == 2
    assert "refused" in result.stderr and "tumor_c.xml" in result.stderr
    assert "root:" not in result.stderr  # nothing of /etc/passwd leaked


def _square(x0, y0, x1, y1, cls):
    props = {"objectType": "annotation"}
    if cls is not None:
        props["classification"] = {"name": cls, "color": [200, 0, 0]}
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": props,
    }


def test_qupath_classes_choose_the_roi_and_ignore_regions_leave_the_metric(tmp_path):
    """A QuPath file with Tumor, Stroma and Ignore* regions: only the ROI class is ground truth."""
    pred, ann = tmp_path / "localized", tmp_path / "annotations"
    ann.mkdir()
    prob = np.zeros((40, 50), np.uint8)
    prob[10:30, 10:30] = 255  # the tumour square, level-0 [40, 120)² at downsample 4
    write_localized(pred, "s", prob, "tumor")
    features = [
        _square(40, 40, 120, 120, "Tumor"),
        _square(140, 0, 200, 80, "Stroma"),  # 15 x 20 map pixels of stroma
        _square(0, 120, 40, 160, "Ignore*"),  # 10 x 10 map pixels left out
    ]
    (ann / "s.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    base = ["evaluate", "--predictions", str(pred), "--annotations", str(ann), "-q"]
    base += ["--bootstrap", "0"]
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "default")])
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "default" / "metrics.json").read_text())
    m = metrics["models"][0]
    assert m["n_pixels"]["positive"] == 400  # the stroma is background, not ROI
    assert m["n_pixels"]["positive"] + m["n_pixels"]["negative"] == 40 * 50 - 100  # Ignore* out
    assert m["localization"]["at_threshold"]["card"]["dice_fg"]["value"] == 1.0
    notes = metrics["data"]["annotations"]["s"]
    assert notes["roi_classes"] == ["Tumor"] and notes["roi_rule"] == "the model's ROI class"
    assert notes["classes_found"] == {"Tumor": 1, "Stroma": 1, "Ignore*": 1}
    assert notes["ignore_regions"] == 1
    assert m["checkpoint"] == "/models/tumor.pt"  # a path, not a dict's repr
    # --roi-class: the stroma is the ROI now
    r = runner.invoke(app, [*base, "--roi-class", "stroma", "--out", str(tmp_path / "stroma")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "stroma" / "metrics.json").read_text())["models"][0]
    assert m["n_pixels"]["positive"] == 15 * 20
    # a file without the model's class: every class but Ignore* is the ROI
    (ann / "s.geojson").write_text(
        json.dumps({"type": "FeatureCollection", "features": [features[1], features[2]]})
    )
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "all")])
    notes = json.loads((tmp_path / "all" / "metrics.json").read_text())["data"]["annotations"]["s"]
    assert r.exit_code == 0 and notes["roi_rule"] == "every class but Ignore*"
    assert notes["roi_classes"] == ["Stroma"]
    r = runner.invoke(
        app, ["evaluate", "model.pt", "--roi-class", "x", "--out", str(tmp_path / "e")]
    )
    assert r.exit_code == 2 and "--roi-class" in r.stderr


def test_no_slide_accuracy_when_the_roi_is_not_a_class_of_the_model(tmp_path):
    """The benign/malignant GlaS model maps glands (ROI): a slide has no ROI-or-not label to score."""
    pred, ann = tmp_path / "localized", tmp_path / "annotations"
    ann.mkdir()
    prob = np.zeros((40, 50), np.uint8)
    prob[10:30, 10:30] = 255
    write_localized(pred, "s", prob, "benign")
    record_path = pred / "s" / "s.json"
    record = json.loads(record_path.read_text())
    record["roi_class"] = "ROI"
    record["model"]["class_names"] = ["benign", "malignant"]
    record_path.write_text(json.dumps(record))
    (ann / "s.geojson").write_text(json.dumps(SQUARE))
    args = ["evaluate", "--predictions", str(pred), "--annotations", str(ann), "-q"]
    r = runner.invoke(app, [*args, "--bootstrap", "20", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())["models"][0]
    assert m["classification"]["accuracy"]["value"] is None  # not 0 %
    assert m["localization"]["pxap"]["value"] == pytest.approx(100.0)
    row = next(csv.DictReader(open(tmp_path / "o" / "per_image.csv", encoding="utf-8")))
    assert row["correct"] == "" and row["predicted"] == ""
