import csv
import json

import numpy as np
import pytest
from PIL import Image

from histo_wsl.data.extract import ExtractParams, extract_patches
from histo_wsl.runtime.batch import BatchOptions
from histo_wsl.runtime.inputs import InputItem


def _item(path, **kw):
    return InputItem(path, path.stem, **kw)


def _manifest(out):
    with open(out / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _true_fraction(layout, x, y, size):
    from histo_wsl.synthetic.slides import tissue_mask_region

    return tissue_mask_region(layout, x, y, size // 4, size // 4, downsample=4.0).mean()


def test_patches_land_in_tissue_with_exact_geometry(tmp_path, synthetic_slide, layout):
    out = tmp_path / "out"
    s = extract_patches(
        [_item(synthetic_slide, label="tumour")], out, ExtractParams(), BatchOptions(quiet=True)
    )
    assert s.exit_code == 0
    rows = _manifest(out)
    assert rows and s.items[0].details["patches"] == len(rows)
    assert list(rows[0])[:9] == [
        "slide",
        "path",
        "x",
        "y",
        "level",
        "mpp",
        "size",
        "tissue_fraction",
        "label",
    ]
    kept = set()
    for r in rows:
        x, y = int(r["x"]), int(r["y"])
        assert x % 224 == 0 and y % 224 == 0  # on the grid, level-0 px
        assert r["slide"] == "synth" and r["level"] == "0" and float(r["mpp"]) == pytest.approx(0.5)
        assert r["size"] == "224" and r["label"] == "tumour"
        assert r["path"] == f"synth/patches/synth_x{x}_y{y}.png"
        assert _true_fraction(layout, x, y, 224) >= 0.3  # detection error stays at the border
        kept.add((x, y))
        img = Image.open(out / r["path"])
        assert img.size == (224, 224) and img.mode == "RGB"
    # every grid patch well inside tissue (>= 70 % true tissue) is kept, the faint section's too
    for y in range(0, 2000 - 223, 224):
        for x in range(0, 3000 - 223, 224):
            if _true_fraction(layout, x, y, 224) >= 0.7:
                assert (x, y) in kept, (x, y)
    files = sorted(p.name for p in (out / "synth" / "patches").iterdir())
    assert len(files) == len(rows)
    for name in (
        "thumbnail.png",
        "tissue.png",
        "patches.png",
        "tissue.geojson",
        "slide.json",
        "patches.csv",
    ):
        assert (out / "synth" / name).is_file()
    geo = json.loads((out / "synth" / "tissue.geojson").read_text())
    assert len(geo["features"]) == 2  # two sections
    record = json.loads((out / "synth" / "slide.json").read_text())
    assert record["status"] == "done" and record["read"]["mpp"] == pytest.approx(0.5)


def test_min_tissue_zero_keeps_the_whole_grid(tmp_path, synthetic_slide):
    out = tmp_path / "out"
    extract_patches(
        [_item(synthetic_slide)],
        out,
        ExtractParams(min_tissue=0.0, coords_only=True, mpp=1.0),
        BatchOptions(quiet=True),
    )
    rows = _manifest(out)
    assert len(rows) == 6 * 4
    assert {(int(r["x"]), int(r["y"])) for r in rows} == {
        (448 * i, 448 * j) for i in range(6) for j in range(4)
    }
    assert all(r["path"] == "" and r["size_level0"] == "448.000" for r in rows)
    assert not (out / "synth" / "patches").exists()


def test_rerun_skips_and_overwrite_redoes(tmp_path, synthetic_slide):
    out = tmp_path / "out"
    p = ExtractParams(max_patches=5)
    extract_patches([_item(synthetic_slide)], out, p, BatchOptions(quiet=True))
    before = (out / "synth" / "slide.json").read_text()
    s = extract_patches([_item(synthetic_slide)], out, p, BatchOptions(quiet=True))
    assert s.items[0].status == "skipped" and (out / "synth" / "slide.json").read_text() == before
    s = extract_patches([_item(synthetic_slide)], out, p, BatchOptions(overwrite=True, quiet=True))
    assert s.items[0].status == "done" and len(_manifest(out)) == 5


def test_max_patches_is_seeded(tmp_path, synthetic_slide):
    def pick(seed, name):
        out = tmp_path / name
        extract_patches(
            [_item(synthetic_slide)],
            out,
            ExtractParams(max_patches=6, seed=seed, coords_only=True),
            BatchOptions(quiet=True),
        )
        return [(r["x"], r["y"]) for r in _manifest(out)]

    a, b, c = pick(1, "a"), pick(1, "b"), pick(2, "c")
    assert a == b and a != c and len(a) == 6


@pytest.mark.parametrize("pool", [True, False], ids=["pool", "small-slide-in-process"])
def test_workers_give_the_same_patches(tmp_path, synthetic_slide, monkeypatch, pool):
    from histo_wsl.data import extract

    if pool:  # the 104-position grid is under POOL_MIN_PATCHES: start the workers anyway
        monkeypatch.setattr(extract, "POOL_MIN_PATCHES", 0)
    one, two = tmp_path / "one", tmp_path / "two"
    extract_patches(
        [_item(synthetic_slide)], one, ExtractParams(max_patches=40), BatchOptions(quiet=True)
    )
    extract_patches(
        [_item(synthetic_slide)],
        two,
        ExtractParams(max_patches=40, workers=2),
        BatchOptions(quiet=True),
    )
    names = sorted(p.name for p in (one / "synth" / "patches").iterdir())
    assert names == sorted(p.name for p in (two / "synth" / "patches").iterdir())
    for n in names[:5]:
        a = np.asarray(Image.open(one / "synth" / "patches" / n))
        b = np.asarray(Image.open(two / "synth" / "patches" / n))
        assert np.array_equal(a, b)


def test_jpeg_format(tmp_path, synthetic_slide):
    out = tmp_path / "out"
    extract_patches(
        [_item(synthetic_slide)],
        out,
        ExtractParams(image_format="jpg", max_patches=3),
        BatchOptions(quiet=True),
    )
    assert all(r["path"].endswith(".jpg") for r in _manifest(out))
    assert Image.open(out / _manifest(out)[0]["path"]).format == "JPEG"


def test_resized_reading(tmp_path, synthetic_slide):
    out = tmp_path / "out"
    extract_patches(
        [_item(synthetic_slide)],
        out,
        ExtractParams(mpp=0.75, patch_size=100, max_patches=4),
        BatchOptions(quiet=True),
    )
    rows = _manifest(out)
    assert all(int(r["x"]) % 150 == 0 and r["size_level0"] == "150.000" for r in rows)
    assert Image.open(out / rows[0]["path"]).size == (100, 100)


def test_slide_without_tissue_gives_zero_patches_not_an_error(tmp_path, blank_slide):
    out = tmp_path / "out"
    s = extract_patches([_item(blank_slide)], out, ExtractParams(), BatchOptions(quiet=True))
    assert s.exit_code == 0 and s.items[0].status == "done"
    assert s.items[0].details["patches"] == 0 and _manifest(out) == []
    assert json.loads((out / "blank" / "slide.json").read_text())["patches"] == 0


def test_slide_without_mpp(tmp_path, synthetic_slide_no_mpp):
    out = tmp_path / "out"
    s = extract_patches(
        [_item(synthetic_slide_no_mpp)], out, ExtractParams(), BatchOptions(quiet=True)
    )
    assert s.exit_code == 2 and "--slide-mpp" in s.items[0].error
    assert "nompp.tif" in s.items[0].error
    s = extract_patches(
        [_item(synthetic_slide_no_mpp)], out, ExtractParams(slide_mpp=0.5), BatchOptions(quiet=True)
    )
    assert s.exit_code == 0 and s.items[0].details["mpp_source"] == "override"
    s = extract_patches(
        [_item(synthetic_slide_no_mpp, slide_mpp=0.5)],
        tmp_path / "csv",
        ExtractParams(),
        BatchOptions(quiet=True),
    )
    assert s.exit_code == 0
    s = extract_patches(
        [_item(synthetic_slide_no_mpp)],
        tmp_path / "lvl",
        ExtractParams(level=0, mpp=None),
        BatchOptions(quiet=True),
    )
    assert s.exit_code == 0 and _manifest(tmp_path / "lvl")[0]["mpp"] == ""


def test_patch_larger_than_slide(tmp_path, synthetic_slide):
    s = extract_patches(
        [_item(synthetic_slide)],
        tmp_path / "out",
        ExtractParams(patch_size=4096),
        BatchOptions(quiet=True),
    )
    assert s.exit_code == 2 and "more than the slide" in s.items[0].error


def test_bad_slides_with_skip_errors_keep_the_good_ones(
    tmp_path, synthetic_slide, corrupt_slide, not_a_slide
):
    out = tmp_path / "out"
    items = [_item(not_a_slide), _item(synthetic_slide), _item(corrupt_slide)]
    s = extract_patches(
        items, out, ExtractParams(max_patches=10), BatchOptions(skip_errors=True, quiet=True)
    )
    assert s.exit_code == 1
    status = {it.name: it.status for it in s.items}
    assert status == {"notes": "failed", "synth": "done", "truncated": "failed"}
    assert len(_manifest(out)) == 10
    run = json.loads((out / "run.json").read_text())
    errors = {it["name"]: it.get("error", "") for it in run["items"]}
    assert "not a slide" in errors["notes"] and str(not_a_slide) in errors["notes"]
    assert "truncated" in errors["truncated"] or "corrupt" in errors["truncated"]
    assert not (out / "notes").exists() and not (out / "truncated").exists()


def test_without_skip_errors_the_run_stops_and_earlier_slides_stay(
    tmp_path, synthetic_slide, not_a_slide
):
    out = tmp_path / "out"
    s = extract_patches(
        [_item(synthetic_slide), _item(not_a_slide)],
        out,
        ExtractParams(max_patches=3),
        BatchOptions(quiet=True),
    )
    assert s.exit_code == 2
    assert len(_manifest(out)) == 3 and (out / "synth" / "slide.json").exists()


def test_tissue_geojson_round_trip(tmp_path, synthetic_slide):
    first = tmp_path / "first"
    extract_patches(
        [_item(synthetic_slide)], first, ExtractParams(coords_only=True), BatchOptions(quiet=True)
    )
    again = tmp_path / "again"
    s = extract_patches(
        [_item(synthetic_slide)],
        again,
        ExtractParams(coords_only=True, tissue_geojson=first),
        BatchOptions(quiet=True),
    )
    assert s.items[0].details["tissue_source"].endswith("tissue.geojson")
    a = {(r["x"], r["y"]) for r in _manifest(first)}
    b = {(r["x"], r["y"]) for r in _manifest(again)}
    assert len(a ^ b) <= max(2, len(a) // 20)


def test_tissue_geojson_restricts_patches(tmp_path, synthetic_slide):
    square = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "properties": {},
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[0, 0], [1000, 0], [1000, 700], [0, 700], [0, 0]]],
                },
            }
        ],
    }
    geo = tmp_path / "roi.geojson"
    geo.write_text(json.dumps(square))
    out = tmp_path / "out"
    extract_patches(
        [_item(synthetic_slide)],
        out,
        ExtractParams(coords_only=True, tissue_geojson=geo, min_tissue=0.99),
        BatchOptions(quiet=True),
    )
    got = {(int(r["x"]), int(r["y"])) for r in _manifest(out)}
    assert got == {(x, y) for x in (0, 224, 448, 672) for y in (0, 224, 448)}


