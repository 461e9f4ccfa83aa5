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
