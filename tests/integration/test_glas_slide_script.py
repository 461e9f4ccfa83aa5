"""benchmarks/glas_slide.py: the validation images laid out as one slide at GlaS's resolution."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import glas_slide  # noqa: E402
from factories import glas_like as _glas_like  # noqa: E402

from histo_wsl.slideio.slide import open_slide  # noqa: E402


def test_layout_places_every_val_image_and_its_mask_on_glass(tmp_path):
    glas = _glas_like(tmp_path / "glas")  # 4 val images of 80x60
    slide_path, mask_path, placed = glas_slide.layout_slide(
        glas, 0, tmp_path / "o", columns=3, gap=64
    )
    assert len(placed) == 4 and mask_path.name == f"{slide_path.stem}_mask.png"
    truth = np.asarray(Image.open(mask_path))
    with open_slide(slide_path) as slide:
        assert slide.mpp == glas_slide.GLAS_MPP and slide.dimensions == truth.shape[::-1]
        assert slide.level_count >= 1
        for p in placed:
            original = np.asarray(Image.open(glas / "train" / f"{p['name']}_anno.bmp")) > 0
            window = truth[p["y"] : p["y"] + p["height"], p["x"] : p["x"] + p["width"]] > 0
            assert np.array_equal(window, original)
            rgb = np.asarray(slide.read_region((p["x"], p["y"]), 0, (p["width"], p["height"])))
            image = np.asarray(Image.open(glas / "train" / f"{p['name']}.bmp"))
            # JPEG tiles keep each 4x4 block's mean colour (the noise within blocks goes)
            blocks = [a.astype(float).reshape(15, 4, 20, 4, 3).mean((1, 3)) for a in (rgb, image)]
            assert np.abs(blocks[0] - blocks[1]).mean() < 4
        glass = np.asarray(slide.read_region((0, 0), 0, (32, 32)))
        assert np.all(np.abs(glass.astype(int) - glas_slide.GLASS) <= 3)
    assert truth[: placed[0]["y"]].max() == 0  # no glands on the glass
