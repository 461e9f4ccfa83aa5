import json

import cv2
import numpy as np
import pytest

from histo_wsl.errors import InputError
from histo_wsl.synthetic.slides import make_layout, render_region, tissue_mask_region
from histo_wsl.tissue.detect import (
    PackedMask,
    TissueFractionMap,
    TissueParams,
    detect_tissue,
    detect_tissue_strips,
    draw_tissue,
    geojson_to_mask,
    mask_to_geojson,
    otsu_from_histogram,
    otsu_threshold,
    read_geojson,
    tissue_fraction_map,
    write_geojson,
)

PINK = (215, 120, 180)  # H&E-like stained tissue
FAINT = (228, 205, 220)  # very pale tissue (HSV saturation about 27)


def _glass(h, w, rng, level=241.0, noise=2.0):
    return np.clip(rng.normal(level, noise, (h, w, 3)), 0, 255).astype(np.uint8)


def _paint(img, rows, cols, rgb, rng, noise=4.0):
    region = img[rows, cols]
    img[rows, cols] = np.clip(np.asarray(rgb) + rng.normal(0, noise, region.shape), 0, 255).astype(
        np.uint8
    )


def _iou(a, b):
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def _components(mask):
    return cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1


# -- detection ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "n_sections", "faint"), [(3, 2, 1), (11, 4, 2), (5, 3, 3)])
def test_finds_separate_and_faint_sections_of_a_synthetic_slide(seed, n_sections, faint):
    lay = make_layout(
        8000,
        6000,
        mpp=0.5,
        n_sections=n_sections,
        faint_sections=faint,
        seed=seed,
        glands_per_section=4,
    )
    ds = 16  # an 8 µm/px thumbnail
    w, h = lay.width // ds, lay.height // ds
    thumb = render_region(lay, 0, 0, w, h, ds)
    truth = tissue_mask_region(lay, 0, 0, w, h, ds)
    mask = detect_tissue(thumb, lay.mpp * ds)
    assert mask.shape == truth.shape and mask.dtype == bool
    assert _iou(mask, truth) > 0.9
    assert _components(mask) == n_sections
    # every section is found on its own, the faint ones too
    gx = (np.arange(w) + 0.5) * ds
    gy = (np.arange(h) + 0.5) * ds
    for sec, is_faint in zip(lay.sections, lay.faint, strict=True):
        inside = sec.contains(gx[None, :], gy[:, None])
        assert mask[inside].mean() > 0.9, (sec, is_faint)
    assert sum(lay.faint) == faint


def test_faint_tissue_beside_strongly_stained_tissue_is_kept():
    rng = np.random.default_rng(0)
    img = _glass(240, 320, rng)
    _paint(img, slice(40, 200), slice(20, 140), (200, 60, 150), rng)  # dark, very saturated
    _paint(img, slice(40, 200), slice(180, 300), FAINT, rng, noise=3)
    mask = detect_tissue(img, 8.0)
    assert mask[40:200, 20:140].mean() > 0.95
    assert mask[40:200, 180:300].mean() > 0.95
    outside = mask.copy()
    outside[40:200, 20:140] = outside[40:200, 180:300] = False
    assert not outside.any()


def test_tissue_mask_is_not_shifted():
    # a solid square comes out where it is (an even-sized closing disc used to shift it 1 px)
    img = np.full((100, 100, 3), 241, np.uint8)
    img[20:60, 30:70] = PINK
    for mpp in (6.0, 8.0, 12.0, 16.0):  # closing discs of 8, 6, 4 and 3 px
        ys, xs = np.nonzero(detect_tissue(img, mpp))
        assert (ys.min(), ys.max(), xs.min(), xs.max()) == (20, 59, 30, 69), mpp


@pytest.mark.parametrize(
    "kind", ["glass", "white", "black", "grey", "tinted glass", "pale grey noise"]
)
def test_images_without_tissue_give_an_empty_mask(kind):
    rng = np.random.default_rng(1)
    img = {
        "glass": lambda: _glass(150, 200, rng),
        "white": lambda: np.full((150, 200, 3), 255, np.uint8),
        "black": lambda: np.zeros((150, 200, 3), np.uint8),
        "grey": lambda: np.full((150, 200, 3), 128, np.uint8),
        "tinted glass": lambda: np.clip(rng.normal((236, 238, 246), 2, (150, 200, 3)), 0, 255),
        "pale grey noise": lambda: _glass(150, 200, rng, level=215, noise=6),
    }[kind]().astype(np.uint8)
    mask = detect_tissue(img, 8.0)
    assert mask.shape == (150, 200) and mask.dtype == bool and not mask.any()