def test_shards_share_one_output_folder(tmp_path, synthetic_slide, blank_slide):
    from histo_wsl.runtime.inputs import select_shard

    out = tmp_path / "out"
    items = [_item(synthetic_slide), _item(blank_slide)]
    for k in (1, 2):
        extract_patches(
            select_shard(items, (k, 2)),
            out,
            ExtractParams(max_patches=4),
            BatchOptions(shard=(k, 2), quiet=True),
        )
    assert {r["slide"] for r in _manifest(out)} == {"synth"}
    assert (out / "run.shard-1-of-2.json").exists() and (out / "run.shard-2-of-2.json").exists()
    assert (out / "blank" / "slide.json").exists()


def test_real_slide_patches_in_tissue(tmp_path, wsi_dir):
    out = tmp_path / "out"
    s = extract_patches(
        [_item(wsi_dir / "cmu-1-small-region.svs")], out, ExtractParams(), BatchOptions(quiet=True)
    )
    assert s.exit_code == 0
    rows = _manifest(out)
    assert len(rows) > 20
    for r in rows[:10]:
        rgb = np.asarray(Image.open(out / r["path"]), dtype=float)
        sat = rgb.max(axis=2) - rgb.min(axis=2)
        assert sat.mean() > 20  # stained tissue, not glass


