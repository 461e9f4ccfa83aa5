"""The evaluation report: self-contained HTML with its plots, every image's thumbnail and a
sortable per-image table, markdown, relative paths only, overlays, a real browser."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import make_checkpoint
from PIL import Image

from histo_wsl import __version__
from histo_wsl.evaluation.data import EvalSettings
from histo_wsl.evaluation.images import run_evaluate
from histo_wsl.reporting.metrics_file import UNCALIBRATED_NAME, card_threshold_name
from histo_wsl.reporting.report import (
    display_path,
    overlays,
    relative_text,
    render_html,
    thumbnail_jpeg,
)
from histo_wsl.synthetic.patches import write_patch_dataset

BLUE = np.array([31, 119, 180])  # the first model's curve colour (#1f77b4)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("report")
        csv_path = write_patch_dataset(root / "data", n_per_class=4, size=64)
        a = make_checkpoint(root / "a" / "best-loc.pt", seed=0)
        b = make_checkpoint(root / "b" / "best-loc.pt", seed=1)
        out = root / "out"
        settings = EvalSettings(
            models=[a, b],
            data=str(csv_path),
            out=out,
            split="all",
            bootstrap=50,
            examples=1,
            device="cpu",
        )
        run_evaluate(settings, argv=["histo-wsl", "evaluate", "--compare", "a", "b"], quiet=True)
    finally:
        torch.set_num_threads(before)
    return out


def test_html_is_self_contained_and_embeds_the_plots(report_dir):
    text = (report_dir / "report.html").read_text(encoding="utf-8")
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", text, flags=re.I)
    assert refs and all(r.startswith("data:") for r in refs), refs
    assert "<link" not in text.lower()
    # one inline script (the pages of the grids and the sorting of the tables), nothing fetched
    assert re.findall(r"<script[^>]*>", text, flags=re.I) == ["<script>"]
    assert "url(" not in text and "@import" not in text
    assert "http://" not in text and "https://" not in text and "fetch(" not in text
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(pngs) == 4  # PR curve, Dice curve, one example grid per model
    jpegs = re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(jpegs) == 2 * 8  # every image of each model
    for data in pngs:
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            assert im.format == "PNG" and im.width >= 400 and im.height >= 200
    for needle in (
        "Precision-recall curve",
        "Dice and mIoU vs threshold",
        "best_threshold (optimistic)",
        "a/best-loc",
        "b/best-loc",
        "histo-wsl evaluate --compare a b",
        __version__,
        "PxAP",
        "F1+",
    ):
        assert needle in text, needle


def test_markdown_links_the_plot_files(report_dir):
    md = (report_dir / "report.md").read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert set(links) == {"pr_curve.png", "dice_curve.png", "examples-1.png", "examples-2.png"}
    for name in links:
        with Image.open(report_dir / name) as im:
            assert im.format == "PNG"
    assert "| PxAP (%) |" in md and "best_threshold (optimistic)" in md


def test_html_escapes_text(report_dir):
    metrics = json.loads((report_dir / "metrics.json").read_text())
    metrics["models"][0]["name"] = "<script>alert(1)</script>"
    text = render_html(metrics, {})
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)" in text


@pytest.fixture(scope="module")
def wide_report(tmp_path_factory):
    """One model on 10 images twice as wide as high (more than the 8 examples the report had)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("wide")
        csv_path = write_patch_dataset(root / "data", n_per_class=5, size=64)
        for folder in ("images", "masks"):
            for png in (csv_path.parent / folder).glob("*.png"):
                with Image.open(png) as im:
                    cropped = im.crop((0, 16, 64, 48))  # 64 x 32
                cropped.save(png)
        ckpt = make_checkpoint(root / "models" / "model.pt")
        out = root / "out"
        settings = EvalSettings(
            models=[ckpt], data=str(csv_path), out=out, split="all", bootstrap=0, device="cpu"
        )
        argv = ["histo-wsl", "evaluate", str(ckpt), "--data", str(csv_path), f"--out={out}"]
        run_evaluate(settings, argv=argv, quiet=True)
    finally:
        torch.set_num_threads(before)
    return root, out


