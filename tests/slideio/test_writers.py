import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from histo_wsl.slideio import writers
from histo_wsl.slideio.writers import (
    PngStream,
    draw_tissue,
    overlay_image,
    pyramid_shapes,
    scratch_array,
    write_mask_png,
    write_png,
    write_probability_png,
    write_pyramid_tiff,
    write_qc_png,
)


def _write_ome(path, image, mpp, **kw):
    """The OME-TIFF layout of write_pyramid_tiff."""
    return write_pyramid_tiff(path, image, mpp, ome=True, **kw)


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


def _ome_physical_sizes(tif):
    import tifffile

    pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
    return {k: v for k, v in pixels.items() if k.startswith("PhysicalSize")}


@pytest.mark.parametrize("memmap", [False, True])
def test_ome_pyramid_tiff_levels_are_subifds_with_physical_size(tmp_path, memmap):
    import tifffile

    image = _ramp(1300, 700)
    if memmap:
        src = np.memmap(tmp_path / "in.bin", dtype=np.uint8, mode="w+", shape=image.shape)
        src[:] = image
        src.flush()
        src = np.memmap(tmp_path / "in.bin", dtype=np.uint8, mode="r", shape=image.shape)
    else:
        src = image
    out = tmp_path / "out"
    scratch = tmp_path / "scratch"
    path = _write_ome(
        out / "p.ome.tif",
        src,
        0.5,
        description={"map": "probability"},
        scratch=scratch,
        max_bytes=1000 if memmap else 2**30,
    )
    assert path == out / "p.ome.tif"
    assert [p.name for p in out.iterdir()] == ["p.ome.tif"]  # no temporary file left
    assert not scratch.exists() or not any(scratch.iterdir())  # level memmaps removed
    write_pyramid_tiff(tmp_path / "ref.tif", image, 0.5)
    with tifffile.TiffFile(path) as tif, tifffile.TiffFile(tmp_path / "ref.tif") as ref:
        assert tif.is_ome
        assert len(tif.pages) == 1  # reduced levels are SubIFDs, not main IFDs
        assert _ome_physical_sizes(tif) == {
            "PhysicalSizeX": 0.5,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": 0.5,
            "PhysicalSizeYUnit": "µm",
        }
        image_meta = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
        assert json.loads(image_meta["Description"][len("histo-wsl ") :]) == {"map": "probability"}
        series = tif.series[0]
        assert series.axes == "YX"
        shapes = pyramid_shapes(1300, 700)
        assert (
            [lv.shape for lv in series.levels]
            == shapes
            == [
                (1300, 700),
                (650, 350),
                (325, 175),
                (163, 88),
            ]
        )
        assert len(tif.pages[0].subifds) == len(shapes) - 1
        for i, lv in enumerate(series.levels):
            page = lv.pages[0]
            assert page.is_tiled and page.tilewidth == page.tilelength == 256
            assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
            assert page.tags["NewSubfileType"].value == (0 if i == 0 else 1)
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            x_res = page.tags["XResolution"].value
            assert x_res[0] / x_res[1] == pytest.approx(1e4 / (0.5 * 2**i))
        np.testing.assert_array_equal(series.levels[0].asarray(), image)
        for i in range(1, len(shapes)):
            np.testing.assert_array_equal(series.levels[i].asarray(), ref.pages[i].asarray())
    mean = image.astype(float).reshape(650, 2, 350, 2).mean(axis=(1, 3))
    level1 = tifffile.imread(path, series=0, level=1).astype(float)
    assert np.abs(level1 - mean).max() <= 0.5


def test_ome_pyramid_tiff_single_level_without_mpp(tmp_path):
    import tifffile

    image = _ramp(100, 80)
    path = _write_ome(tmp_path / "s.ome.tif", image, None, compression="jpeg")
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and not tif.pages[0].subifds
        assert _ome_physical_sizes(tif) == {}
        assert len(tif.series[0].levels) == 1
        assert tif.pages[0].compression == tifffile.COMPRESSION.JPEG
        assert tif.pages[0].tags["ResolutionUnit"].value == tifffile.RESUNIT.NONE
        assert np.abs(tif.asarray().astype(int) - image).max() < 40


