"""The evaluation report: self-contained HTML with its plots, markdown, overlays, a real browser."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from factories import make_checkpoint
from PIL import Image

from histo_wsl import __version__
from histo_wsl.evaluation.data import EvalSettings
from histo_wsl.evaluation.images import run_evaluate
from histo_wsl.reporting.report import overlays, render_html
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
    assert "<link" not in text.lower() and "<script" not in text.lower()
    assert "url(" not in text and "@import" not in text
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(pngs) == 4  # PR curve, Dice curve, one example grid per model
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
    assert "<script>" not in text and "&lt;script&gt;" in text


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