def test_a_black_frame_is_not_tissue():
    rng = np.random.default_rng(2)
    img = _glass(240, 320, rng)
    frame = np.zeros((240, 320), bool)
    frame[:20] = frame[-20:] = frame[:, :25] = frame[:, -25:] = True
    # scanner margins: near-black noise, whose HSV saturation is high
    img[frame] = rng.integers(0, 30, (int(frame.sum()), 3), dtype=np.uint8)
    _paint(img, slice(80, 160), slice(100, 220), PINK, rng)
    mask = detect_tissue(img, 8.0)
    assert not mask[frame].any()
    assert mask[80:160, 100:220].mean() > 0.95
    assert _components(mask) == 1
    # tissue touching the frame stops at it
    _paint(img, slice(20, 100), slice(25, 90), PINK, rng)
    mask = detect_tissue(img, 8.0)
    assert not mask[frame].any() and mask[20:100, 25:90].mean() > 0.95


def test_glass_edges_are_not_tissue():
    rng = np.random.default_rng(3)
    img = _glass(240, 320, rng)
    img[:, 40:43] = (90, 90, 95)  # thin dark-grey line (edge of the cover slip)
    _paint(img, slice(None), slice(150, 165), (110, 110, 116), rng, noise=3)  # greyish band
    img[:, 280:300] = (237, 236, 255)  # bright, slightly blue slide edge (saturation 19)
    _paint(img, slice(80, 160), slice(60, 130), PINK, rng)
    mask = detect_tissue(img, 8.0)
    assert not mask[:, 35:50].any()
    assert not mask[:, 145:170].any()
    assert not mask[:, 275:305].any()
    assert mask[80:160, 60:130].mean() > 0.95


def _size_test_image():
    """Separate pink squares (sides 10, 20, 32, 56) and a pink block with square holes of the same
    sides; solid colours, so the only size change is the 3x3 median removing 4 corner pixels."""
    img = np.full((400, 420, 3), 242, np.uint8)
    squares = {10: (10, 10), 20: (10, 40), 32: (10, 80), 56: (10, 130)}
    for side, (r, c) in squares.items():
        img[r : r + side, c : c + side] = PINK
    img[100:380, 20:400] = PINK
    holes = {10: (130, 60), 20: (130, 120), 32: (130, 200), 56: (200, 280)}
    for side, (r, c) in holes.items():
        img[r : r + side, c : c + side] = 242
    return img, squares, holes


@pytest.mark.parametrize(
    ("mpp", "kept_objects", "filled_holes"),
    [
        # objects are dropped below 40000 µm², holes filled below 36100 µm²; a square of side s
        # covers s² - 4 px after the median filter, and 1 px is mpp² µm²
        (4.0, {56}, {10, 20, 32}),  # thresholds 2500 px (objects), 2256 px (holes)
        (8.0, {32, 56}, {10, 20}),  # 625 px, 564 px
        (16.0, {20, 32, 56}, {10}),  # 156 px, 141 px
    ],
)
def test_size_filters_are_physical_and_follow_mpp(mpp, kept_objects, filled_holes):
    img, squares, holes = _size_test_image()
    params = TissueParams(median_um=0, closing_um=0)
    mask = detect_tissue(img, mpp, params)
    for side, (r, c) in squares.items():
        found = mask[r : r + side, c : c + side].mean()
        assert (found > 0.9) == (side in kept_objects), (side, found)
    for side, (r, c) in holes.items():
        filled = mask[r : r + side, c : c + side].mean()
        assert (filled > 0.9) == (side in filled_holes), (side, filled)
        if side not in filled_holes:
            assert filled < 0.1
    # the threshold is in pixels only through mpp: the same sizes in µm² at twice the mpp give the
    # same result as a quarter of the µm² at this mpp
    twice = detect_tissue(
        img,
        2 * mpp,
        TissueParams(median_um=0, closing_um=0, min_object_um2=160_000, min_hole_um2=144_400),
    )
    assert np.array_equal(twice, mask)


