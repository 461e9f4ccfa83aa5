import numpy as np
import pytest
from PIL import Image

from histo_wsl.errors import InputError
from histo_wsl.slideio.slide import open_slide, plan_read, read_patch, read_thumbnail


def test_open_pyramid_reads_geometry_and_mpp(synthetic_slide, layout):
    with open_slide(synthetic_slide) as s:
        assert s.dimensions == (3000, 2000)
        assert s.level_count >= 3
        assert s.level_downsamples[1] == pytest.approx(2.0, rel=1e-3)
        assert s.mpp == pytest.approx(layout.mpp, rel=1e-6)
        assert s.mpp_source == "metadata"
        assert s.vendor == "generic-tiff"
        info = s.info()
        assert info["levels"][1]["mpp"] == pytest.approx(1.0, rel=1e-3)


def test_mpp_override_wins(synthetic_slide):
    with open_slide(synthetic_slide, mpp=0.25) as s:
        assert s.mpp == 0.25 and s.mpp_source == "override"


@pytest.mark.parametrize(
    ("mpp", "level", "scale", "resize"),
    [
        (0.5, 0, 1.0, False),
        (0.502, 0, 1.0, False),
        (1.0, 1, 2.0, False),
        (1.5, 1, 3.0, True),
        (0.25, 0, 0.5, True),
        (2.0, 2, 4.0, False),
    ],
)
def test_plan_picks_nearest_level_at_or_finer(synthetic_slide, mpp, level, scale, resize):
    with open_slide(synthetic_slide) as s:
        plan = plan_read(s, mpp=mpp)
    assert plan.level == level
    assert plan.scale == pytest.approx(scale, rel=1e-3)
    assert plan.resize is resize
    assert plan.mpp == pytest.approx(0.5 * scale, rel=1e-3)


def test_read_patch_matches_rendering(synthetic_slide, layout):
    from histo_wsl.synthetic.slides import render_region

    sec = layout.sections[0]
    x, y = int(sec.cx) - 200, int(sec.cy) - 200
    with open_slide(synthetic_slide) as s:
        for mpp, ds in ((0.5, 1.0), (1.0, 2.0), (1.5, 3.0)):
            patch = read_patch(s, plan_read(s, mpp=mpp), (x, y), (128, 128))
            assert patch.size == (128, 128) and patch.mode == "RGB"
            truth = render_region(layout, x, y, 128, 128, downsample=ds).astype(float)
            # JPEG tiles and resampling blur the texture; the mean colour must agree closely
            assert np.abs(np.asarray(patch, float).mean((0, 1)) - truth.mean((0, 1))).max() < 12


def test_a_resampled_patch_is_filtered_as_training_images_are(synthetic_slide, layout):
    """Windows read between levels are resized as training resizes its images (PIL bilinear)."""
    from histo_wsl.slideio.slide import RESAMPLE

    sec = layout.sections[0]
    x, y = (int(sec.cx) - 200) // 2 * 2, (int(sec.cy) - 200) // 2 * 2  # whole level-1 pixels
    with open_slide(synthetic_slide) as s:
        plan = plan_read(s, mpp=1.5)  # level 1, resized by 1.5
        assert plan.resize
        patch = read_patch(s, plan, (x, y), (100, 100))
        region = s.read_region((x, y), plan.level, (150, 150))
    assert RESAMPLE == Image.Resampling.BILINEAR
    want = region.resize((100, 100), Image.Resampling.BILINEAR)
    assert np.array_equal(np.asarray(patch), np.asarray(want))


