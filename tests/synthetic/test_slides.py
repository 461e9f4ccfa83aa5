import numpy as np
import pytest
from PIL import Image

from histo_wsl.errors import InputError
from histo_wsl.synthetic.slides import (
    gland_mask_region,
    make_layout,
    pyramid_level_sizes,
    render_region,
    tissue_mask_region,
    write_image_with_mask,
    write_pyramid_tiff,
)


@pytest.fixture(scope="module")
def small_layout():
    """A 1200x900 px layout at 0.5 µm/px, two sections, none faint."""
    return make_layout(1200, 900, mpp=0.5, n_sections=2, glands_per_section=4, seed=4)


def test_make_layout_is_deterministic_per_seed():
    kw = {"mpp": 0.5, "n_sections": 3, "glands_per_section": 5, "faint_sections": 1}
    a = make_layout(4000, 3000, seed=7, **kw)
    assert a == make_layout(4000, 3000, seed=7, **kw)
    b = make_layout(4000, 3000, seed=8, **kw)
    assert a.sections != b.sections and a.glands != b.glands
    assert a.seed == 7 and a.mpp == 0.5 and (a.width, a.height) == (4000, 3000)
    assert len(a.sections) == 3 and len(a.glands) == 15 and sum(a.faint) == 1
    # sections lie on the slide and apart; each gland lies inside its section
    for s in a.sections:
        x0, y0, x1, y1 = s.bbox
        assert 0 < x0 and 0 < y0 and x1 < a.width and y1 < a.height
    boxes = [s.bbox for s in a.sections]
    for i, p in enumerate(boxes):
        for q in boxes[i + 1 :]:
            assert p[2] <= q[0] or q[2] <= p[0] or p[3] <= q[1] or q[3] <= p[1]
    theta = np.linspace(0, 2 * np.pi, 32)
    for gi, g in enumerate(a.glands):
        sec = a.sections[a.gland_section(gi)]
        assert sec.contains(g.cx + g.rx * np.cos(theta), g.cy + g.ry * np.sin(theta)).all()


def test_make_layout_rejects_impossible_requests():
    with pytest.raises(InputError, match="too small"):
        make_layout(32, 100)
    with pytest.raises(InputError, match="faint_sections"):
        make_layout(1000, 1000, n_sections=1, faint_sections=2)
    with pytest.raises(InputError, match="mpp"):
        make_layout(1000, 1000, mpp=0)
    empty = make_layout(500, 400, n_sections=0)
    assert empty.sections == () and empty.glands == ()
    assert not tissue_mask_region(empty, 0, 0, 50, 40, 10).any()


def test_rendering_is_deterministic_and_seamless(small_layout):
    whole = render_region(small_layout, 100, 50, 300, 200)
    assert whole.shape == (200, 300, 3) and whole.dtype == np.uint8
    assert np.array_equal(whole, render_region(small_layout, 100, 50, 300, 200))
    # tiles rendered separately join up exactly, at level 0 and at a downsample
    tiles = np.concatenate(
        [
            np.concatenate(
                [render_region(small_layout, 100 + x, 50 + y, 100, 100) for x in (0, 100, 200)],
                axis=1,
            )
            for y in (0, 100)
        ]
    )
    assert np.array_equal(tiles, whole)
    half = render_region(small_layout, 0, 0, 300, 200, 2)
    left = render_region(small_layout, 0, 0, 150, 200, 2)
    right = render_region(small_layout, 300, 0, 150, 200, 2)
    assert np.array_equal(np.concatenate([left, right], axis=1), half)
    # outside the slide is white
    out = render_region(small_layout, 1100, 850, 200, 100)
    assert (out[:, 100:] == 255).all() and (out[50:] == 255).all()


def test_tissue_mask_matches_where_the_render_is_not_glass(small_layout):
    for ds in (1, 2, 4):
        w, h = small_layout.width // ds, small_layout.height // ds
        img = render_region(small_layout, 0, 0, w, h, ds)
        tissue = tissue_mask_region(small_layout, 0, 0, w, h, ds)
        glands = gland_mask_region(small_layout, 0, 0, w, h, ds)
        assert tissue.shape == glands.shape == (h, w)
        assert 0.2 < tissue.mean() < 0.8 and glands.any()
        assert not (glands & ~tissue).any()  # glands lie in tissue
        # glass is near-white (min channel >= 237); stained tissue, pale lumen included, is darker
        assert np.array_equal(img.min(axis=2) < 236, tissue), ds
    # pixel centres decide: the mask of a region at downsample d is the level-0 mask sampled at
    # the centres of its pixels
    fine = tissue_mask_region(small_layout, 0, 0, 1200, 900)
    coarse = tissue_mask_region(small_layout, 0, 0, 400, 300, 3)
    assert np.array_equal(coarse, fine[1::3, 1::3])