def test_zero_sizes_keep_specks_and_holes():
    img, squares, holes = _size_test_image()
    mask = detect_tissue(img, 8.0, TissueParams(min_object_um2=0, min_hole_um2=0))
    for side, (r, c) in squares.items():
        assert mask[r : r + side, c : c + side].mean() > 0.7  # the median rounds the corners
    for side, (r, c) in holes.items():
        if side >= 20:  # the closing (6 px) fills the 10 px hole
            assert mask[r : r + side, c : c + side].mean() < 0.2


def test_holes_touching_the_border_are_not_filled():
    img = np.full((100, 100, 3), 242, np.uint8)
    img[:, :60] = PINK
    img[0:10, 20:30] = 242  # a notch at the top edge, smaller than the hole threshold
    mask = detect_tissue(img, 8.0, TissueParams(median_um=0, closing_um=0))
    # (the 3x3 median fills the notch's two inner corner pixels)
    assert not mask[0:9, 20:30].any() and not mask[9, 21:29].any() and mask[20:, :60].all()


def test_accepts_rgba_and_grey_and_rejects_bad_input():
    rgb = np.full((60, 60, 3), 241, np.uint8)
    rgb[10:50, 10:50] = PINK
    rgba = np.dstack([rgb, np.full((60, 60), 255, np.uint8)])
    assert np.array_equal(detect_tissue(rgba, 8.0), detect_tissue(rgb, 8.0))
    assert not detect_tissue(np.full((60, 60), 128, np.uint8), 8.0).any()
    with pytest.raises(ValueError, match="uint8"):
        detect_tissue(rgb.astype(np.float32), 8.0)
    with pytest.raises(ValueError, match="non-empty"):
        detect_tissue(np.zeros((0, 10, 3), np.uint8), 8.0)
    with pytest.raises(ValueError, match="shape"):
        detect_tissue(np.zeros((10, 10, 2), np.uint8), 8.0)
    for mpp in (0, -1, float("nan"), float("inf")):
        with pytest.raises(InputError, match="µm/px"):
            detect_tissue(rgb, mpp)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"median_um": -1},
        {"min_object_um2": float("nan")},
        {"closing_um": float("inf")},
        {"dark_value": 300},
        {"bright_value": -1},
        {"min_saturation": 30, "max_saturation": 20},
    ],
)
def test_bad_params_raise_input_error(kwargs):
    with pytest.raises(InputError, match="tissue parameter"):
        TissueParams(**kwargs)


def test_otsu_threshold_splits_two_modes():
    vals = np.concatenate([np.full(100, 10), np.full(300, 60)]).astype(np.uint8)
    t = otsu_threshold(vals)
    assert 10 <= t < 60
    assert otsu_threshold(np.array([], np.uint8)) == 0.0
    assert otsu_threshold(np.full(50, 7, np.uint8)) == 0.0


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


# -- tissue fraction of boxes ---------------------------------------------------------------------


def test_tissue_fraction_matches_brute_force_on_random_boxes():
    rng = np.random.default_rng(4)
    h, w = 37, 53
    mask = cv2.GaussianBlur(rng.random((h, w)), (0, 0), 2) > 0.5
    fmap = tissue_fraction_map(mask)
    assert isinstance(fmap, TissueFractionMap) and fmap.shape == (h, w)
    # boxes on a quarter-pixel lattice, partly outside the mask: brute force on a 4x upsampled mask
    k, pad = 4, 8
    fine = np.zeros(((h + 2 * pad) * k, (w + 2 * pad) * k), bool)
    fine[pad * k : (pad + h) * k, pad * k : (pad + w) * k] = np.repeat(
        np.repeat(mask, k, axis=0), k, axis=1
    )
    n = 300
    x0 = rng.integers(-pad * k, (w + pad) * k - 1, n)
    y0 = rng.integers(-pad * k, (h + pad) * k - 1, n)
    x1 = np.minimum(x0 + rng.integers(1, 30 * k, n), (w + pad) * k)
    y1 = np.minimum(y0 + rng.integers(1, 30 * k, n), (h + pad) * k)
    brute = np.array(
        [
            fine[b + pad * k : d + pad * k, a + pad * k : c + pad * k].mean()
            for a, b, c, d in zip(x0, y0, x1, y1, strict=True)
        ]
    )
    got = fmap.fraction(x0 / k, y0 / k, x1 / k, y1 / k)
    np.testing.assert_allclose(got, brute, atol=1e-9)
    area = fmap.area(x0 / k, y0 / k, x1 / k, y1 / k)
    np.testing.assert_allclose(area, brute * (x1 - x0) * (y1 - y0) / k**2, atol=1e-9)
    boxes = np.stack([x0, y0, x1, y1], axis=1) / k
    np.testing.assert_allclose(fmap.fraction_boxes(boxes), got)


