"""Packed 1-bit masks: round trip and counts."""

import numpy as np
import pytest

from histo_wsl.tissue.packed import PackedMask


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


@pytest.mark.parametrize("threads", [2, 3])
def test_closing_strips_in_threads_equals_one_thread(threads):
    from histo_wsl.tissue.packed import closing_strips

    rng = np.random.default_rng(threads)
    mask = rng.random((83, 47)) > 0.7
    read = lambda a, b: mask[a:b]  # noqa: E731
    for rows in (5, 16, 100):
        one = closing_strips(read, mask.shape, 9, rows)
        many = closing_strips(read, mask.shape, 9, rows, threads=threads)
        assert np.array_equal(one.to_bool(), many.to_bool()), rows
