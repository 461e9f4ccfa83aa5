"""GeoJSON in level-0 pixels: QuPath's annotations out and back, atomic writes, clear errors."""

import json
import uuid

import cv2
import numpy as np
import pytest
import shapely
import shapely.geometry

from histo_wsl.errors import InputError
from histo_wsl.slideio.geojson import (
    GeoJSONStyle,
    geojson_to_mask,
    mask_to_geojson,
    read_geojson,
    write_geojson,
)
from histo_wsl.synthetic.slides import render_region
from histo_wsl.tissue.detect import (
    detect_tissue,
)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(1, int((a | b).sum()))


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
    # rings along the pixels' edges, in level-0 pixels: pixel (c, r) covers [c, c+1) x [r, r+1)
    assert outer[:, 0].min() == 10 * ds and outer[:, 0].max() == 50 * ds
    assert outer[:, 1].min() == 10 * ds and outer[:, 1].max() == 40 * ds
    assert hole[:, 0].min() == 20 * ds and hole[:, 0].max() == 35 * ds
    assert hole[:, 1].min() == 20 * ds and hole[:, 1].max() == 30 * ds
    small_ring = np.asarray(small["geometry"]["coordinates"][0])
    assert small_ring[:, 0].min() == 60 * ds and small_ring[:, 1].max() == 55 * ds
    # area: the pixels' area exactly (hole subtracted), in level-0 µm²
    area_px = 30 * 40 - 10 * 15
    assert block["properties"]["measurements"]["Area µm^2"] == pytest.approx(
        area_px * (ds * mpp) ** 2
    )
    assert shapely.geometry.shape(block["geometry"]).area == pytest.approx(area_px * ds**2)
    # stable ids (UUIDs, as QuPath 0.4+ writes): the same mask gives the same ids
    ids = [f["id"] for f in geo["features"]]
    assert len(set(ids)) == 2 and all(str(uuid.UUID(i)) == i for i in ids)
    assert ids == [f["id"] for f in mask_to_geojson(mask, ds, mpp=mpp)["features"]]
    assert ids != [f["id"] for f in mask_to_geojson(mask, ds, id_namespace="other")["features"]]
    # coordinates are the downsample-1 ones times the downsample
    one = mask_to_geojson(mask, 1.0)
    for a, b in zip(one["features"], mask_to_geojson(mask, 2.5)["features"], strict=True):
        for ra, rb in zip(a["geometry"]["coordinates"], b["geometry"]["coordinates"], strict=True):
            np.testing.assert_allclose(np.asarray(ra) * 2.5, rb)
    assert one["features"][0]["properties"]["measurements"] == {}  # no mpp, no area


def test_mask_to_geojson_options_and_empty_mask():
    mask = _blob_with_hole()
    geo = mask_to_geojson(mask, 1.0, style=GeoJSONStyle("Region", (255, 0, 0)), min_area_px=500)
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


def test_mask_to_geojson_mean_value_per_component():
    from histo_wsl.slideio.geojson import GeoJSONStyle, mask_to_geojson

    mask = np.zeros((20, 30), bool)
    mask[2:8, 2:8] = True
    mask[10:18, 15:28] = True
    values = np.where(np.arange(30)[None, :] < 12, 200, 100).repeat(20, 0).astype(np.uint8)
    geo = mask_to_geojson(
        mask, 4.0, style=GeoJSONStyle(value_scale=1 / 255), mpp=0.5, values=values
    )
    means = sorted(f["properties"]["measurements"]["Mean probability"] for f in geo["features"])
    assert means == [pytest.approx(100 / 255, abs=1e-4), pytest.approx(200 / 255, abs=1e-4)]
    assert all("Area µm^2" in f["properties"]["measurements"] for f in geo["features"])


def _tricky_masks():
    rng = np.random.default_rng(0)
    checker = (np.indices((12, 14)).sum(0) % 2).astype(bool)
    line = np.zeros((20, 20), bool)
    line[5, 2:18] = True  # a one-pixel line (a spike when traced through pixel centres)
    line[5:15, 9] = True
    diagonal = np.eye(15, dtype=bool)  # pixels touching only at corners
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[3:6, 3:6] = False
    ring[2, 2] = False
    ring[3, 3] = True  # a hole that touches the outside at a corner
    return {
        "noise": rng.random((60, 70)) > 0.5,
        "sparse": rng.random((50, 50)) > 0.8,
        "checker": checker,
        "line": line,
        "diagonal": diagonal,
        "ring": ring,
        "single": np.pad(np.ones((1, 1), bool), 3),
    }


@pytest.mark.parametrize("name", list(_tricky_masks()))
def test_every_polygon_is_valid_and_measures_the_masks_area(name):
    mask = _tricky_masks()[name]
    ds = 2.5
    geo = mask_to_geojson(mask, ds, mpp=0.5)
    geoms = [shapely.geometry.shape(f["geometry"]) for f in geo["features"]]
    assert all(g.is_valid for g in geoms), [shapely.is_valid_reason(g) for g in geoms]
    assert sum(g.area for g in geoms) == pytest.approx(mask.sum() * ds**2)
    areas = sum(f["properties"]["measurements"]["Area µm^2"] for f in geo["features"])
    rounding = 1e-3 * len(geo["features"])  # each feature's area is written to 3 decimals
    assert areas == pytest.approx(mask.sum() * (ds * 0.5) ** 2, abs=rounding)
    assert (geojson_to_mask(geo, mask.shape, ds) == mask).all()  # still the exact inverse