def test_tissue_fraction_integer_boxes_and_edge_cases():
    rng = np.random.default_rng(5)
    mask = rng.random((20, 30)) > 0.6
    fmap = TissueFractionMap(mask)
    for _ in range(50):
        x0, y0 = rng.integers(0, 29), rng.integers(0, 19)
        x1, y1 = rng.integers(x0 + 1, 31), rng.integers(y0 + 1, 21)
        frac = fmap.fraction(x0, y0, x1, y1)
        assert frac.shape == () and frac == pytest.approx(mask[y0:y1, x0:x1].mean(), abs=1e-12)
    assert fmap.fraction(0, 0, 30, 20) == pytest.approx(mask.mean())
    # empty and inverted boxes give 0, boxes outside give 0, a broadcast shape comes back
    assert fmap.fraction(5, 5, 5, 9) == 0 and fmap.fraction(6, 5, 2, 9) == 0
    assert fmap.fraction(40, 40, 50, 50) == 0 and fmap.fraction(-9, -9, -1, -1) == 0
    out = fmap.fraction(np.arange(3)[:, None], 0, np.arange(3)[:, None] + 4, np.arange(1, 5))
    assert out.shape == (3, 4)
    assert TissueFractionMap(np.ones((4, 4), bool)).fraction(-4, 0, 4, 4) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2-D"):
        TissueFractionMap(np.ones((2, 2, 2), bool))


# -- GeoJSON --------------------------------------------------------------------------------------


def _blob_with_hole():
    mask = np.zeros((60, 80), bool)
    mask[10:40, 10:50] = True  # 30 x 40 px block...
    mask[20:30, 20:35] = False  # ...with a 10 x 15 px hole
    mask[45:55, 60:75] = True  # a second, separate component
    return mask


def test_mask_to_geojson_writes_qupath_annotations_in_level0_pixels():
    mask = _blob_with_hole()
    ds, mpp = 4.0, 0.25
    geo = mask_to_geojson(mask, ds, mpp=mpp)
    json.dumps(geo)  # serialisable as is
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == 2
    by_rings = sorted(geo["features"], key=lambda f: len(f["geometry"]["coordinates"]))
    small, block = by_rings
    for feat in geo["features"]:
        assert feat["type"] == "Feature" and feat["geometry"]["type"] == "Polygon"
        props = feat["properties"]
        assert props["objectType"] == "annotation" and props["isLocked"] is False
        assert props["classification"] == {"name": "Tissue", "color": [0, 200, 0]}
        for ring in feat["geometry"]["coordinates"]:
            assert ring[0] == ring[-1] and len(ring) >= 4  # closed
    assert len(block["geometry"]["coordinates"]) == 2  # outer ring and the hole

    def signed_area(ring):
        r = np.asarray(ring, float)
        return 0.5 * float(
            np.dot(r[:, 0], np.roll(r[:, 1], -1)) - np.dot(np.roll(r[:, 0], -1), r[:, 1])
        )

    outer, hole = (np.asarray(r) for r in block["geometry"]["coordinates"])
    assert signed_area(outer) > 0 and signed_area(hole) < 0  # RFC 7946 orientation
    # rings through the centres of the boundary pixels, in level-0 pixels: pixel (c, r) has its
    # centre at ((c + 0.5) * ds, (r + 0.5) * ds)
    assert outer[:, 0].min() == 10.5 * ds and outer[:, 0].max() == 49.5 * ds
    assert outer[:, 1].min() == 10.5 * ds and outer[:, 1].max() == 39.5 * ds
    # the hole ring runs through the tissue pixels around the hole
    assert hole[:, 0].min() == 19.5 * ds and hole[:, 0].max() == 35.5 * ds
    assert hole[:, 1].min() == 19.5 * ds and hole[:, 1].max() == 30.5 * ds
    small_ring = np.asarray(small["geometry"]["coordinates"][0])
    assert small_ring[:, 0].min() == 60.5 * ds and small_ring[:, 1].max() == 54.5 * ds
    # area: polygons through pixel centres, hole subtracted, in level-0 µm²
    # (the hole's ring cuts its four corners: 16 x 11 less 4 half pixels)
    area_px = 29 * 39 - (16 * 11 - 2)
    assert block["properties"]["measurements"]["Area µm^2"] == pytest.approx(
        area_px * (ds * mpp) ** 2
    )
    # coordinates are the downsample-1 ones times the downsample
    one = mask_to_geojson(mask, 1.0)
    for a, b in zip(one["features"], mask_to_geojson(mask, 2.5)["features"], strict=True):
        for ra, rb in zip(a["geometry"]["coordinates"], b["geometry"]["coordinates"], strict=True):
            np.testing.assert_allclose(np.asarray(ra) * 2.5, rb)
    assert one["features"][0]["properties"]["measurements"] == {}  # no mpp, no area