def _jpeg_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for data in re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', text):
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            assert im.format == "JPEG"
            sizes.append(im.size)
    return sizes


def test_html_shows_every_image_as_a_thumbnail_at_its_aspect_ratio(wide_report):
    _, out = wide_report
    text = (out / "report.html").read_text(encoding="utf-8")
    n = json.loads((out / "metrics.json").read_text())["models"][0]["n_images"]
    assert n == 10
    sizes = _jpeg_sizes(text)
    assert len(sizes) == n  # one thumbnail per evaluated image, not 8 examples
    assert all(w == 2 * h and w <= 160 for w, h in sizes), sizes  # 64 x 32 images: not squashed
    keys = re.findall(r'<figure class="tile" data-k="(\d+)"', text)
    assert sorted(int(k) for k in keys) == list(range(n))
    assert 'data-page-size="48"' in text  # pages of 48 (inline script)
    # the best and worst examples stay, drawn at the images' aspect ratio too
    with Image.open(out / "examples.png") as im:
        assert im.format == "PNG"


def test_per_image_table_sorts_and_has_one_row_per_image(wide_report):
    _, out = wide_report
    text = (out / "report.html").read_text(encoding="utf-8")
    table = re.search(r'<table class="sortable images".*?</table>', text, flags=re.S).group(0)
    headers = re.findall(r'<th data-sort="(num|text)"[^>]*>([^<]*)</th>', table)
    names = [h for _, h in headers]
    assert {"image", "label", "predicted", "has ROI", "Dice fg @0.5 (%)", "IoU fg @0.5 (%)"} <= set(
        names
    )
    assert dict((h, kind) for kind, h in headers)["Dice fg @0.5 (%)"] == "num"
    rows = re.findall(r'<tr data-k="(\d+)">(.*?)</tr>', table, flags=re.S)
    per_image = list(csv.DictReader(open(out / "per_image.csv", encoding="utf-8")))
    assert len(rows) == len(per_image) == 10
    for (_, cells), row in zip(rows, per_image, strict=True):
        values = re.findall(r"<td[^>]*>([^<]*)</td>", cells)
        assert values[1] == row["image"] and values[2] == row["label"]
        dice = values[names.index("Dice fg @0.5 (%)")]
        assert float(dice) == pytest.approx(100 * float(row["dice_fg@0.5"]), abs=0.05)
    script = re.search(r"<script>(.*?)</script>", text, flags=re.S).group(1)
    assert "aria-sort" in script and "data-sort" in script and "page-size" in script


def test_reports_show_no_absolute_path(wide_report):
    root, out = wide_report
    md = (out / "report.md").read_text(encoding="utf-8")
    text = (out / "report.html").read_text(encoding="utf-8")
    for doc in (md, text):
        for path in {str(root), str(root.resolve()), str(out), str(out.resolve())}:
            assert path not in doc
    # outside the report's folder: the name only; the report's folder itself: "."
    assert "model: model.pt — cam" in md and "**data**: dataset.csv (csv)" in md
    assert "histo-wsl evaluate model.pt --data dataset.csv --out=." in md
    assert "histo-wsl evaluate model.pt --data dataset.csv --out=." in text


def test_threshold_wording_follows_the_card(wide_report):
    _, out = wide_report
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["models"][0]["localization"]["at_threshold"]["card"]["name"] == (
        UNCALIBRATED_NAME
    )
    for doc in ("report.md", "report.html"):
        text = (out / doc).read_text(encoding="utf-8")
        assert "not calibrated" in text and "training default" not in text
        assert "card threshold (calibrated" not in text
    assert card_threshold_name({"threshold": 0.5}) == UNCALIBRATED_NAME
    assert card_threshold_name({"threshold": 0.5, "calibration": {}}) == UNCALIBRATED_NAME
    calibrated = {"threshold": 0.42, "calibration": {"set": "glas (fold 0) [val, 18 images]"}}
    assert (
        card_threshold_name(calibrated)
        == "card threshold (calibrated on glas (fold 0) [val, 18 images])"
    )
    assert "calibrated" in card_threshold_name({"calibration": {"value": 0.6}})
    assert "not" not in card_threshold_name({"calibration": {"value": 0.6}})