def test_ome_pyramid_tiff_failing_write_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real_halve = writers._halve

    def halve_then_fail(src, dst):
        calls.append(src.shape)
        if len(calls) == 2:  # level 0 and level 1 written: fail building level 2
            raise RuntimeError("boom")
        return real_halve(src, dst)

    monkeypatch.setattr(writers, "_halve", halve_then_fail)
    out = tmp_path / "out"
    scratch = tmp_path / "scratch"
    with pytest.raises(RuntimeError, match="boom"):
        _write_ome(out / "p.ome.tif", _ramp(1300, 700), 0.5, scratch=scratch, max_bytes=1000)
    assert len(calls) == 2
    assert not out.exists() or not any(out.iterdir())  # no file under any name
    assert not scratch.exists() or not any(scratch.iterdir())
    # an existing file under the final name is left as it was
    out.mkdir(exist_ok=True)
    (out / "p.ome.tif").write_bytes(b"old")
    calls.clear()
    with pytest.raises(RuntimeError, match="boom"):
        _write_ome(out / "p.ome.tif", _ramp(1300, 700), 0.5)
    assert [p.name for p in out.iterdir()] == ["p.ome.tif"]
    assert (out / "p.ome.tif").read_bytes() == b"old"


def test_ome_pyramid_tiff_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError):
        _write_ome(tmp_path / "x.ome.tif", np.zeros((10, 10), np.float32), 1.0)
    with pytest.raises(ValueError):
        _write_ome(tmp_path / "x.ome.tif", np.zeros((10, 10), np.uint8), 1.0, tile=100)
    assert not any(tmp_path.iterdir())


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of each chunk, checking every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, i = [], 8
    while i < len(data):
        (n,) = struct.unpack(">I", data[i : i + 4])
        kind, body = data[i + 4 : i + 8], data[i + 8 : i + 8 + n]
        (crc,) = struct.unpack(">I", data[i + 8 + n : i + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        i += 12 + n
    return chunks


def _stream_png(path, rows, **kw):
    with PngStream(path, rows.shape[1], rows.shape[0], channels=1, **kw) as png:
        png.write_rows(rows[:3])
        png.write_rows(rows[3:])
    return path


_PNG_WRITERS = {
    "write_png": lambda path, a, **kw: write_png(path, a, **kw),
    "write_png_rgb": lambda path, a, **kw: write_png(path, np.dstack([a, a, 255 - a]), **kw),
    "write_probability_png": lambda path, a, **kw: write_probability_png(path, a / 255.0, **kw),
    "write_probability_png_16": lambda path, a, **kw: write_probability_png(path, a, bits=16, **kw),
    "write_mask_png": lambda path, a, **kw: write_mask_png(path, a > 100, **kw),
    "PngStream": _stream_png,
    "write_qc_png": lambda path, a, **kw: write_qc_png(path, a, **kw),
    "write_qc_png_rgb": lambda path, a, **kw: write_qc_png(path, np.dstack([a, a, 255 - a]), **kw),
}


@pytest.mark.parametrize("writer", list(_PNG_WRITERS))
def test_pngs_record_their_resolution_in_phys(tmp_path, writer):
    write = _PNG_WRITERS[writer]
    image = _ramp(7, 11)
    plain = write(tmp_path / "plain.png", image)
    again = write(tmp_path / "again.png", image, mpp=None)
    with_mpp = write(tmp_path / "mpp.png", image, mpp=0.5)
    assert again.read_bytes() == plain.read_bytes()  # mpp=None: the bytes of a write without it
    kinds = [kind for kind, _ in _png_chunks(plain.read_bytes())]
    assert b"pHYs" not in kinds
    chunks = _png_chunks(with_mpp.read_bytes())
    kinds = [kind for kind, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds.count(b"pHYs") == 1
    assert kinds.index(b"pHYs") < kinds.index(b"IDAT")
    assert dict(chunks)[b"pHYs"] == struct.pack(">IIB", 2_000_000, 2_000_000, 1)
    with Image.open(with_mpp) as im, Image.open(plain) as ref:
        assert im.info["dpi"] == pytest.approx((25400 / 0.5, 25400 / 0.5))
        assert "dpi" not in ref.info
        np.testing.assert_array_equal(np.asarray(im), np.asarray(ref))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.png", "mpp.png", "plain.png"]


def test_png_phys_rounds_pixels_per_metre(tmp_path):
    path = write_mask_png(tmp_path / "m.png", np.ones((3, 3), bool), mpp=0.3)
    phys = dict(_png_chunks(path.read_bytes()))[b"pHYs"]
    assert struct.unpack(">IIB", phys) == (3_333_333, 3_333_333, 1)
    stream = _stream_png(tmp_path / "s.png", _ramp(5, 4), mpp=0.3)
    assert dict(_png_chunks(stream.read_bytes()))[b"pHYs"] == phys


@pytest.mark.parametrize("mpp", [0.0, -1.0, float("nan"), float("inf"), 1e9])
def test_png_writers_reject_a_bad_mpp(tmp_path, mpp):
    with pytest.raises(ValueError, match="mpp"):
        write_png(tmp_path / "a.png", np.zeros((2, 2), np.uint8), mpp=mpp)
    with pytest.raises(ValueError, match="mpp"):
        PngStream(tmp_path / "b.png", 2, 2, channels=1, mpp=mpp)
    assert not any(tmp_path.iterdir())


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