def test_mask_to_geojson_options_and_empty_mask():
    mask = _blob_with_hole()
    geo = mask_to_geojson(mask, 1.0, name="Region", color=(255, 0, 0), min_area_px=500)
    assert len(geo["features"]) == 1  # the 10 x 15 px component (area 126) is dropped
    assert geo["features"][0]["properties"]["classification"] == {
        "name": "Region",
        "color": [255, 0, 0],
    }
    assert mask_to_geojson(np.zeros((10, 10), bool), 4.0) == {
        "type": "FeatureCollection",
        "features": [],
    }
    with pytest.raises(ValueError, match="downsample"):
        mask_to_geojson(mask, 0)
    with pytest.raises(ValueError, match="2-D"):
        mask_to_geojson(np.zeros((2, 2, 2), bool), 1.0)


@pytest.mark.parametrize("ds", [1.0, 2.5, 4.0, 16.0])
def test_geojson_round_trip_reproduces_the_mask(ds):
    mask = _blob_with_hole()
    back = geojson_to_mask(mask_to_geojson(mask, ds), mask.shape, ds)
    assert np.array_equal(back, mask)
    # smooth random masks with many holes and components; only single pixels and one-pixel-wide
    # lines (polygons without area) may be lost
    rng = np.random.default_rng(int(ds * 10))
    for _ in range(5):
        m = cv2.GaussianBlur(rng.random((70, 90)), (0, 0), 2.5) > 0.5
        back = geojson_to_mask(mask_to_geojson(m, ds), m.shape, ds)
        assert _iou(back, m) >= 0.99
        assert not (back & ~m).any()