def test_a_patch_between_level_pixels_is_shifted_in_the_one_resampling(synthetic_slide, layout):
    """OpenSlide is asked for whole pixels of the level; the fraction goes into the resize."""
    sec = layout.sections[0]
    x, y = (int(sec.cx) - 200) // 2 * 2 + 1, (int(sec.cy) - 200) // 2 * 2 + 1  # odd: ½ px
    with open_slide(synthetic_slide) as s:
        asked = []
        read = s.read_level_region

        def spy(level, ix, iy, size):
            asked.append((level, ix, iy, size))
            return read(level, ix, iy, size)

        s.read_level_region = spy
        for mpp in (1.5, 1.0):  # level 1 resized, and level 1 as it is
            plan = plan_read(s, mpp=mpp)
            patch = read_patch(s, plan, (x, y), (100, 100))
            assert patch.size == (100, 100)
            factor = plan.scale / 2.0
            region = s.read_region((x - 1, y - 1), 1, asked[-1][3])
            box = (0.5, 0.5, 0.5 + 100 * factor, 0.5 + 100 * factor)
            want = region.resize((100, 100), Image.Resampling.BILINEAR, box=box)
            assert np.array_equal(np.asarray(patch), np.asarray(want))
    # the whole pixel of level 1 under (x, y), in the level's own grid
    assert [a[:3] for a in asked] == [(1, (x - 1) // 2, (y - 1) // 2)] * 2
    assert [a[3] for a in asked] == [(151, 151), (101, 101)]


def test_outside_the_slide_is_white(synthetic_slide):
    with open_slide(synthetic_slide) as s:
        patch = np.asarray(s.read_region((2990, 1990), 0, (40, 40)))
    assert patch[20:, 20:].min() == 255


def test_mpp_request_on_slide_without_mpp_names_the_flag(synthetic_slide_no_mpp):
    with open_slide(synthetic_slide_no_mpp) as s:
        assert s.mpp is None and s.mpp_source == "none"
        with pytest.raises(InputError, match="--slide-mpp") as err:
            plan_read(s, mpp=0.5)
        assert str(synthetic_slide_no_mpp) in str(err.value)
        plan = plan_read(s, level=1)  # by level it works without mpp
        assert plan.scale == pytest.approx(2.0, rel=1e-3) and plan.mpp is None


def test_missing_level_is_an_input_error(synthetic_slide):
    with open_slide(synthetic_slide) as s, pytest.raises(InputError, match="--level 9"):
        plan_read(s, level=9)


def test_plain_image_is_a_single_level_slide(tmp_path):
    rgb = np.full((60, 80, 3), 200, np.uint8)
    rgb[10:20, 30:50] = (120, 40, 90)
    path = tmp_path / "img.png"
    Image.fromarray(rgb).save(path)
    with open_slide(path) as s:
        assert s.vendor == "image" and s.dimensions == (80, 60) and s.level_count == 1
        assert s.mpp is None
        assert np.array_equal(np.asarray(s.read_region((30, 10), 0, (20, 10))), rgb[10:20, 30:50])
        edge = np.asarray(s.read_region((70, 50), 0, (20, 20)))
        assert (
            edge[:10, :10].tolist() == rgb[50:60, 70:80].tolist()
            and edge[15, 15].tolist() == [255] * 3
        )
    with open_slide(path, mpp=0.62) as s:
        assert s.mpp == 0.62


def test_placeholder_dpi_is_not_taken_as_resolution(tmp_path):
    path = tmp_path / "dpi72.png"
    Image.new("RGB", (32, 32), "white").save(path, dpi=(72, 72))
    with open_slide(path) as s:
        assert s.mpp is None
        assert any("72 dpi" in n for n in s.notes)


def test_not_a_slide_is_refused_clearly(not_a_slide):
    with pytest.raises(InputError, match="not a slide or image") as err:
        open_slide(not_a_slide)
    assert str(not_a_slide) in str(err.value)


def test_truncated_slide_fails_with_a_clear_error(corrupt_slide):
    with pytest.raises(InputError, match="corrupt|truncated") as err:
        with open_slide(corrupt_slide) as s:
            read_thumbnail(s)
            for y in range(0, 2000, 256):
                for x in range(0, 3000, 256):
                    s.read_region((x, y), 0, (256, 256))
    assert str(corrupt_slide) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        open_slide(tmp_path / "nope.svs")


def test_thumbnail_resolution_and_content(synthetic_slide, layout):
    with open_slide(synthetic_slide) as s:
        thumb, ds = read_thumbnail(s, mpp=8.0, min_size=64)
    assert ds == pytest.approx(16.0, rel=1e-3)
    assert thumb.shape == (125, 188, 3)
    sec = layout.sections[layout.faint.index(False)]
    cy, cx = int(sec.cy / ds), int(sec.cx / ds)
    centre = thumb[cy - 3 : cy + 4, cx - 3 : cx + 4].reshape(-1, 3).mean(0)
    assert centre.max() - centre.min() > 30  # saturated (stained), not glass
    assert thumb[1, 1].min() > 200  # glass in the corner


def test_thumbnail_min_size_keeps_small_slides_detailed(synthetic_slide):
    with open_slide(synthetic_slide) as s:
        thumb, ds = read_thumbnail(s, mpp=8.0, min_size=1024)
    assert max(thumb.shape[:2]) >= 1000 and ds < 3.0


@pytest.mark.parametrize(
    "name",
    ["cmu-1-small-region.svs", "test3-DAPI-2-(387).ndpi", "boxes.tiff", "boxes_0.dcm", "small.svs"],
)
def test_real_slides_open_and_read(wsi_dir, name):
    with open_slide(wsi_dir / name) as s:
        thumb, _ = read_thumbnail(s)
        assert thumb.ndim == 3 and thumb.dtype == np.uint8
        assert s.info()["width"] == s.dimensions[0]


def test_real_slide_metadata(wsi_dir):
    with open_slide(wsi_dir / "cmu-1-small-region.svs") as s:
        assert s.vendor == "aperio" and s.dimensions == (2220, 2967)
        assert s.mpp == pytest.approx(0.499) and s.objective_power == 20
        assert set(s.associated_images) == {"label", "macro", "thumbnail"}
    with open_slide(wsi_dir / "boxes.tiff") as s:  # 72-dpi-like tags are no scan resolution
        assert s.mpp is None and s.notes


def test_real_plain_tiff_is_read_as_image(wsi_dir):
    with open_slide(wsi_dir / "kidney-48-5.tif") as s:
        assert s.vendor == "image" and s.dimensions == (1493, 901)


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("broken.svs", "not a slide"),
        ("unopenable.tiff", "cannot open"),
        ("unreadable.svs", "corrupt"),
    ],
)
def test_real_broken_files(wsi_dir, name, pattern):
    with pytest.raises(InputError, match=pattern) as err:
        with open_slide(wsi_dir / name) as s:
            read_thumbnail(s)
    assert name in str(err.value)


