import cv2
import numpy as np
import pytest

from histo_wsl.errors import InputError
from histo_wsl.synthetic.slides import make_layout, render_region, tissue_mask_region
from histo_wsl.tissue.detect import (
    TissueParams,
    detect_tissue,
    detect_tissue_strips,
    otsu_from_histogram,
    otsu_threshold,
)
from histo_wsl.tissue.packed import PackedMask

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


# -- tissue fraction of boxes ---------------------------------------------------------------------


# -- GeoJSON --------------------------------------------------------------------------------------


# -- GeoJSON files --------------------------------------------------------------------------------


# -- real slide -----------------------------------------------------------------------------------


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


def test_otsu_from_histogram_matches_otsu_of_values():
    vals = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint8)
    assert otsu_from_histogram(np.bincount(vals, minlength=256)) == otsu_threshold(vals)
    assert otsu_from_histogram(np.zeros(256)) == 0.0
    with pytest.raises(ValueError):
        otsu_from_histogram(np.zeros(10))


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


@pytest.mark.parametrize("seed", range(4))
def test_detection_shared_among_threads_equals_whole_image_detection(seed, monkeypatch):
    """The median filter and the closing cut into bands for threads: the same mask."""
    from histo_wsl.tissue import detect

    monkeypatch.setattr(detect, "PARALLEL_MIN_ROWS", 8)  # small images split too
    rng = np.random.default_rng(100 + seed)
    h, w = (int(v) for v in rng.integers(40, 220, 2))
    img = _random_thumbnail(rng, h, w)
    mpp = float(rng.uniform(1, 6))  # fine: large median and closing kernels, many rows of halo
    params = TissueParams(min_object_um2=float(rng.uniform(0, 2e4)))
    expected = _whole_image_recipe(img, mpp, params)
    for threads in (1, 2, 3):
        monkeypatch.setattr(detect, "work_threads", lambda threads=threads: threads)
        for rows in (16, 10_000):
            got = detect_tissue_strips(lambda a, b: img[a:b], (h, w), mpp, params, strip_rows=rows)
            assert np.array_equal(got.to_bool(), expected), (threads, rows)


def test_median_blur_in_bands_equals_one_call(monkeypatch):
    import cv2

    from histo_wsl.tissue import detect

    monkeypatch.setattr(detect, "PARALLEL_MIN_ROWS", 4)
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, (97, 61, 3), dtype=np.uint8)
    for threads in (2, 3, 4):
        monkeypatch.setattr(detect, "work_threads", lambda threads=threads: threads)
        for k in (3, 5, 7, 31):
            assert np.array_equal(detect._median_blur(img, k), cv2.medianBlur(img, k)), (threads, k)


def test_work_threads_is_between_one_and_the_cap():
    from histo_wsl.tissue.detect import MAX_WORK_THREADS, work_threads

    assert 1 <= work_threads() <= MAX_WORK_THREADS