def test_geojson_round_trip_of_detected_tissue(layout):
    ds = 16
    w, h = -(-layout.width // ds), -(-layout.height // ds)
    mask = detect_tissue(render_region(layout, 0, 0, w, h, ds), layout.mpp * ds)
    geo = mask_to_geojson(mask, ds, mpp=layout.mpp)
    assert len(geo["features"]) == len(layout.sections)
    assert np.array_equal(geojson_to_mask(geo, mask.shape, ds), mask)


def test_geojson_to_mask_accepts_qupath_shapes():
    square = [[0, 0], [40, 0], [40, 20], [0, 20], [0, 0]]  # level-0 px
    hole = [[8, 4], [8, 12], [24, 12], [24, 4], [8, 4]]
    poly = {"type": "Polygon", "coordinates": [square, hole]}
    feature = {"type": "Feature", "properties": {"objectType": "annotation"}, "geometry": poly}
    ds = 4.0
    expected = geojson_to_mask({"type": "FeatureCollection", "features": [feature]}, (10, 15), ds)
    # pixel centres (c + 0.5) * 4 inside [0, 40] x [0, 20]: columns 0-9, rows 0-4; the hole covers
    # centres in [8, 24] x [4, 12]: columns 2-5, rows 1-2
    truth = np.zeros((10, 15), bool)
    truth[0:5, 0:10] = True
    truth[1:3, 2:6] = False
    assert np.array_equal(expected, truth)
    for obj in (feature, poly, [feature]):
        assert np.array_equal(geojson_to_mask(obj, (10, 15), ds), truth)
    multi = {"type": "MultiPolygon", "coordinates": [[square, hole]]}
    assert np.array_equal(geojson_to_mask(multi, (10, 15), ds), truth)
    others = {
        "type": "GeometryCollection",
        "geometries": [
            poly,
            {"type": "Point", "coordinates": [50, 30]},
            {"type": "LineString", "coordinates": [[0, 30], [60, 30]]},
        ],
    }
    assert np.array_equal(geojson_to_mask(others, (10, 15), ds), truth)
    assert not geojson_to_mask({"type": "FeatureCollection", "features": []}, (4, 4), 1.0).any()
    with pytest.raises(InputError, match="malformed"):
        geojson_to_mask({"type": "Polygon", "coordinates": [[["a", "b"]]]}, (4, 4), 1.0)
    with pytest.raises(ValueError, match="downsample"):
        geojson_to_mask(poly, (4, 4), -1.0)


# -- GeoJSON files --------------------------------------------------------------------------------


def test_write_then_read_geojson(tmp_path):
    geo = mask_to_geojson(_blob_with_hole(), 4.0, mpp=0.5)
    path = tmp_path / "new" / "folder" / "tissue.geojson"
    write_geojson(path, geo)
    assert read_geojson(path) == geo
    assert sorted(p.name for p in path.parent.iterdir()) == ["tissue.geojson"]
    # a QuPath export: a top-level list of features, with a byte-order mark
    listed = tmp_path / "qupath.geojson"
    listed.write_text("\ufeff" + json.dumps(geo["features"]), encoding="utf-8")
    assert read_geojson(listed) == geo


def test_write_geojson_is_atomic(tmp_path):
    path = tmp_path / "tissue.geojson"
    good = mask_to_geojson(_blob_with_hole(), 1.0)
    write_geojson(path, good)
    before = path.read_bytes()
    # fails half-way through json.dump: the old file stays whole and no temporary file is left
    bad = {"type": "FeatureCollection", "features": good["features"] + [{"bad": object()}]}
    with pytest.raises(TypeError):
        write_geojson(path, bad)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["tissue.geojson"]
    with pytest.raises(TypeError):
        write_geojson(tmp_path / "other.geojson", bad)
    assert [p.name for p in tmp_path.iterdir()] == ["tissue.geojson"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"type": "FeatureCollection", "features": [', "not valid JSON"),
        ("{'type': 'Polygon'}", "not valid JSON"),
        ("", "not valid JSON"),
        ("42", "not GeoJSON"),
        ('{"type": "Polygon", "coordinates": "abc"}', "malformed"),
        ('{"type": "Polygon", "coordinates": [[[0, 0], [1]]]}', "malformed"),
        ('{"type": "Polygon", "coordinates": [[["a", "b"], [1, 2], [3, 4]]]}', "malformed"),
        ('{"type": "MultiPolygon", "coordinates": 5}', "malformed"),
        ('{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}}', "no Polygon"),
        ('{"type": "FeatureCollection", "features": []}', "no Polygon"),
    ],
)
def test_read_geojson_errors_name_the_file_on_one_line(tmp_path, text, message):
    path = tmp_path / "bad.geojson"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=message) as err:
        read_geojson(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and "\n" not in msg
    assert err.value.path == str(path)


def test_read_geojson_reports_line_and_column(tmp_path):
    path = tmp_path / "bad.geojson"
    path.write_text('{\n  "type": "FeatureCollection",\n  "features": [,]\n}\n', encoding="utf-8")
    with pytest.raises(InputError, match="line 3, column 16"):
        read_geojson(path)


def test_read_geojson_unreadable_paths(tmp_path):
    with pytest.raises(InputError, match="not found") as err:
        read_geojson(tmp_path / "missing.geojson")
    assert str(tmp_path / "missing.geojson") in str(err.value)
    with pytest.raises(InputError, match="directory"):
        read_geojson(tmp_path)
    binary = tmp_path / "image.geojson"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(InputError, match="UTF-8"):
        read_geojson(binary)


# -- real slide -----------------------------------------------------------------------------------


def test_real_slide_tissue_and_round_trip(wsi_dir):
    from histo_wsl.slideio.slide import open_slide, read_thumbnail

    with open_slide(wsi_dir / "cmu-1-small-region.svs") as slide:
        thumb, ds = read_thumbnail(slide, mpp=8.0)
        mpp = slide.mpp
    mask = detect_tissue(thumb, mpp * ds)
    assert 0.1 < mask.mean() < 0.9
    sat = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)[:, :, 1].astype(float)
    assert sat[mask].mean() > 2 * sat[~mask].mean()  # tissue is the stained part
    back = geojson_to_mask(mask_to_geojson(mask, ds, mpp=mpp), mask.shape, ds)
    assert _iou(back, mask) >= 0.99


