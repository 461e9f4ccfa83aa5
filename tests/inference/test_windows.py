"""histo_wsl.inference.windows: batches of windows, read ahead or between forwards."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from histo_wsl.inference import engine
from histo_wsl.inference.windows import (
    FIRST_BATCH,
    FollowingReads,
    InlineReads,
    Prefetch,
    WindowBatches,
)
from histo_wsl.slideio.slide import open_slide, plan_read


@pytest.fixture()
def batches(synthetic_slide):
    with open_slide(synthetic_slide) as s:
        plan = plan_read(s, mpp=2.0)
        w, h = s.dimensions
    xs, ys = np.meshgrid(np.arange(0, w - 400, 300), np.arange(0, h - 400, 300))
    return WindowBatches(synthetic_slide, None, plan, xs.ravel(), ys.ravel(), 64, 8)


def test_a_pool_reads_the_same_windows(batches):
    from concurrent.futures import ThreadPoolExecutor

    assert len(batches.xs) > 8 and batches.bounds[1] == FIRST_BATCH
    with ThreadPoolExecutor(3) as pool:
        for i in range(len(batches)):
            alone, pooled = batches[i], batches.read(i, pool)
            assert alone.shape == pooled.shape and alone.shape[1:] == (64, 64, 3)
            assert np.array_equal(alone.numpy(), pooled.numpy())
    with pytest.raises(IndexError):
        batches.read(len(batches))


def test_inline_reads_give_every_batch_in_order_and_stop_their_threads(batches):
    before = threading.active_count()
    reads = InlineReads(batches, threads=2)
    got = list(reads)
    assert len(got) == len(batches)
    for i, batch in enumerate(got):
        assert np.array_equal(batch.numpy(), batches[i].numpy())
    reads.close()
    reads.close()  # twice is harmless
    assert threading.active_count() == before
    assert len(list(InlineReads(batches, threads=1))) == len(batches)  # no pool at all


@pytest.mark.parametrize(
    "rule",
    [
        [True] * 99,
        [False] * 99,
        [True, False, False, True, True, False, True, False] * 12,  # the load comes and goes
        [False, False, False, True] * 25,  # back between forwards after the thread read ahead
    ],
)
def test_following_reads_give_every_batch_in_order_whichever_reader(batches, rule):
    before = threading.active_count()
    asked = iter(rule)
    reads = FollowingReads(batches, asked.__next__, threads=2, depth=2)
    got = list(reads)
    assert len(got) == len(batches) > 4
    for i, batch in enumerate(got):
        assert np.array_equal(batch.numpy(), batches[i].numpy())
    expected = rule[: len(batches)]
    assert reads.counts == {
        "between_forwards": sum(expected),
        "ahead": len(expected) - sum(expected),
    }
    reads.close()
    reads.close()  # twice is harmless
    assert threading.active_count() == before


def test_following_reads_hand_on_a_read_error_and_stop_their_threads(batches, monkeypatch):
    before = threading.active_count()
    real = WindowBatches.read

    def read(self, i, pool=None):
        if i == 3:
            raise ValueError("unreadable tile")
        return real(self, i, pool)

    monkeypatch.setattr(WindowBatches, "read", read)
    for between in (True, False):
        reads = FollowingReads(batches, lambda between=between: between, threads=2)
        got = []
        with pytest.raises(ValueError, match="unreadable tile"):
            for batch in reads:
                got.append(batch)
        reads.close()
        assert len(got) == 3
    assert threading.active_count() == before


def test_prefetch_gives_every_item_and_hands_on_an_error():
    assert list(Prefetch(iter(range(7)), depth=2)) == list(range(7))

    def failing():
        yield 1
        raise ValueError("unreadable tile")

    got = []
    with pytest.raises(ValueError, match="unreadable tile"):
        for item in Prefetch(failing()):
            got.append(item)
    assert got == [1]


@pytest.mark.parametrize(
    ("threads", "cores", "expected"),
    [(2, 2, True), (4, 2, True), (1, 2, False), (3, 4, False), (1, 1, False)],
)
def test_windows_are_read_between_forwards_when_the_forward_fills_every_core(
    monkeypatch, threads, cores, expected
):
    monkeypatch.setattr(engine, "usable_cores", lambda: cores)
    updates = []

    class Governor:
        def __init__(self) -> None:
            self.threads = cores  # as chosen at the model's load, before any load was measured

        def update(self) -> None:  # the load measured again: fewer threads, or as many
            updates.append(1)
            self.threads = threads

    cpu = SimpleNamespace(governor=Governor())
    assert engine.reads_between_forwards(cpu) is expected
    assert updates == [1]
    assert engine.reads_between_forwards(SimpleNamespace(governor=None)) is False  # a GPU