def test_paths_are_relative_to_the_report_or_their_name():
    base = Path("/srv/runs/eval")
    assert display_path("/srv/runs/eval/examples.png", base) == "examples.png"
    assert display_path("/srv/runs/eval", base) == "."
    assert display_path("/srv/models/m/best-loc.pt", base) == "best-loc.pt"
    assert display_path("runs/negev/best-loc.pt", base) == "runs/negev/best-loc.pt"  # as typed
    assert display_path(r"C:\\data\\glas", base) == "glas"
    assert relative_text("/srv/data/glas (fold 0) [val, 18 images]", base) == (
        "glas (fold 0) [val, 18 images]"
    )
    assert relative_text("written to /srv/runs/eval/m.calibrated.pt.", base) == (
        "written to m.calibrated.pt."
    )
    kept = "0.62 µm/px, value/255, see https://example.org/a/b and TP/(TP+FP)"
    assert relative_text(kept, base) == kept


def test_thumbnails_keep_the_aspect_ratio_and_are_small():
    image = np.full((100, 300, 3), 200, np.uint8)
    score = np.linspace(0, 1, 48 * 48).reshape(48, 48)  # a square map is resized onto the image
    mask = np.zeros((100, 300), bool)
    mask[20:80, 50:150] = True
    jpeg, w, h = thumbnail_jpeg(image, score, mask)
    assert (w, h) == (160, 53)
    with Image.open(io.BytesIO(jpeg)) as im:
        assert im.format == "JPEG" and im.size == (160, 53)
        pixels = np.asarray(im.convert("RGB")).astype(int)
    assert len(jpeg) < 8000
    edge = pixels[10:43, round(50 * 160 / 300)]  # the truth's left edge is outlined in green
    assert (edge[:, 1] > edge[:, 0] + 60).any()
    small = np.zeros((30, 20, 3), np.uint8)
    assert thumbnail_jpeg(small, np.zeros((30, 20)), None)[1:] == (20, 30)  # never enlarged


def test_overlay_colours_true_false_positives_and_negatives():
    image = np.full((8, 8, 3), 128, np.uint8)
    mask = np.zeros((8, 8), bool)
    mask[:, :4] = True  # ground truth: left half
    scores = np.zeros((8, 8))
    scores[:4, :] = 0.9  # prediction: top half
    _, gt, _, err = overlays(image, mask, scores, 0.5)
    assert gt[5, 1, 1] > gt[5, 1, 0] and gt[5, 6].tolist() == [128, 128, 128]
    tp, fp, fn, tn = err[1, 1], err[1, 6], err[6, 1], err[6, 6]
    assert tp[1] > tp[0] and tp[1] > tp[2]  # green
    assert fp[0] > fp[1] and fp[0] > fp[2]  # red
    assert fn[2] > fn[0] and fn[2] > fn[1]  # blue
    assert tn.tolist() == [128, 128, 128]


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_report_renders_with_its_plots_in_headless_chromium(report_dir, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no headless Chromium installed (apt install chromium-headless-shell)")
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            "--window-size=1200,5000",
            (report_dir / "report.html").as_uri(),
        ],
        capture_output=True,
        timeout=60,
        check=True,
    )
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("RGB")).astype(int)
    assert pixels.shape[1] == 1200
    # the curves are drawn: pixels of the first model's line colour, below the tables
    blue = np.abs(pixels - BLUE).sum(axis=2) < 40
    assert blue.sum() > 200
    assert np.nonzero(blue)[0].min() > 300