# -- strip-wise detection, packed masks, banded fractions ------------------------------------------


def _whole_image_recipe(rgb, mpp, params):
    """The detection recipe on the whole image at once (the reference the strips must equal)."""
    k = max(3, int(round(params.median_um / mpp)))
    k += 1 - k % 2
    smooth = cv2.medianBlur(rgb, k)
    hsv = cv2.cvtColor(smooth, cv2.COLOR_RGB2HSV)
    sat = hsv[:, :, 1]
    cand = (hsv[:, :, 2] >= params.dark_value) & (smooth.min(axis=2) <= params.bright_value)
    if not cand.any():
        return np.zeros(rgb.shape[:2], bool)
    t = min(max(otsu_threshold(sat[cand]), params.min_saturation), params.max_saturation)
    mask = (cand & (sat > t)).astype(np.uint8)
    d = int(round(params.closing_um / mpp))
    if d >= 2:
        d |= 1
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (d, d))
        padded = cv2.copyMakeBorder(mask, d, d, d, d, cv2.BORDER_CONSTANT, value=0)
        mask = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, kernel)[d:-d, d:-d]
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= params.min_object_um2 / mpp**2
    keep[0] = False
    mask = keep[labels]
    _, labels, stats, _ = cv2.connectedComponentsWithStats((~mask).view(np.uint8), connectivity=4)
    x, y, w, h = (stats[:, i] for i in range(4))
    border = (x == 0) | (y == 0) | (x + w == mask.shape[1]) | (y + h == mask.shape[0])
    fill = (stats[:, cv2.CC_STAT_AREA] < params.min_hole_um2 / mpp**2) & ~border
    fill[0] = False
    return mask | fill[labels]


def _random_thumbnail(rng, h, w):
    blobs = cv2.GaussianBlur(rng.random((h, w)), (0, 0), rng.uniform(1.5, 6))
    img = _glass(h, w, rng)
    tissue = blobs > np.quantile(blobs, rng.uniform(0.3, 0.8))
    img[tissue] = np.clip(np.asarray(PINK) + rng.normal(0, 6, (tissue.sum(), 3)), 0, 255)
    img[: rng.integers(1, 6)] = 8  # a black border on top
    return img


@pytest.mark.parametrize("seed", range(6))
def test_strip_detection_equals_whole_image_detection(seed):
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(40, 220, 2))
    img = _random_thumbnail(rng, h, w)
    mpp = float(rng.uniform(4, 16))
    params = TissueParams(
        min_object_um2=float(rng.uniform(0, 2e5)), min_hole_um2=float(rng.uniform(0, 2e5))
    )
    expected = _whole_image_recipe(img, mpp, params)
    assert np.array_equal(detect_tissue(img, mpp, params), expected)
    for rows in (1, 5, 16, 64, 10_000):  # strips of one row, with holes and objects across strips
        seen: list[int] = []
        got = detect_tissue_strips(
            lambda a, b: img[a:b],
            (h, w),
            mpp,
            params,
            strip_rows=rows,
            on_rows=lambda y0, rgb, seen=seen: seen.extend(range(y0, y0 + len(rgb))),
        )
        assert isinstance(got, PackedMask) and got.shape == (h, w)
        assert np.array_equal(got.to_bool(), expected), rows
        assert seen == list(range(h))  # every row handed over once, in order