def test_rerun_after_a_kill_mid_slide_redoes_the_slide(tmp_path, synthetic_slide):
    import shutil

    from histo_wsl.data.extract import write_manifest
    from histo_wsl.runtime.batch import STAGING

    params = ExtractParams(mpp=1.0)
    clean = tmp_path / "clean"
    extract_patches([_item(synthetic_slide)], clean, params, BatchOptions(quiet=True))
    names = sorted(p.name for p in (clean / "synth" / "patches").iterdir())
    assert len(names) == len(_manifest(clean)) > 5
    out = tmp_path / "out"
    # killed while writing patches: a half-filled staging folder (one patch cut short)...
    staged = out / STAGING / "synth" / "synth" / "patches"
    staged.mkdir(parents=True)
    for n in names[:3]:
        shutil.copy(clean / "synth" / "patches" / n, staged / n)
    (staged / names[3]).write_bytes(b"\x89PNG half")
    # ...and, killed while moving an earlier attempt into place, the slide folder without its
    # slide.json, missing patches and holding a stray one, beside the moved-out leftovers
    shutil.copytree(clean / "synth", out / "synth")
    (out / "synth" / "slide.json").unlink()
    for n in names[-3:]:
        (out / "synth" / "patches" / n).unlink()
    (out / "synth" / "patches" / "synth_x99999_y0.png").write_bytes(b"stray")
    (out / STAGING / "synth.old" / "patches").mkdir(parents=True)
    assert write_manifest(out) == 0  # nothing there counts as finished

    s = extract_patches([_item(synthetic_slide)], out, params, BatchOptions(quiet=True))
    assert s.exit_code == 0 and s.items[0].status == "done"
    assert sorted(p.name for p in (out / "synth" / "patches").iterdir()) == names
    for n in names[:4]:
        assert Image.open(out / "synth" / "patches" / n).size == (224, 224)
    assert len(_manifest(out)) == len(names) == s.items[0].details["patches"]
    assert json.loads((out / "synth" / "slide.json").read_text())["status"] == "done"
    assert not (out / STAGING).exists()