def test_faint_sections_are_pale():
    lay = make_layout(1200, 900, mpp=0.5, n_sections=2, faint_sections=1, seed=4)
    img = render_region(lay, 0, 0, 300, 225, 4).astype(float)
    sat = img.max(axis=2) - img.min(axis=2)
    gx = (np.arange(300) + 0.5) * 4
    gy = (np.arange(225) + 0.5) * 4
    means = [sat[s.contains(gx[None, :], gy[:, None])].mean() for s in lay.sections]
    faint, strong = (means[i] for i in np.argsort([not f for f in lay.faint]))
    assert faint < strong / 2 and faint > 5


@pytest.mark.parametrize(
    ("size", "min_level", "expected"),
    [
        ((1200, 900), 200, [(1200, 900), (600, 450), (300, 225), (150, 113)]),
        ((500, 300), 512, [(500, 300)]),
        ((1025, 10), 512, [(1025, 10), (513, 5), (257, 3)]),
    ],
)
def test_pyramid_level_sizes(size, min_level, expected):
    assert pyramid_level_sizes(*size, min_level) == expected


def test_pyramid_tiff_opens_with_openslide(tmp_path, small_layout):
    import openslide

    path = tmp_path / "not" / "yet" / "there" / "slide.tif"
    assert write_pyramid_tiff(path, small_layout, tile=128, min_level_size=200) == path
    assert sorted(p.name for p in path.parent.iterdir()) == ["slide.tif"]  # no temporary left
    with openslide.OpenSlide(str(path)) as s:
        assert s.level_dimensions == ((1200, 900), (600, 450), (300, 225), (150, 113))
        assert s.level_downsamples[1] == pytest.approx(2.0)
        assert s.level_downsamples[2] == pytest.approx(4.0)
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(small_layout.mpp)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(small_layout.mpp)
        assert s.properties["openslide.level[0].tile-width"] == "128"
        # JPEG tiles: the level-0 pixels agree with the rendering up to compression error
        x, y = int(small_layout.sections[0].cx) - 100, int(small_layout.sections[0].cy) - 75
        got = np.asarray(s.read_region((x, y), 0, (200, 150)).convert("RGB"), dtype=float)
        truth = render_region(small_layout, x, y, 200, 150).astype(float)
        assert np.abs(got - truth).mean() < 8
        got = np.asarray(s.read_region((x, y), 1, (100, 75)).convert("RGB"), dtype=float)
        truth = render_region(small_layout, x, y, 100, 75, 2).astype(float)
        assert np.abs(got - truth).mean() < 8


def test_pyramid_tiff_lossless_and_without_mpp(tmp_path, small_layout):
    import openslide

    path = write_pyramid_tiff(
        tmp_path / "zlib.tif",
        small_layout,
        tile=128,
        min_level_size=300,
        compression="zlib",
        mpp_tags=False,
        workers=1,
    )
    with openslide.OpenSlide(str(path)) as s:
        assert "openslide.mpp-x" not in s.properties and "openslide.mpp-y" not in s.properties
        assert s.level_count == 3
        # lossless tiles: every level is exactly the rendering at its downsample
        for level, ds in ((0, 1), (1, 2), (2, 4)):
            got = np.asarray(s.read_region((240, 160), level, (96, 80)).convert("RGB"))
            assert np.array_equal(got, render_region(small_layout, 240, 160, 96, 80, ds)), level


def test_pyramid_tiff_other_mpp_and_bad_arguments(tmp_path):
    import openslide

    lay = make_layout(640, 512, mpp=0.25, n_sections=1, glands_per_section=2, seed=1)
    path = write_pyramid_tiff(tmp_path / "a.tiff", lay, tile=64, min_level_size=128)
    with openslide.OpenSlide(str(path)) as s:
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert s.level_count == 4
    for kwargs, message in (
        ({"tile": 100}, "multiple of 16"),
        ({"compression": "lzw"}, "unknown compression"),
        ({"quality": 0}, "quality"),
    ):
        with pytest.raises(InputError, match=message):
            write_pyramid_tiff(tmp_path / "bad.tif", lay, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tiff"]


def test_write_image_with_mask(tmp_path):
    lay = make_layout(320, 240, mpp=0.5, n_sections=1, glands_per_section=3, seed=2)
    img_path, mask_path = write_image_with_mask(tmp_path / "new", "case1", lay)
    assert img_path == tmp_path / "new" / "case1.png"
    assert mask_path == tmp_path / "new" / "case1_mask.png"
    img, mask = Image.open(img_path), Image.open(mask_path)
    assert img.size == mask.size == (320, 240)
    assert img.mode == "RGB" and mask.mode == "L"
    assert np.array_equal(np.asarray(img), render_region(lay, 0, 0, 320, 240))
    m = np.asarray(mask)
    assert set(np.unique(m).tolist()) == {0, 255}
    assert np.array_equal(m == 255, gland_mask_region(lay, 0, 0, 320, 240))
    big = make_layout(9000, 8000, n_sections=1, glands_per_section=1)
    with pytest.raises(InputError, match="too large"):
        write_image_with_mask(tmp_path, "big", big)