def test_strip_detection_joins_objects_and_holes_across_strips():
    # one ring of tissue spanning many 4-row strips: the object is big, its hole small and inside
    img = np.full((60, 60, 3), 240, np.uint8)
    ring = np.zeros((60, 60), bool)
    ring[10:50, 10:50] = True
    ring[28:32, 28:32] = False
    img[ring] = PINK
    params = TissueParams(median_um=0, closing_um=0, min_object_um2=1000, min_hole_um2=20)
    got = detect_tissue_strips(lambda a, b: img[a:b], (60, 60), 1.0, params, strip_rows=4)
    expected = _whole_image_recipe(img, 1.0, params)
    assert np.array_equal(got.to_bool(), expected)
    # kept (about 1,600 px, no strip holds more than 160), its hole filled
    assert expected[12:48, 12:48].all() and not expected[:8].any()
    # the same object counted strip by strip would be dropped: sizes are whole-image sizes
    params = TissueParams(median_um=0, closing_um=0, min_object_um2=1601, min_hole_um2=0)
    got = detect_tissue_strips(lambda a, b: img[a:b], (60, 60), 1.0, params, strip_rows=4)
    assert not got.any()


def test_strip_detection_rejects_bad_rows():
    img = np.full((10, 10, 3), 240, np.uint8)
    with pytest.raises(ValueError, match="width"):
        detect_tissue_strips(lambda a, b: img[a:b, :5], (10, 10), 8.0)
    with pytest.raises(InputError):
        detect_tissue_strips(lambda a, b: img[a:b], (10, 10), 0.0)


def test_packed_mask_round_trip_and_counts():
    rng = np.random.default_rng(3)
    mask = rng.random((13, 21)) > 0.5
    packed = PackedMask.from_bool(mask)
    assert packed.nbytes == 13 * 3 and packed.shape == (13, 21)
    assert np.array_equal(packed.to_bool(), mask) and np.array_equal(packed.rows(4, 9), mask[4:9])
    assert packed.rows(-3, 100).shape == (13, 21) and packed.rows(20, 30).shape == (0, 21)
    assert packed.count() == mask.sum() and packed.mean() == pytest.approx(mask.mean())
    packed.set_rows(2, np.ones((3, 21), bool))
    mask[2:5] = True
    assert np.array_equal(packed.to_bool(), mask) and packed.any()
    assert not PackedMask((4, 9)).any() and PackedMask((0, 5)).mean() == 0.0
    with pytest.raises(ValueError):
        packed.set_rows(12, np.ones((3, 21), bool))


def test_otsu_from_histogram_matches_otsu_of_values():
    vals = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint8)
    assert otsu_from_histogram(np.bincount(vals, minlength=256)) == otsu_threshold(vals)
    assert otsu_from_histogram(np.zeros(256)) == 0.0
    with pytest.raises(ValueError):
        otsu_from_histogram(np.zeros(10))


@pytest.mark.parametrize("band_rows", [1, 3, 16, 1000])
def test_banded_fraction_map_equals_one_table(band_rows):
    rng = np.random.default_rng(band_rows)
    h, w = 45, 38
    mask = cv2.GaussianBlur(rng.random((h, w)), (0, 0), 2) > 0.5
    n = 400
    x0, y0 = rng.uniform(-10, w + 5, n), rng.uniform(-10, h + 5, n)
    x1, y1 = x0 + rng.uniform(-2, 25, n), y0 + rng.uniform(-2, 25, n)
    ref = TissueFractionMap(mask, band_rows=10_000).fraction(x0, y0, x1, y1)
    banded = TissueFractionMap(PackedMask.from_bool(mask), band_rows=band_rows)
    np.testing.assert_allclose(banded.fraction(x0, y0, x1, y1), ref, atol=1e-9)
    # brute force on integer boxes inside the mask
    for a, b in zip(rng.integers(0, h - 6, 20), rng.integers(0, w - 6, 20), strict=True):
        assert banded.fraction(b, a, b + 6, a + 6) == pytest.approx(
            mask[a : a + 6, b : b + 6].mean()
        )


def test_a_greyscale_thumbnail_finds_tissue_darker_than_its_glass():
    """Issue 26, item 7: greyscale has no saturation; tissue is told from glass by brightness."""
    rng = np.random.default_rng(4)
    grey = np.clip(rng.normal(245, 2, (150, 200)), 0, 255)
    grey[40:110, 50:150] = np.clip(rng.normal(110, 8, (70, 100)), 0, 255)  # tissue
    grey[0:10, :] = 5  # a black scanner border is never tissue
    img = np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
    mask = detect_tissue(img, 8.0)
    inside = mask[45:105, 55:145].mean()
    outside = np.concatenate([mask[10:35].ravel(), mask[115:].ravel()]).mean()
    assert inside > 0.95 and outside < 0.01 and not mask[:10].any()
