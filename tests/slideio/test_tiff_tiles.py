"""The direct TIFF tile reader gives OpenSlide's pixels, or hands the read back to OpenSlide."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tifffile

from histo_wsl.errors import InputError
from histo_wsl.slideio.slide import open_slide, plan_read, read_patch, read_thumbnail
from histo_wsl.slideio.tiff_tiles import TILE_READER_ENV


def _openslide_only(path):
    """The same slide read by OpenSlide alone (the tile reader switched off for it)."""
    slide = open_slide(path)
    slide._tiles_state = "off"
    return slide


def _regions(slide, rng, n=40):
    """Random regions of every level: whole-pixel and between-pixel origins, edges, outside."""
    w0, h0 = slide.dimensions
    for level, ds in enumerate(slide.level_downsamples):
        for k in range(n):
            w, h = int(rng.integers(1, 400)), int(rng.integers(1, 400))
            x, y = int(rng.integers(-300, w0)), int(rng.integers(-300, h0))
            if k % 3:
                x, y = round(round(x / ds) * ds), round(round(y / ds) * ds)
            yield (x, y), level, (w, h)


def _same(a, b):
    return (
        a.mode == b.mode
        and a.size == b.size
        and np.array_equal(np.asarray(a), np.asarray(b))
        and a.info.get("icc_profile") == b.info.get("icc_profile")
    )


@pytest.fixture(scope="module")
def ycbcr_slide(tmp_path_factory, layout):
    """The synthetic layout as a two-level TIFF of YCbCr JPEG tiles with 2x2 chroma subsampling,
    as Aperio scanners write them, plus a zlib level."""
    from histo_wsl.synthetic.slides import render_region

    rgb = render_region(layout, 0, 0, 1024, 768, 1.0)
    half = rgb[::2, ::2].copy()
    path = tmp_path_factory.mktemp("ycbcr") / "ycbcr.tif"
    with tifffile.TiffWriter(path) as tw:
        common = {"tile": (240, 240), "resolution": (2e4, 2e4), "resolutionunit": "CENTIMETER"}
        tw.write(rgb, photometric="ycbcr", compression="jpeg", subsampling=(2, 2), **common)
        tw.write(half, photometric="rgb", compression="zlib", subfiletype=1, **common)
    return path


@pytest.mark.parametrize("which", ["synthetic_slide", "ycbcr_slide"])
def test_every_region_equals_openslide_s(which, request):
    path = request.getfixturevalue(which)
    rng = np.random.default_rng(7)
    with open_slide(path) as fast, _openslide_only(path) as ref:
        for location, level, size in _regions(fast, rng):
            assert _same(
                fast.read_region(location, level, size), ref.read_region(location, level, size)
            )
        assert fast.reader_record()["tiles"] == list(range(fast.level_count))
        assert ref.reader_record()["tiles"] == []


def test_windows_and_thumbnail_equal_openslide_s(synthetic_slide):
    with open_slide(synthetic_slide) as fast, _openslide_only(synthetic_slide) as ref:
        plan = plan_read(fast, mpp=1.57)
        for loc in [(0, 0), (1001, 333), (2777, 1888), (-50, 1900)]:
            a, b = read_patch(fast, plan, loc, (224, 224)), read_patch(ref, plan, loc, (224, 224))
            assert np.array_equal(np.asarray(a), np.asarray(b))
        assert np.array_equal(read_thumbnail(fast)[0], read_thumbnail(ref)[0])


def test_threads_reading_at_once_get_the_same_pixels(synthetic_slide):
    rng = np.random.default_rng(3)
    with open_slide(synthetic_slide) as fast, _openslide_only(synthetic_slide) as ref:
        asks = [r for r in _regions(fast, rng, n=30) if r[1] <= 1]
        want = [np.asarray(ref.read_region(*a)) for a in asks]
        fast._tile_reader().set_capacity(300_000)  # a small cache: tiles evicted while others read
        errors: list[str] = []

        def read(offset: int) -> None:
            for i in range(offset, len(asks), 4):
                if not np.array_equal(np.asarray(fast.read_region(*asks[i])), want[i]):
                    errors.append(f"region {i}")

        threads = [threading.Thread(target=read, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert fast._tile_reader()._cached_bytes <= 300_000


def test_a_level_whose_tiles_decode_otherwise_is_left_to_openslide(synthetic_slide, monkeypatch):
    with open_slide(synthetic_slide) as fast, _openslide_only(synthetic_slide) as ref:
        tiles = fast._tile_reader()
        decode = tiles.levels[1].decode
        monkeypatch.setattr(
            tiles.levels[1], "decode", lambda *a, **k: ((decode(*a, **k)[0] // 2),) + (None, None)
        )
        region = ((600, 400), 1, (300, 200))
        assert _same(fast.read_region(*region), ref.read_region(*region))
        assert fast.read_region((600, 400), 0, (64, 64)) is not None
        record = fast.reader_record()
        assert record["tiles"] == [0]
        assert "differs" in record["openslide"]["1"]
        assert _same(fast.read_region(*region), ref.read_region(*region))


def test_a_tile_cut_short_is_read_by_openslide_and_fails_as_it_does(tmp_path, synthetic_slide):
    """A JPEG tile without its end marker decodes silently in libjpeg-turbo; OpenSlide refuses it."""
    path = tmp_path / "cut.tif"
    data = bytearray(synthetic_slide.read_bytes())
    with tifffile.TiffFile(synthetic_slide) as tif:
        page = tif.pages[0]
        index = 5
        end = int(page.dataoffsets[index] + page.databytecounts[index])
        assert bytes(data[end - 2 : end]) == b"\xff\xd9"
        data[end - 2 : end] = b"\x00\x00"
        across = -(-page.shape[1] // page.tilewidth)
        x, y = (index % across) * page.tilewidth, (index // across) * page.tilelength
    path.write_bytes(bytes(data))
    for slide in (open_slide(path), _openslide_only(path)):
        with slide, pytest.raises(InputError, match="Premature end of JPEG"):
            slide.read_region((x, y), 0, (64, 64))


def test_the_environment_turns_it_off_and_other_formats_never_use_it(
    synthetic_slide, tmp_path, monkeypatch
):
    from PIL import Image

    monkeypatch.setenv(TILE_READER_ENV, "openslide")
    with open_slide(synthetic_slide) as slide:
        slide.read_region((0, 0), 0, (32, 32))
        assert slide.reader_record() == {"tiles": [], "openslide": f"{TILE_READER_ENV}=openslide"}
    monkeypatch.delenv(TILE_READER_ENV)
    png = tmp_path / "p.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(png)
    with open_slide(png) as image:
        assert image.reader_record() == {"image": True}


def test_a_real_svs_reads_as_openslide_reads_it(wsi_dir):
    path = wsi_dir / "cmu-1-small-region.svs"
    rng = np.random.default_rng(11)
    with open_slide(path) as fast, _openslide_only(path) as ref:
        for location, level, size in _regions(fast, rng, n=25):
            assert _same(
                fast.read_region(location, level, size), ref.read_region(location, level, size)
            )
        assert fast.reader_record()["tiles"] == [0]


def test_a_real_corrupt_svs_still_fails_with_openslide_s_error(wsi_dir):
    with (
        open_slide(wsi_dir / "unreadable.svs") as slide,
        pytest.raises(InputError, match="corrupt"),
    ):
        slide.read_region((0, 0), 0, (16, 16))


def _tiff_of_tiles(path, rgb, tile_bytes, compressionargs=None):
    """A one-level JPEG-tiled TIFF whose tiles' bytes are ``tile_bytes(tile array)``."""
    th = tw = 256
    h, w = rgb.shape[:2]
    tiles = (
        tile_bytes(rgb[y : y + th, x : x + tw]) for y in range(0, h, th) for x in range(0, w, tw)
    )
    with tifffile.TiffWriter(path) as tw_:
        tw_.write(
            data=tiles,
            shape=rgb.shape,
            dtype=np.uint8,
            tile=(th, tw),
            photometric="rgb",
            compression="jpeg",
            compressionargs=JPEG_RGB if compressionargs is None else compressionargs,
            subsampling=(1, 1),
            resolution=(2e4, 2e4),
            resolutionunit="CENTIMETER",
        )
    return path