def test_thumbnail_rows_equal_the_whole_thumbnail(synthetic_slide, synthetic_slide_no_mpp):
    from histo_wsl.slideio.slide import read_thumbnail_rows, thumbnail_geometry

    for path in (synthetic_slide, synthetic_slide_no_mpp):
        with open_slide(path) as s:
            whole, ds = read_thumbnail(s)
            geometry = thumbnail_geometry(s)
            assert geometry.shape == whole.shape[:2] and geometry.downsample == ds
            for y0, y1 in ((0, 7), (5, 300), (250, 10_000), (-3, 2)):
                rows = read_thumbnail_rows(s, geometry, y0, y1)
                np.testing.assert_array_equal(rows, whole[max(0, y0) : y1])


def test_a_slide_cut_short_is_called_truncated_not_foreign(tmp_path, synthetic_slide, not_a_slide):
    """Issue 26, item 1: an interrupted copy of a slide is named as such, with the fix."""
    data = synthetic_slide.read_bytes()
    cut = tmp_path / "case.svs"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="looks truncated or corrupt.*copy it again"):
        open_slide(cut)
    with pytest.raises(InputError, match="not a slide or image"):
        open_slide(not_a_slide)


def test_a_real_svs_cut_at_90_percent_is_called_truncated(tmp_path, wsi_dir):
    data = (wsi_dir / "cmu-1-small-region.svs").read_bytes()
    cut = tmp_path / "cmu-1-cut.svs"
    cut.write_bytes(data[: int(len(data) * 0.9)])
    with pytest.raises(InputError, match="looks truncated or corrupt"):
        open_slide(cut)


@pytest.mark.parametrize("top", [65535, 4095])
def test_a_16_bit_greyscale_tiff_keeps_its_contrast(tmp_path, top):
    """Issue 26, item 7: 16-bit (and 12-bit-in-16) greyscale was read as an all-white picture."""
    import tifffile

    arr = np.full((200, 300), top, dtype=np.uint16)  # bright glass
    arr[50:150, 80:220] = top // 4  # dark tissue
    path = tmp_path / "grey16.tif"
    tifffile.imwrite(path, arr)
    slide = open_slide(path, mpp=1.0)
    rgb = np.asarray(slide.read_region((0, 0), 0, (300, 200)))
    assert rgb.shape == (200, 300, 3)
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert abs(int(rgb[100, 150, 0]) - 64) <= 1  # a quarter of the range, not clipped to white
    assert any("scaled to 8-bit" in n for n in slide.notes)


def test_a_qptiff_and_other_foreign_tiffs_are_named_for_what_they_are(tmp_path):
    """Issue 26: a QPTIFF (multiplex fluorescence) was refused as 'not a TIFF'."""
    import tifffile

    path = tmp_path / "panel.qptiff"
    rng = np.random.default_rng(0)
    with tifffile.TiffWriter(path) as tw:
        for _ in range(3):  # one 16-bit page per fluorescence channel, as Akoya scanners write
            tw.write(
                (rng.random((300, 400)) * 4000).astype(np.uint16),
                photometric="minisblack",
                software="PerkinElmer-QPI",
            )
    with pytest.raises(InputError) as err:
        open_slide(path)
    msg = str(err.value)
    assert "is a QPTIFF (Akoya/PerkinElmer multiplex image)" in msg and "16-bit" in msg
    assert "brightfield RGB" in msg and "truncated" not in msg
    # the same file cut short is still called truncated
    cut = tmp_path / "cut.qptiff"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match="looks truncated or corrupt"):
        open_slide(cut)


def test_a_dicom_missing_an_attribute_is_called_incomplete_not_corrupt(tmp_path, wsi_dir):
    """Issue 26: a DICOM WSI lacking one attribute was called corrupt."""
    for name in ("boxes_0.dcm", "boxes_1.dcm"):  # TotalPixelMatrixColumns (0048,0006) renamed
        data = (wsi_dir / name).read_bytes()
        (tmp_path / name).write_bytes(data.replace(b"\x48\x00\x06\x00", b"\x48\x00\x05\x00", 1))
    with pytest.raises(InputError) as err:
        open_slide(tmp_path / "boxes_0.dcm")
    msg = str(err.value)
    assert "not a complete DICOM whole-slide image" in msg and "corrupt" not in msg
    assert "level dimensions" in msg  # OpenSlide's own reason is kept
