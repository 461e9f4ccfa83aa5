"""The windows of a slide, read in batches: what the engine feeds the model.

:class:`WindowBatches` is a map-style dataset (batch ``i`` of a window grid, each worker opening its
own slide handle); :class:`Prefetch` reads the next batches on a thread while the model runs.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from histo_wsl.slideio.slide import ReadPlan, Slide, open_slide, read_patch

if TYPE_CHECKING:
    import torch

    from histo_wsl.tissue.scan import HeldLevel

__all__ = ["FIRST_BATCH", "Prefetch", "WindowBatches"]


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
        import torch

        if not 0 <= i < len(self):
            raise IndexError(i)
        if self._slide is None:
            self._slide = open_slide(self.path, mpp=self.slide_mpp)
        lo, hi = self.bounds[i], self.bounds[i + 1]
        out = np.empty((hi - lo, self.size, self.size, 3), dtype=np.uint8)
        for j, k in enumerate(range(lo, hi)):
            loc = (int(self.xs[k]), int(self.ys[k]))
            out[j] = np.asarray(read_patch(self._slide, self.plan, loc, (self.size, self.size)))
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
