"""benchmarks/tissue_border.py: the ROI rate on the tissue's rim against inside it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import tissue_border  # noqa: E402

from histo_wsl.inference.outputs import OutputTissue  # noqa: E402
from histo_wsl.slideio.slide import open_slide  # noqa: E402
from histo_wsl.tissue.scan import find_tissue  # noqa: E402


def _fake_output(slide_path: Path, out: Path, s_out: float, which: str) -> None:
    """A localize output folder whose mask is the tissue (``all``) or its outer ring (``ring``)."""
    with open_slide(slide_path) as slide:
        w0, h0 = slide.dimensions
        found = find_tissue(slide)
    h, w = int(np.ceil(h0 / s_out)), int(np.ceil(w0 / s_out))
    tissue = np.asarray(found.mask, dtype=bool)
    t = OutputTissue(tissue, found.downsample, (h, w), s_out).rows(0, h).astype(np.uint8)
    eroded = cv2.erode(t, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
    mask = t > 0 if which == "all" else (t > 0) & (eroded == 0)
    folder = out / slide_path.stem
    folder.mkdir(parents=True)
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(
        folder / f"{slide_path.stem}.mask.png"
    )
    record = {"output_downsample": s_out}
    (folder / f"{slide_path.stem}.json").write_text(json.dumps(record))


def test_a_map_of_the_whole_tissue_has_no_border_excess(tmp_path, synthetic_slide):
    _fake_output(synthetic_slide, tmp_path, 8.0, "all")
    r = tissue_border.border_rates(synthetic_slide, tmp_path)
    assert r["roi_rate_ring"] == 1.0 and r["roi_rate_inside"] == 1.0 and r["ring_excess"] == 1.0
    assert 0 < r["roi_share_on_ring"] < 0.5 and r["border_ok"]
    assert r["slivers"] == 0 and r["sliver_pixels"] == 0  # each region lies mostly inside


def test_a_rim_of_roi_is_all_on_the_ring(tmp_path, synthetic_slide):
    _fake_output(synthetic_slide, tmp_path, 8.0, "ring")
    r = tissue_border.border_rates(synthetic_slide, tmp_path)
    assert r["roi_rate_ring"] == 1.0 and r["roi_rate_inside"] == 0.0
    assert r["roi_share_on_ring"] == 1.0 and r["ring_excess"] is None  # nothing inside to divide
    assert not r["border_ok"]  # the lines issue #25 describes
    assert r["slivers"] >= 1 and r["sliver_pixels"] == r["roi_pixels"]
