"""The windows of a slide, read in batches: what the engine feeds the model.

:class:`WindowBatches` is a map-style dataset (batch ``i`` of a window grid, each worker opening its
own slide handle); :class:`Prefetch` reads the next batches on a thread while the model runs,
:class:`InlineReads` reads each batch between two forwards on every core, and
:class:`FollowingReads` takes one or the other batch by batch, as the forward's threads change.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from histo_wsl.slideio.slide import ReadPlan, Slide, open_slide, read_patch

if TYPE_CHECKING:
    import torch

    from histo_wsl.tissue.scan import HeldLevel

__all__ = ["FIRST_BATCH", "FollowingReads", "InlineReads", "Prefetch", "WindowBatches"]


# -- windows ------------------------------------------------------------------------------------
#: windows in the first batch (see :class:`WindowBatches`)
FIRST_BATCH = 4


class WindowBatches:
    """Batch ``i`` of the windows as a uint8 tensor (B, S, S, 3); a map-style dataset.

    The slide opens lazily: each DataLoader worker process opens its own handle (never shared
    across processes); in this process an open slide can be passed in.

    Args:
        path: the slide file.
        slide_mpp: its level-0 µm/px override, if any.
        plan: how to read at the model's resolution.
        xs: level-0 x of each window.
        ys: level-0 y of each window.
        size: window side in pixels at the plan's resolution.
        batch_size: windows per batch.
        slide: an open slide to use in this process.
        first_batch: windows in the first batch (default :data:`FIRST_BATCH`, at most
            ``batch_size``): the model starts once it is read, while the reader reads on, instead
            of idling for a whole batch (on a 20-window slide a 16-window first read was a
            sixth of its time).
    """

    def __init__(
        self,
        path: Path,
        slide_mpp: float | None,
        plan: ReadPlan,
        xs: np.ndarray,
        ys: np.ndarray,
        size: int,
        batch_size: int,
        slide: Slide | HeldLevel | None = None,
        first_batch: int | None = None,
    ) -> None:
        self.path, self.slide_mpp, self.plan = path, slide_mpp, plan
        self.xs, self.ys, self.size, self.batch_size = xs, ys, size, batch_size
        self._slide = slide
        first = min(batch_size, FIRST_BATCH if first_batch is None else max(1, first_batch))
        n = len(xs)
        #: index of each batch's first window, and the end
        self.bounds = [0, *range(min(first, n), n, batch_size), n] if n else [0]

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_slide"] = None  # a worker opens its own
        return state

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.read(i)

    def read(self, i: int, pool: ThreadPoolExecutor | None = None) -> torch.Tensor:
        """Batch ``i``; with a ``pool`` its windows are read by the pool's threads.

        OpenSlide, the TIFF tile reader's decoder, Pillow's resize and a held level's crops
        release the GIL, and one slide handle serves several threads.
        """
        import torch

        if not 0 <= i < len(self):
            raise IndexError(i)
        if self._slide is None:
            self._slide = open_slide(self.path, mpp=self.slide_mpp)
        lo, hi = self.bounds[i], self.bounds[i + 1]
        out = np.empty((hi - lo, self.size, self.size, 3), dtype=np.uint8)

        def one(j: int) -> None:
            loc = (int(self.xs[lo + j]), int(self.ys[lo + j]))
            out[j] = np.asarray(read_patch(self._slide, self.plan, loc, (self.size, self.size)))

        if pool is None or hi - lo < 2:
            for j in range(hi - lo):
                one(j)
        else:
            list(pool.map(one, range(hi - lo)))
        return torch.from_numpy(out)


class Prefetch:
    """Iterate ``source`` in a background thread, at most ``depth`` items ahead."""

    _END = object()

    def __init__(self, source: Iterable, depth: int = 3) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source: Iterable) -> None:
        try:
            for item in source:
                if not self._put((True, item)):
                    return
            self._put((True, self._END))
        except BaseException as exc:  # handed to the consumer
            self._put((False, exc))

    def __iter__(self) -> Iterator:
        while True:
            ok, item = self._queue.get()
            if not ok:
                raise item
            if item is self._END:
                return
            yield item

    def close(self) -> None:
        """Stop the thread (unblocking it if the queue is full)."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)


class InlineReads:
    """Iterate a :class:`WindowBatches` in the caller's thread, each batch read by ``threads``.

    For a CPU forward whose threads fill every core. A reader thread running beside such a
    forward (:class:`Prefetch`) preempts one of its OpenMP threads, and the others wait for that
    one at the operator's end, spinning: every core loses the reader's time, not one core. Read
    between two forwards, the batch takes every core for the reading alone. On the 40,000 ×
    4,480 band at 2 threads of 2 cores, nine alternating pairs of localize runs gave 17.1
    windows/s read here against 16.0 read by a prefetch thread, faster in 7 of the 9 pairs: a
    small gain, near the noise of a shared VM (docs/results.md, *Reading between forwards*).

    Args:
        batches: the dataset.
        threads: threads sharing each batch's windows (at least 1).
    """

    def __init__(self, batches: WindowBatches, threads: int) -> None:
        self._batches = batches
        self._pool = (
            ThreadPoolExecutor(threads, thread_name_prefix="histo-wsl-read")
            if threads > 1
            else None
        )

    def __iter__(self) -> Iterator:
        for i in range(len(self._batches)):
            yield self.read(i)

    def read(self, i: int) -> torch.Tensor:
        """Batch ``i``, its windows shared by the threads."""
        return self._batches.read(i, self._pool)

    def close(self) -> None:
        """Stop the reading threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class FollowingReads:
    """Each batch read between forwards while ``between()`` holds, by a prefetch thread otherwise.

    ``between`` is asked before every batch: in ``localize`` it is
    :func:`histo_wsl.inference.engine.reads_between_forwards`, true while the forward's threads
    fill every core, and the thread governor changes those threads when another process starts
    or ends mid-slide. Decided once per slide instead, a slide that began before the governor's
    first measurement kept its reads between forwards after ``--threads`` auto had dropped to one
    thread beside a busy process, and left the second core idle while it read: 3.3 s of read wait
    on the 40,000 × 4,480 band, against 0.2-0.5 s with the reader beside the forward
    (docs/results.md, *The reader following the threads*).

    A switch to the prefetch thread starts it at the next batch; a switch back stops it, and the
    batches it had read ahead (at most ``depth``) are read again between forwards.

    Args:
        batches: the dataset.
        between: whether the next batch is read between forwards.
        threads: threads sharing a batch read between forwards (at least 1).
        depth: batches the prefetch thread reads ahead.
    """

    def __init__(
        self, batches: WindowBatches, between: Callable[[], bool], threads: int, depth: int = 3
    ) -> None:
        self._batches, self._between, self._depth = batches, between, depth
        self._inline = InlineReads(batches, threads)
        self._ahead: Prefetch | None = None
        #: batches read between forwards, and by the prefetch thread
        self.counts = {"between_forwards": 0, "ahead": 0}

    def __iter__(self) -> Iterator:
        n = len(self._batches)
        ahead: Iterator = iter(())
        for i in range(n):
            if self._between():
                self._stop_ahead()
                self.counts["between_forwards"] += 1
                yield self._inline.read(i)
                continue
            if self._ahead is None:  # a prefetch thread from this batch on
                self._ahead = Prefetch((self._batches[j] for j in range(i, n)), self._depth)
                ahead = iter(self._ahead)
            self.counts["ahead"] += 1
            yield next(ahead)

    def _stop_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None

    def close(self) -> None:
        """Stop the prefetch thread and the reading threads."""
        self._stop_ahead()
        self._inline.close()