def test_png_stream_writes_the_image_band_by_band(tmp_path):
    from histo_wsl.slideio.writers import PngStream

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (41, 23, 3), dtype=np.uint8)
    with PngStream(tmp_path / "a.png", 23, 41) as png:
        for y in range(0, 41, 8):
            png.write_rows(rgb[y : y + 8])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), rgb)
    with (
        pytest.raises(ValueError, match="rows written"),
        PngStream(tmp_path / "b.png", 23, 41) as png,
    ):
        png.write_rows(rgb[:5])
    with (
        pytest.raises(ValueError, match="do not fit"),
        PngStream(tmp_path / "c.png", 23, 41) as png,
    ):
        png.write_rows(rgb[:, :5])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]  # no partial files left


@pytest.mark.parametrize("keep", [True, False], ids=["kept-thumbnail", "band-by-band"])
def test_scan_tissue_matches_whole_thumbnail_detection(
    tmp_path, synthetic_slide, monkeypatch, keep
):
    from histo_wsl.slideio.slide import open_slide
    from histo_wsl.tissue import scan as slide_tissue
    from histo_wsl.tissue.scan import find_tissue, scan_tissue, write_tissue_images

    if not keep:  # a thumbnail too large to keep: read in bands for detection and QC images
        monkeypatch.setattr(slide_tissue, "THUMBNAIL_KEEP_BYTES", 0)
    with open_slide(synthetic_slide) as slide:
        found = find_tissue(slide)
        scanned = scan_tissue(slide, thumbnail_png=tmp_path / "thumb.png")
        assert (scanned.rgb is not None) == keep
        np.testing.assert_array_equal(scanned.mask.to_bool(), found.mask)
        assert scanned.downsample == found.downsample and scanned.source == "detected"
        assert scanned.tissue_mpp == pytest.approx(slide.mpp * found.downsample)
        assert scanned.record()["thumbnail_size"] == [found.mask.shape[1], found.mask.shape[0]]
        np.testing.assert_array_equal(
            np.asarray(Image.open(tmp_path / "thumb.png")), found.thumbnail
        )
        write_tissue_images(slide, scanned, tissue_png=tmp_path / "tissue.png")
    from histo_wsl.slideio.writers import draw_tissue

    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "tissue.png")), draw_tissue(found.thumbnail, found.mask)
    )