#: RGB in, RGB JPEG out, no chroma subsampling: photometric RGB (as write_pyramid_tiff writes)
JPEG_RGB = {"level": 90, "colorspace": "RGB", "outcolorspace": "RGB", "subsampling": (1, 1)}


def _jpeg(tile):
    import imagecodecs

    return imagecodecs.jpeg8_encode(tile, **JPEG_RGB)


def test_jpeg_tiles_padded_after_their_end_marker_are_decoded(tmp_path, layout):
    from histo_wsl.synthetic.slides import render_region

    rgb = render_region(layout, 500, 300, 512, 512, 1.0)
    path = _tiff_of_tiles(tmp_path / "padded.tif", rgb, lambda t: _jpeg(t) + b"\x00" * 13)
    with open_slide(path) as fast, _openslide_only(path) as ref:
        region = ((100, 90), 0, (300, 280))
        assert _same(fast.read_region(*region), ref.read_region(*region))
        assert fast.reader_record()["tiles"] == [0]


def test_a_level_whose_tiles_never_decode_here_stops_being_checked(tmp_path, layout):
    from histo_wsl.slideio.tiff_tiles import MAX_FAILED_CHECKS
    from histo_wsl.synthetic.slides import render_region

    rgb = render_region(layout, 500, 300, 512, 512, 1.0)
    path = _tiff_of_tiles(tmp_path / "cut.tif", rgb, lambda t: _jpeg(t)[:-2])  # no end marker
    with open_slide(path) as slide:
        for _ in range(MAX_FAILED_CHECKS):
            with pytest.raises(InputError, match="Premature end of JPEG"):
                slide.read_region((10, 10), 0, (40, 40))
        record = slide.reader_record()
    assert record["tiles"] == [] and "could not be decoded" in record["openslide"]["0"]


