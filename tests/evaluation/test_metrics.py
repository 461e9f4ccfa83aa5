"""Metrics: PxAP as in method.md §4.1, the TMI per-image protocol, classification, bootstrap."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from histo_wsl.errors import InputError
from histo_wsl.evaluation.bootstrap import bootstrap_ci
from histo_wsl.evaluation.metrics import (
    BIN_EDGES,
    THRESHOLDS,
    ClassificationMeter,
    PerImageMeter,
    PxAPMeter,
    dice,
    iou,
)


def _random_case(seed: int, shape=(64, 64), signal: float = 0.35):
    rng = np.random.default_rng(seed)
    gt = rng.random(shape) < 0.4
    scores = np.clip(signal * gt + (1 - signal) * rng.random(shape), 0.0, 1.0)
    return scores, gt


def _sk_ap(scores, gt) -> float:
    return 100.0 * average_precision_score(np.ravel(gt).astype(int), np.ravel(scores))


# ---- constants -------------------------------------------------------------------------------------


def test_threshold_grid_and_edges():
    assert THRESHOLDS.shape == (1000,)
    assert THRESHOLDS[0] == 0.0 and THRESHOLDS[1] == 0.001 and THRESHOLDS[-1] == 0.999
    assert BIN_EDGES.shape == (1003,)
    assert list(BIN_EDGES[-4:]) == [0.999, 1.0, 2.0, 3.0]


def test_histogram_matches_np_histogram_including_edges():
    rng = np.random.default_rng(1)
    scores = np.concatenate(
        [rng.random(5000), THRESHOLDS, [0.0, 1.0, 1.0, 0.9995, np.nextafter(1.0, 0)]]
    )
    m = PxAPMeter()
    m.update(scores, np.ones_like(scores, dtype=bool))
    expected, _ = np.histogram(scores, bins=BIN_EDGES)
    np.testing.assert_array_equal(m.pos_hist, expected)
    assert m.pos_hist[1000] == 2  # the two scores exactly 1.0 are in bin [1, 2)


# ---- PxAP sanity checks of §4.1 -------------------------------------------------------------------


def test_constant_map_scores_positive_rate():
    _, gt = _random_case(2)
    m = PxAPMeter()
    m.update(np.full(gt.shape, 0.3), gt)
    assert m.pxap() == pytest.approx(100.0 * gt.mean(), abs=1e-9)


def test_perfect_binary_map_scores_100():
    _, gt = _random_case(3)
    m = PxAPMeter()
    m.update(gt.astype(np.float32), gt)
    assert m.pxap() == pytest.approx(100.0)


def test_scores_exactly_one_are_counted():
    # Positives exactly 1.0, negatives just below: an implementation that drops the top bin
    # (the off-by-one of §4.1) would not reach 100 here.
    rng = np.random.default_rng(4)
    gt = rng.random((32, 32)) < 0.5
    scores = np.where(gt, 1.0, 0.9995)
    m = PxAPMeter()
    m.update(scores, gt)
    assert m.pxap() == pytest.approx(100.0)
    # Half the positives at 1.0, half at 0.5, negatives at 0.7: AP = 0.5 + 0.5 * P / (P + N).
    gt = np.zeros(400, dtype=bool)
    gt[:100] = True
    scores = np.full(400, 0.7)
    scores[:50] = 1.0
    scores[50:100] = 0.5
    m = PxAPMeter()
    m.update(scores, gt)
    assert m.pxap() == pytest.approx(100 * (0.5 + 0.5 * 100 / 400))
    assert m.pxap() == pytest.approx(_sk_ap(scores, gt))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_sklearn_on_grid_quantised_scores(seed):
    scores, gt = _random_case(seed)
    quantised = np.floor(scores * 1000) / 1000  # same ties for both implementations
    m = PxAPMeter()
    m.update(quantised, gt)
    assert abs(m.pxap() - _sk_ap(quantised, gt)) < 1e-6 * 100


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_close_to_sklearn_on_raw_scores(seed):
    # Binning to 0.001 only merges near-ties; tolerance 0.5 PxAP points (observed ~0.03).
    scores, gt = _random_case(seed)
    m = PxAPMeter()
    m.update(scores, gt)
    assert abs(m.pxap() - _sk_ap(scores, gt)) < 0.5


def test_no_positive_pixel_gives_nan():
    m = PxAPMeter()
    assert np.isnan(m.pxap())
    m.update(np.full((4, 4), 0.5), np.zeros((4, 4), bool))
    assert np.isnan(m.pxap())


def test_clipping_and_nan_handling():
    gt = np.array([[1, 0], [1, 0]])
    m = PxAPMeter()
    m.update(np.array([[1.7, np.nan], [2.0, -3.0]]), gt)
    assert m.pos_hist[1000] == 2 and m.neg_hist[0] == 2
    assert m.pxap() == pytest.approx(100.0)


def test_ignore_mask_excludes_pixels():
    scores = np.array([[0.9, 0.8], [0.1, 0.95]])
    gt = np.array([[1, 0], [1, 0]])
    ignore = np.array([[0, 0], [0, 255]], dtype=np.uint8)
    m = PxAPMeter()
    m.update(scores, gt, ignore=ignore)
    assert m.n_pos == 2 and m.n_neg == 1


def test_gt_threshold_half_and_torch_input():
    torch = pytest.importorskip("torch")
    scores, gt = _random_case(5, shape=(16, 16))
    a, b = PxAPMeter(), PxAPMeter()
    a.update(scores, gt)
    b.update(torch.tensor(scores, requires_grad=True), torch.tensor(gt.astype(np.uint8) * 255))
    np.testing.assert_array_equal(a.pos_hist, b.pos_hist)
    np.testing.assert_array_equal(a.neg_hist, b.neg_hist)


# ---- streaming, merge, checkpoint ------------------------------------------------------------------


def _cases(n: int = 5):
    return [_random_case(10 + i, shape=(20 + 3 * i, 24)) for i in range(n)]


def test_streaming_equals_one_concatenated_update():
    cases = _cases()
    streamed = PxAPMeter()
    for s, g in cases:
        streamed.update(s, g)
    whole = PxAPMeter()
    whole.update(
        np.concatenate([s.ravel() for s, _ in cases]), np.concatenate([g.ravel() for _, g in cases])
    )
    np.testing.assert_array_equal(streamed.pos_hist, whole.pos_hist)
    np.testing.assert_array_equal(streamed.neg_hist, whole.neg_hist)
    assert streamed.pxap() == whole.pxap()
    assert streamed.n_images == 5


def test_merge_and_state_dict_equal_single_meter():
    cases = _cases()
    single, a, b = PxAPMeter(), PxAPMeter(), PxAPMeter()
    for i, (s, g) in enumerate(cases):
        single.update(s, g)
        (a if i % 2 else b).update(s, g)
    a.merge(b)
    assert a.pxap() == single.pxap() and a.n_images == single.n_images
    state = json.loads(json.dumps(single.state_dict()))  # plain lists / ints
    restored = PxAPMeter()
    restored.load_state_dict(state)
    assert restored.pxap() == single.pxap() and restored.n_images == 5
    assert restored.dice_iou(0.5) == single.dice_iou(0.5)


def test_normal_images_only_add_false_positives():
    scores, gt = _random_case(6)
    m = PxAPMeter()
    m.update(scores, gt)
    before, pos_before = m.pxap(), m.pos_hist.copy()
    m.update(np.full((64, 64), 0.6), np.zeros((64, 64), bool))  # a normal (empty-GT) image
    np.testing.assert_array_equal(m.pos_hist, pos_before)
    assert m.n_neg == int((~gt).sum()) + 64 * 64
    assert m.pxap() < before


# ---- dataset-level Dice / IoU and the curve --------------------------------------------------------


def test_dice_iou_dataset_level_counts():
    scores = np.array([[0.9, 0.6, 0.2, 0.0], [0.8, 0.4, 0.7, 0.1]])
    gt = np.array([[1, 1, 0, 0], [1, 1, 0, 0]])
    m = PxAPMeter()
    m.update(scores, gt)
    r = m.dice_iou(0.5)
    # predicted >= 0.5: 0.9, 0.6, 0.8, 0.7 -> TP 3, FP 1, FN 1, TN 3
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (3, 1, 1, 3)
    assert r["dice_fg"] == pytest.approx(6 / 8) and r["dice_bg"] == pytest.approx(6 / 8)
    assert r["iou_fg"] == pytest.approx(3 / 5) and r["miou"] == pytest.approx(3 / 5)
    assert r["tpr"] == pytest.approx(0.75) and r["fpr"] == pytest.approx(0.25)
    assert m.dice_iou(0.5004)["threshold"] == 0.5  # snapped to the 0.001 grid
    assert m.dice_iou(1.0)["tp"] == 0
    with pytest.raises(ValueError):
        m.dice_iou(1.5)


def test_best_threshold_and_curve():
    scores = np.array([0.9, 0.8, 0.75, 0.3, 0.2, 0.1])
    gt = np.array([1, 1, 0, 1, 0, 0])
    m = PxAPMeter()
    m.update(scores, gt)
    tau, r = m.best_threshold("miou")
    curve = m.curve()
    fp, fn, tn, tp = curve["fp"], curve["fn"], curve["tn"], curve["tp"]
    miou = (tp / (tp + fp + fn) + tn / (tn + fp + fn)) / 2
    assert r["miou"] == pytest.approx(miou.max())
    assert tau == THRESHOLDS[int(np.argmax(miou))]
    tau_d, r_d = m.best_threshold("dice_fg")
    assert r_d["dice_fg"] >= m.dice_iou(0.5)["dice_fg"]
    assert set(curve) == {"thresholds", "precision", "recall", "tp", "fp", "fn", "tn"}
    assert all(v.shape == (1000,) for v in curve.values())
    assert curve["tp"][0] == 3 and curve["fp"][0] == 3 and curve["recall"][0] == 1.0
    assert np.isnan(curve["precision"][950])  # no score >= 0.95
    with pytest.raises(ValueError):
        m.best_threshold("accuracy")


# ---- helpers ---------------------------------------------------------------------------------------


def test_dice_iou_helpers_4x4():
    pred = np.zeros((4, 4), bool)
    gt = np.zeros((4, 4), bool)
    pred[:2, :2] = True  # 4 px
    gt[:2, :3] = True  # 6 px, overlap 4
    assert dice(pred, gt) == pytest.approx(8 / 10)
    assert iou(pred, gt) == pytest.approx(4 / 6)
    assert dice(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0
    assert iou(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0
    assert dice(np.zeros((4, 4)), gt) == 0.0
    assert dice(pred.astype(float), gt.astype(np.uint8)) == dice(pred, gt)


@pytest.mark.parametrize(
    "call",
    [
        lambda: PxAPMeter().update(np.zeros((4, 4)), np.zeros((4, 5))),
        lambda: PxAPMeter().update(np.zeros((4, 4)), np.zeros((4, 4)), ignore=np.zeros(3)),
        lambda: PerImageMeter().update(np.zeros((3, 4)), np.zeros((4, 3))),
        lambda: dice(np.zeros((4, 4)), np.zeros((2, 2))),
    ],
)
def test_shape_mismatch_raises(call):
    with pytest.raises(ValueError, match="shape") as info:
        call()
    assert isinstance(info.value, InputError)


# ---- TMI per-image protocol ------------------------------------------------------------------------


def test_per_image_hand_case_and_f1_only_over_roi_images():
    meter = PerImageMeter()
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True
    scores = np.zeros((4, 4))
    scores[:2, :3] = 0.9  # TP 4, FP 2, FN 0, TN 10
    row = meter.update(scores, gt, name="a")
    assert row["dice_fg"] == pytest.approx(8 / 10)
    assert row["dice_bg"] == pytest.approx(20 / 22)
    assert row["iou_fg"] == pytest.approx(4 / 6) and row["iou_bg"] == pytest.approx(10 / 12)
    # Normal image, empty prediction: F1+ of two empty sets is 1.0 but the image is not in f1_pos.
    row = meter.update(np.full((4, 4), 0.1), np.zeros((4, 4)), name="normal_ok")
    assert row["dice_fg"] == 1.0 and row["dice_bg"] == 1.0 and not row["has_roi"]
    # Normal image with false positives: F1+ = 0 (excluded from f1_pos), F1- counts.
    row = meter.update(np.where(np.arange(16).reshape(4, 4) < 4, 0.8, 0.0), np.zeros((4, 4)))
    assert row["dice_fg"] == 0.0 and row["dice_bg"] == pytest.approx(24 / 28)
    # ROI image, empty prediction: F1+ = 0.
    row = meter.update(np.zeros((4, 4)), gt, name="missed")
    assert row["dice_fg"] == 0.0
    # Image entirely foreground, fully predicted: no background -> excluded from f1_neg.
    row = meter.update(np.ones((4, 4)), np.ones((4, 4)), name="all_fg")
    assert row["dice_bg"] == 1.0 and not row["has_background"]

    assert meter.f1_pos() == pytest.approx(np.mean([0.8, 0.0, 1.0]))
    assert meter.f1_neg() == pytest.approx(np.mean([20 / 22, 1.0, 24 / 28, 12 / 14]))
    rows = meter.rows()
    assert [r["name"] for r in rows] == ["a", "normal_ok", "image_00002", "missed", "all_fg"]
    assert len(meter) == 5


def test_per_image_threshold_is_greater_or_equal():
    meter = PerImageMeter()
    row = meter.update(np.array([[0.5, 0.49]]), np.array([[1, 0]]), threshold=0.5)
    assert (row["tp"], row["fp"], row["fn"], row["tn"]) == (1, 0, 0, 1)


def test_per_image_empty_meter_and_merge():
    a, b = PerImageMeter(), PerImageMeter()
    assert np.isnan(a.f1_pos()) and np.isnan(a.f1_neg())
    a.update(np.ones((2, 2)), np.ones((2, 2)))
    b.update(np.zeros((2, 2)), np.ones((2, 2)))
    a.merge(b)
    assert a.f1_pos() == pytest.approx(0.5)


# ---- classification --------------------------------------------------------------------------------


def test_confusion_matrix_hand_case():
    m = ClassificationMeter(3, class_names=["a", "b", "c"])
    logits = np.array([[3.0, 0, 0], [0, 2, 0], [0, 0, 1], [0, 5, 0]])
    m.update(logits, [0, 1, 2, 2])  # last one: true c predicted b
    m.update(np.array([0, 2]), np.array([1, 2]))  # true b predicted a; true c predicted c
    expected = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 2]])
    np.testing.assert_array_equal(m.confusion(), expected)
    assert m.accuracy() == pytest.approx(100 * 4 / 6)
    assert m.error() == pytest.approx(100 * 2 / 6)
    pc = m.per_class()
    assert pc["a"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}
    assert pc["b"]["precision"] == 0.5 and pc["b"]["recall"] == 0.5
    assert pc["c"]["precision"] == 1.0 and pc["c"]["recall"] == pytest.approx(2 / 3)
    other = ClassificationMeter(3)
    other.load_state_dict(json.loads(json.dumps(m.state_dict())))
    other.merge(m)
    np.testing.assert_array_equal(other.confusion(), 2 * expected)


def test_classification_bad_inputs():
    m = ClassificationMeter(2)
    assert np.isnan(m.accuracy())
    with pytest.raises(ValueError):
        m.update(np.zeros((2, 3)), [0, 1])
    with pytest.raises(ValueError):
        m.update([0, 2], [0, 1])
    with pytest.raises(ValueError):
        m.update([0, 1, 1], [0, 1])
    with pytest.raises(ValueError):
        m.update([0.2, 0.7], [0, 1])


# ---- bootstrap -------------------------------------------------------------------------------------


def test_bootstrap_seeded_and_contains_mean():
    values = np.random.default_rng(7).random(60)
    ci = bootstrap_ci(values, n=500, seed=3)
    assert ci == bootstrap_ci(values, n=500, seed=3)
    assert ci != bootstrap_ci(values, n=500, seed=4)
    assert ci[0] < values.mean() < ci[1]
    lo, hi = bootstrap_ci(np.append(values, np.nan), n=500, seed=3)  # NaN dropped
    assert (lo, hi) == ci
    med = bootstrap_ci(values, n=200, seed=0, statistic=lambda v: float(np.median(v)))
    assert med[0] <= np.median(values) <= med[1]
    assert all(np.isnan(bootstrap_ci([], n=10)))


def test_module_does_not_import_torch():
    code = "import sys, histo_wsl.evaluation.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
