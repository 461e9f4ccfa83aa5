import json

import numpy as np
import pytest
from PIL import Image

from histo_wsl.slideio.writers import (
    draw_tissue,
    overlay_image,
    pyramid_shapes,
    scratch_array,
    write_mask_png,
    write_png,
    write_probability_png,
    write_pyramid_tiff,
)


def _ramp(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return ((x * 7 + y * 3) % 256).astype(np.uint8)


def test_pyramid_shapes_halve_until_one_tile():
    assert pyramid_shapes(1300, 700, 256) == [(1300, 700), (650, 350), (325, 175), (163, 88)]
    assert pyramid_shapes(100, 80, 256) == [(100, 80)]


@pytest.mark.parametrize("on_disk", [False, True])
def test_pyramid_tiff_opens_in_openslide_at_its_mpp(tmp_path, on_disk):
    import openslide

    image = _ramp(1300, 700)
    scratch = tmp_path / "scratch"
    path = write_pyramid_tiff(
        tmp_path / "p.tif",
        image,
        4.0,
        description={"map": "probability"},
        scratch=scratch,
        max_bytes=1000 if on_disk else 2**30,
    )
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "scratch") == ["p.tif"]
    assert not scratch.exists() or not any(scratch.iterdir())  # level memmaps removed
    with openslide.OpenSlide(str(path)) as s:
        assert s.detect_format(str(path)) == "generic-tiff"
        assert s.level_dimensions == ((700, 1300), (350, 650), (175, 325), (88, 163))
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(4.0)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(4.0)
        assert s.level_downsamples[1] == pytest.approx(2.0)
        assert json.loads(s.properties["tiff.ImageDescription"][len("histo-wsl ") :]) == {
            "map": "probability"
        }
        level0 = np.asarray(s.read_region((0, 0), 0, (700, 1300)))[..., 0]
        level1 = np.asarray(s.read_region((0, 0), 1, (350, 650)))[..., 0].astype(float)
    np.testing.assert_array_equal(level0, image)
    mean = image.astype(float).reshape(650, 2, 350, 2).mean(axis=(1, 3))
    assert np.abs(level1 - mean).max() <= 0.5


def test_pyramid_tiff_rejects_non_uint8(tmp_path):
    with pytest.raises(ValueError):
        write_pyramid_tiff(tmp_path / "x.tif", np.zeros((10, 10), np.float32), 1.0)


def test_scratch_array_in_memory_or_memmap(tmp_path):
    small = scratch_array((10, 10), scratch=tmp_path, max_bytes=1000)
    assert not isinstance(small, np.memmap) and small.sum() == 0
    big = scratch_array((100, 100), scratch=tmp_path, max_bytes=1000, name="canvas")
    assert isinstance(big, np.memmap) and big.shape == (100, 100) and big.sum() == 0
    assert list(tmp_path.glob("canvas.*.bin"))


def test_probability_and_mask_pngs(tmp_path):
    prob = np.linspace(0, 1, 50, dtype=np.float32).reshape(5, 10)
    write_probability_png(tmp_path / "p8.png", prob)
    write_probability_png(tmp_path / "p16.png", prob, bits=16)
    write_mask_png(tmp_path / "m.png", prob >= 0.5)
    p8 = np.asarray(Image.open(tmp_path / "p8.png"))
    p16 = np.asarray(Image.open(tmp_path / "p16.png"))
    m = np.asarray(Image.open(tmp_path / "m.png"))
    assert p8.dtype == np.uint8 and p8.shape == (5, 10)
    assert np.abs(p8 / 255.0 - prob).max() <= 0.5 / 255 + 1e-6
    assert p16.dtype in (np.uint16, np.int32) and np.abs(p16 / 65535.0 - prob).max() < 1e-4
    assert set(np.unique(m)) == {0, 255} and ((m == 255) == (prob >= 0.5)).all()
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0] = 200
    write_png(tmp_path / "rgb.png", rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "rgb.png")), rgb)


def test_overlay_tints_by_probability_and_outlines_mask():
    thumb = np.full((40, 60, 3), 200, np.uint8)
    prob = np.zeros((40, 60), np.uint8)
    prob[10:30, 20:40] = 255
    out = overlay_image(thumb, prob, prob > 0, color=(255, 0, 0), alpha=0.5)
    assert out.shape == thumb.shape and out.dtype == np.uint8
    assert (out[0, 0] == 200).all()  # no probability: untouched
    assert out[20, 30, 0] > 200 and out[20, 30, 1] < 150  # tinted red inside
    assert tuple(out[10, 20]) == (255, 0, 0)  # contour


def test_outputs_honour_the_umask(tmp_path, synthetic_slide):
    """Under umask 022 every output is readable by group and others (0644), like any tool's."""
    import os
    import stat

    import torch

    from histo_wsl.data.extract import ExtractParams, extract_patches
    from histo_wsl.registry.checkpoint import save_checkpoint
    from histo_wsl.runtime import atomic
    from histo_wsl.runtime.batch import BatchOptions
    from histo_wsl.runtime.inputs import InputItem
    from histo_wsl.slideio.writers import PngStream

    old = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "a.txt", "x")
        save_checkpoint(tmp_path / "c.pt", {"method": "cam"}, {"w": torch.ones(1)})
        png = PngStream(tmp_path / "s.png", 2, 1, channels=1)
        png.write_rows(np.zeros((1, 2), np.uint8))
        png.close()
        out = tmp_path / "patches"
        extract_patches(
            [InputItem(synthetic_slide, "s")], out, ExtractParams(mpp=4.0), BatchOptions(quiet=True)
        )
    finally:
        os.umask(old)
    files = [tmp_path / "a.txt", tmp_path / "c.pt", tmp_path / "s.png"]
    files += [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 6
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, (p, oct(p.stat().st_mode))


def test_draw_tissue_outlines_on_a_copy():
    img = np.full((80, 90, 3), 240, np.uint8)
    mask = np.zeros((80, 90), bool)
    mask[20:60, 30:70] = True
    out = draw_tissue(img, mask, color=(1, 2, 3), thickness=1)
    assert out.shape == img.shape and out.dtype == np.uint8 and (img == 240).all()
    changed = (out != img).any(axis=2)
    assert changed[20, 30:70].all() and changed[59, 30:70].all() and changed[20:60, 30].all()
    assert not changed[25:55, 35:65].any() and not changed[:15].any()
    assert tuple(out[20, 40]) == (1, 2, 3)
    with pytest.raises(ValueError, match="does not match"):
        draw_tissue(img, mask[:10])
