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


def test_tta_list_is_checked_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "out"
    for bad in ("flips,flips", " , "):
        try:
            glas_slide.main(["--tta", bad, "--out", str(out), "--data", str(tmp_path)])
        except SystemExit as exc:
            assert exc.code == 2
        else:
            raise AssertionError(f"--tta {bad!r} was accepted")
        assert "--tta" in capsys.readouterr().err
    assert not out.exists()


def test_card_entry_keeps_the_numbers_and_the_command_not_the_paths():
    row = {"tta": "none", "slide_pxap": 76.8, "slide_dice": 0.74, "papers_protocol_pxap": 82.5}
    row |= {"papers_protocol_dice": 0.76, "gap": 5.7}
    flips = {**row, "tta": "flips", "slide_pxap": 78.1, "gap": 4.4, "localize_time_ratio": 2.2}
    report = {"fold": 0, "images": 18, "localize_options": "", **row}
    report |= {"slide": {"path": "/abs/slide.tif"}, "commands": {"localize": "/abs/python ..."}}
    entry = glas_slide.card_entry(
        {**report, "other_tta": {"flips": flips}}, ["--tta", "card,flips", "--out", "runs/x"]
    )
    assert entry["command"] == "python benchmarks/glas_slide.py --tta card,flips --out runs/x"
    assert entry["slide_pxap"] == 76.8 and entry["gap"] == 5.7 and entry["tta"] == "none"
    assert entry["tta_flips"]["slide_pxap"] == 78.1
    assert entry["tta_flips"]["localize_time_ratio"] == 2.2
    assert "/abs" not in str(entry) and "localize_options" not in entry
    assert "18 validation images" in entry["data"]


def test_open_glass_takes_white_open_to_the_glass_and_leaves_enclosed_lumens():
    rgb = np.full((60, 90, 3), glas_slide.GLASS, np.uint8)
    rgb[10:50, 10:80] = (200, 120, 170)  # one image of tissue
    rgb[20:30, 20:30] = 250  # a lumen inside the tissue
    rgb[10:25, 60:70] = 245  # a white bay open to the image's top edge
    glass = glas_slide.open_glass(rgb)
    assert glass[0, 0] and glass[15, 65] and glass[24, 65]  # the glass and the bay
    assert not glass[25, 25]  # the enclosed lumen is not glass
    assert not glass[40, 40] and not glass[25, 65]  # tissue


def test_tissue_bounds_are_the_rectangles_and_the_rectangles_less_open_glass(tmp_path):
    from histo_wsl.slideio.geojson import geojson_to_mask, read_geojson

    rgb = np.full((64, 128, 3), glas_slide.GLASS, np.uint8)
    placed = [
        {"x": 8, "y": 8, "width": 48, "height": 48},
        {"x": 72, "y": 8, "width": 48, "height": 48},
    ]
    for p in placed:
        rgb[p["y"] : p["y"] + p["height"], p["x"] : p["x"] + p["width"]] = (150, 60, 140)
    rgb[8:24, 72:120] = 246  # the second image's top third is white, open to the glass
    slide = tmp_path / "s.tif"
    glas_slide.write_pyramid(slide, rgb)
    files = glas_slide.write_tissue_bounds(slide, placed, tmp_path / "tissue")
    rects = geojson_to_mask(read_geojson(files["images"]), (64, 128), 1.0)
    less = geojson_to_mask(read_geojson(files["images_without_open_glass"]), (64, 128), 1.0)
    assert rects.sum() == 2 * 48 * 48 and rects[30, 30] and rects[12, 100] and not rects[2, 2]
    assert less[30, 30] and less[40, 100]  # tissue of both images
    assert not less[12, 100] and not less[2, 2]  # the open white and the glass
    assert abs(int(less.sum()) - (2 * 48 * 48 - 16 * 48)) < 48  # JPEG edges move a few pixels


def test_gap_parts_add_up_to_the_gap():
    parts = glas_slide.gap_parts(detected=80.68, perfect=80.78, rects=82.13, papers=83.88)
    assert parts == {"detection": 0.1, "glass_labelled_gland": 1.35, "windows": 1.75}
    assert round(sum(parts.values()), 2) == round(83.88 - 80.68, 2)