def test_a_file_whose_tags_and_jpeg_disagree_is_read_as_openslide_reads_it(tmp_path, layout):
    """RGB JPEG tiles under a YCbCr photometric tag: tifffile and OpenSlide decode them apart."""
    from histo_wsl.synthetic.slides import render_region

    rgb = render_region(layout, 500, 300, 512, 512, 1.0)
    path = _tiff_of_tiles(tmp_path / "mixed.tif", rgb, _jpeg, compressionargs={})
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].photometric.name == "YCBCR"
    with open_slide(path) as fast, _openslide_only(path) as ref:
        for region in [((100, 90), 0, (300, 280)), ((0, 0), 0, (512, 512))]:
            assert _same(fast.read_region(*region), ref.read_region(*region))
        assert "differs" in fast.reader_record()["openslide"]["0"]


#: how each level of :func:`_uneven_tiff` is encoded: JPEG (as write_pyramid_tiff) or zlib
JPEG_LEVEL = {"compression": "jpeg", "compressionargs": JPEG_RGB, "subsampling": (1, 1)}
ZLIB_LEVEL = {"compression": "zlib"}


def _uneven_tiff(path, layout, level0=JPEG_LEVEL, level1=JPEG_LEVEL):
    """1001 x 751 px with a 500 x 375 level: downsample 2.0023, as scanners' pyramids have."""
    from histo_wsl.synthetic.slides import render_region

    common = {"tile": (256, 256), "photometric": "rgb", "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            render_region(layout, 0, 0, 1001, 751, 1.0),
            resolution=(2e4, 2e4),
            **common,
            **level0,
        )
        tw.write(
            render_region(layout, 0, 0, 500, 375, 1001 / 500),
            resolution=(1e4, 1e4),
            subfiletype=1,
            **common,
            **level1,
        )
    return path


def test_a_level_with_an_uneven_downsample_is_read_at_its_own_whole_pixels(tmp_path, layout):
    """A level of 500 x 375 px under 1001 x 751 (downsample 2.0023, as scanners' pyramids have):
    a window's whole pixels of it have no level-0 location, so they are read in its own grid,
    checked at its origin tile and, encoded alike, at level 0 under the window."""
    import math

    from PIL import Image

    from histo_wsl.slideio.slide import RESAMPLE

    path = _uneven_tiff(tmp_path / "uneven.tif", layout)
    level1 = tifffile.imread(path, key=1)
    with open_slide(path) as fast, _openslide_only(path) as ref:
        ds = fast.level_downsamples[1]
        assert ds != 2.0
        plan = plan_read(fast, mpp=1.2)
        assert plan.level == 1
        for loc in [(0, 0), (301, 207), (640, 480)]:
            got = np.asarray(read_patch(fast, plan, loc, (64, 64)))
            x, y = loc[0] / ds, loc[1] / ds
            ix, iy = math.floor(x), math.floor(y)
            bw = 64 * plan.scale / ds
            rw = math.ceil(x - ix + bw)
            pad = np.full((rw, rw, 3), 255, np.uint8)
            part = level1[iy : iy + rw, ix : ix + rw]
            pad[: part.shape[0], : part.shape[1]] = part
            box = (x - ix, y - iy, x - ix + bw, y - iy + bw)
            want = Image.fromarray(pad).resize((64, 64), RESAMPLE, box=box)
            assert np.array_equal(got, np.asarray(want))
        # at the origin OpenSlide paints whole pixels too, and gives the same window
        origin = read_patch(ref, plan, (0, 0), (64, 64))
        assert np.array_equal(
            np.asarray(origin), np.asarray(read_patch(fast, plan, (0, 0), (64, 64)))
        )
        record = fast.reader_record()
    assert record["tiles"] == [0, 1] and record["reads"]["1"] == {"tiles": 4, "openslide": 0}


def test_an_uneven_level_encoded_unlike_level_0_is_left_to_openslide(tmp_path, layout):
    path = _uneven_tiff(tmp_path / "mixed-levels.tif", layout, level0=ZLIB_LEVEL)
    with open_slide(path) as fast, _openslide_only(path) as ref:
        plan = plan_read(fast, mpp=1.2)
        a = read_patch(fast, plan, (301, 207), (64, 64))
        b = read_patch(ref, plan, (301, 207), (64, 64))
        assert np.array_equal(np.asarray(a), np.asarray(b))  # OpenSlide's, shift included
        record = fast.reader_record()
    assert "encoded otherwise" in record["openslide"]["1"]