def test_a_16_bit_greyscale_tiff_gives_patches_and_no_tissue_is_said(tmp_path, blank_slide, capsys):
    """Issue 26, item 7: a 16-bit greyscale TIFF gave 0 patches, exit 0 and no word."""
    import tifffile

    arr = np.full((1200, 1600), 65535, dtype=np.uint16)  # glass
    arr[300:900, 400:1200] = 20000  # tissue
    path = tmp_path / "grey16.tif"
    tifffile.imwrite(path, arr)
    out = tmp_path / "out"
    s = extract_patches([_item(path)], out, ExtractParams(slide_mpp=0.5), BatchOptions(quiet=True))
    assert s.exit_code == 0 and s.items[0].details["patches"] > 0
    assert any("greyscale" in n for n in s.items[0].details["notes"])
    capsys.readouterr()
    s = extract_patches(
        [_item(blank_slide)], tmp_path / "blank", ExtractParams(), BatchOptions(quiet=True)
    )
    assert s.items[0].details["patches"] == 0
    assert "0 patches (no tissue found" in capsys.readouterr().err
    assert "0 patches: no tissue found" in s.items[0].details["notes"]


def test_a_second_run_into_the_same_out_leaves_the_first_runs_slide_alone(
    tmp_path, synthetic_slide
):
    """Issue 26, item 9: the second run deleted the first's staging and both exited 0."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from histo_wsl.runtime.batch import STAGING

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "histo_wsl", "extract-patches", str(synthetic_slide)]
    cmd += ["--out", str(out), "--mpp", "1.0", "--quiet"]
    first = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    staged = out / STAGING / synthetic_slide.stem
    deadline = time.monotonic() + 120
    while not any(staged.glob("*/*")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if first.poll() is not None:
        pytest.skip("the first run finished before it could be paused")
    os.kill(first.pid, signal.SIGSTOP)  # the first run, paused in the middle of the slide
    try:
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr
        assert "another run is processing it" in second.stderr
        assert staged.is_dir() and not (out / synthetic_slide.stem).exists()
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=120) == 0, first.stderr.read()
    record = json.loads((out / synthetic_slide.stem / "slide.json").read_text())
    rows = _manifest(out)
    assert record["status"] == "done" and record["patches"] == len(rows) > 0
    assert all((out / r["path"]).is_file() for r in rows)


def test_the_pool_starts_only_for_slides_with_enough_positions():
    from histo_wsl.data.extract import POOL_MIN_PATCHES, PatchWriter

    writer = PatchWriter(2)
    try:
        writer.prepare(POOL_MIN_PATCHES - 1)
        assert writer.in_process  # a small slide: no worker processes
        writer.prepare(POOL_MIN_PATCHES)
        assert not writer.in_process
    finally:
        writer.close()
    single = PatchWriter(1)
    single.prepare(10 * POOL_MIN_PATCHES)
    assert single.in_process


def _held_cases(slide):
    w, h = slide.dimensions
    return [
        ((0, 0), (64, 48)),
        ((w - 50, h - 30), (64, 48)),  # past the right and bottom edges: white there
        ((-20, -10), (64, 48)),  # before the left and top edges
        ((w + 5, 3), (16, 16)),  # wholly outside
        ((w // 3, h // 2), (331, 257)),
    ]


def _assert_held_reads_like_the_slide(path):
    from histo_wsl.slideio.slide import open_slide
    from histo_wsl.tissue.scan import HeldLevel

    with open_slide(path) as slide:
        held = HeldLevel.read(slide, band_rows=100)  # several bands
        if slide.vendor == "image":  # a plain image is held by its Slide already
            assert held is None
            return
        assert held is not None and held.rgb.shape == (*slide.dimensions[::-1], 3)
        for location, size in _held_cases(slide):
            ours, theirs = held.read_region(location, 0, size), slide.read_region(location, 0, size)
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
            assert ours.mode == theirs.mode == "RGB"
            assert ours.info.get("icc_profile") == theirs.info.get("icc_profile")  # PNGs keep it
        if slide.level_count > 1:  # other levels are read from the slide
            np.testing.assert_array_equal(
                np.asarray(held.read_region((0, 0), 1, (40, 30))),
                np.asarray(slide.read_region((0, 0), 1, (40, 30))),
            )
        assert HeldLevel.read(slide, max_bytes=100) is None
        held.close()
        assert held.rgb is None


def test_held_level_reads_the_pixels_the_slide_reads(synthetic_slide):
    _assert_held_reads_like_the_slide(synthetic_slide)


def test_held_level_reads_the_pixels_of_real_slides(wsi_dir):
    names = ("cmu-1-small-region.svs", "test3-DAPI-2-(387).ndpi", "kidney-48-5.tif", "boxes.tiff")
    for name in (*names, "boxes_0.dcm"):  # the boxes have an ICC profile
        if (wsi_dir / name).is_file():
            _assert_held_reads_like_the_slide(wsi_dir / name)


def _outputs(folder):
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix != ".json" and ".histo-wsl-locks" not in p.parts
    }


@pytest.mark.parametrize("thumbnail_mpp", [0.9, 8.0], ids=["level0-thumbnail", "level1-thumbnail"])
def test_one_read_of_a_small_slide_writes_the_same_files(
    tmp_path, synthetic_slide, monkeypatch, thumbnail_mpp
):
    """Level 0 held for the thumbnail and the patches: every file as with one read each."""
    from histo_wsl.tissue import scan

    params = ExtractParams(thumbnail_mpp=thumbnail_mpp, min_tissue=0.3)
    held = []
    real_read = scan.HeldLevel.read.__func__

    def spy(cls, slide, **kw):
        held.append(real_read(cls, slide, **kw))
        return held[-1]

    monkeypatch.setattr(scan.HeldLevel, "read", classmethod(spy))
    extract_patches([_item(synthetic_slide)], tmp_path / "one", params, BatchOptions(quiet=True))
    # at 0.9 µm/px the thumbnail is read from level 0 as the patches are: held (and let go)
    assert [h is not None for h in held] == ([True] if thumbnail_mpp < 1 else [])
    assert all(h.rgb is None for h in held if h is not None)
    monkeypatch.setattr(scan, "HELD_LEVEL_BYTES", 0)  # never held: read twice
    extract_patches([_item(synthetic_slide)], tmp_path / "two", params, BatchOptions(quiet=True))
    one, two = _outputs(tmp_path / "one"), _outputs(tmp_path / "two")
    assert sum(k.endswith(".png") for k in one) > 20 and one.keys() == two.keys()
    for name in one:
        assert one[name] == two[name], name


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("cmu-1-small-region.svs", {"mpp": 0.499, "max_patches": 30}),
        ("boxes.tiff", {"mpp": None, "level": 0, "patch_size": 16}),  # patches keep its ICC profile
    ],
)
def test_one_read_of_a_real_small_slide_writes_the_same_files(
    tmp_path, wsi_dir, monkeypatch, name, params
):
    from histo_wsl.tissue import scan

    path = wsi_dir / name
    params = ExtractParams(min_tissue=0.0, **params)
    extract_patches([_item(path)], tmp_path / "one", params, BatchOptions(quiet=True))
    monkeypatch.setattr(scan, "HELD_LEVEL_BYTES", 0)
    extract_patches([_item(path)], tmp_path / "two", params, BatchOptions(quiet=True))
    one, two = _outputs(tmp_path / "one"), _outputs(tmp_path / "two")
    assert len(one) > 30 and one == two


@pytest.mark.parametrize("channels", [3, 1])
def test_png_stream_up_filter_and_rle_round_trip(tmp_path, channels):
    import zlib

    from histo_wsl.slideio.writers import PngStream

    rng = np.random.default_rng(1)
    shape = (37, 29, 3) if channels == 3 else (37, 29)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    image[10:20] = image[9]  # repeated rows: what "Up" and run-length matching are for
    with PngStream(
        tmp_path / "a.png", 29, 37, channels=channels, strategy=zlib.Z_RLE, up=True
    ) as png:
        for y in (0, 1, 9, 24):  # bands of 1, 8, 15 and 13 rows
            png.write_rows(image[y : {0: 1, 1: 9, 9: 24, 24: 37}[y]])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), image)


def test_patches_written_while_tissue_is_found_give_the_same_files(
    tmp_path, synthetic_slide, monkeypatch
):
    """min_tissue 0 keeps every position: the patches are written while the tissue is found
    (in a thread, which uses threads of its own). Every file is as when the patches wait for the
    tissue (a tiny min_tissue > 0 keeps every position too) and everything runs in one thread."""
    from histo_wsl.tissue import detect

    params = dict(thumbnail_mpp=0.9, max_patches=40)  # level 0 held, resampled thumbnail
    extract_patches(
        [_item(synthetic_slide)],
        tmp_path / "background",
        ExtractParams(min_tissue=0.0, **params),
        BatchOptions(quiet=True),
    )
    monkeypatch.setattr(detect, "work_threads", lambda: 1)
    extract_patches(
        [_item(synthetic_slide)],
        tmp_path / "waiting",
        ExtractParams(min_tissue=1e-12, **params),
        BatchOptions(quiet=True),
    )
    one, two = _outputs(tmp_path / "background"), _outputs(tmp_path / "waiting")
    assert sum(k.endswith(".png") for k in one) == 40 + 3 and one == two
    records = [
        json.loads((tmp_path / d / "synth" / "slide.json").read_text())
        for d in ("background", "waiting")
    ]
    for record in records:
        for key in ("seconds", "finished"):
            record.pop(key)
    assert records[0] == records[1]


@pytest.mark.parametrize("source", ["held", "slide"])
def test_whole_thumbnail_in_threads_reads_the_rows_reader_pixels(synthetic_slide, source):
    from histo_wsl.slideio.slide import open_slide, read_thumbnail_rows, thumbnail_geometry
    from histo_wsl.tissue.scan import HeldLevel, read_whole_thumbnail

    with open_slide(synthetic_slide) as slide:
        for mpp in (0.9, 2.0, 8.0):  # resampled from level 0, then from coarser levels
            geometry = thumbnail_geometry(slide, mpp=mpp, min_size=256)
            pixels = HeldLevel.read(slide) if source == "held" else slide
            got = read_whole_thumbnail(pixels, geometry)
            want = read_thumbnail_rows(pixels, geometry, 0, geometry.height)
            assert got.shape == (geometry.height, geometry.width, 3)
            np.testing.assert_array_equal(got, want)
