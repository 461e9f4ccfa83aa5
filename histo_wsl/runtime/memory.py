"""Freed memory: handed back to the operating system after large temporaries, reused in between.

Long runs stay flat (:func:`release_freed_memory`), and a forward's activations reuse the last
batch's pages instead of mapping fresh ones (:func:`reuse_freed_memory`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

__all__ = ["release_freed_memory", "reuse_freed_memory"]

#: glibc's ``mallopt`` parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: blocks up to this size come from the heap (glibc's largest dynamic threshold; larger ones,
#: such as a big thumbnail's arrays, are still mapped and unmapped on their own)
MMAP_THRESHOLD = 32 << 20
#: free memory at the top of the heap kept for reuse until :func:`release_freed_memory`
TRIM_THRESHOLD = 128 << 20
#: environment variables through which a user sets glibc's allocator; when one is set, it wins
_USER_SETTINGS = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "GLIBC_TUNABLES",
)


# -- one slide ----------------------------------------------------------------------------------
def release_freed_memory(collect: bool = False) -> None:
    """Hand memory freed by large temporaries back to the OS (glibc only; a no-op elsewhere).

    ``collect``: run a garbage-collection pass first, so that objects held only by reference
    cycles are freed too. Training does before each epoch's data-loader workers fork: after an
    epoch the heap holds gigabytes of freed activation memory, which every forked worker would
    inherit and, as the parent reuses those pages, copy (``benchmarks/train_memory.py``, GlaS,
    batch 16, 2 workers, 2 epochs: 10.5 GB of summed RSS without the trim, 5.5 GB with it).

    glibc keeps freed blocks of up to 32 MB in its heaps for reuse (its mmap threshold rises with
    the largest block freed), so the temporaries of tissue detection on a big thumbnail, and the
    windows and activations of past batches, would stay resident: without this, peak memory grows
    with the slide and the number of windows (benchmarks/localize_memory.py).
    """
    if collect:
        import gc

        gc.collect()
    trim = _libc("malloc_trim")
    if trim is not None:
        trim(0)


def reuse_freed_memory() -> bool:
    """Keep a forward's freed activations in the heap for the next batch (glibc only).

    glibc maps a block above its mmap threshold afresh on each allocation and gives the pages
    back on each free, and it trims the heap's free top as soon as it exceeds its trim
    threshold; both thresholds start low (128 KB) and rise only with the blocks freed, so every
    batch of a CPU forward page-faulted its activations back in: on the 40,000 × 4,480 band,
    1.3-2.0 million minor faults and 4.5-6.5 s of system time in a 40 s ``localize`` at 2
    threads (0.6-0.8 million and 2.1-2.5 s with these thresholds).
    Fixed thresholds (:data:`MMAP_THRESHOLD`, :data:`TRIM_THRESHOLD`) reuse those pages;
    :func:`release_freed_memory`, called every few seconds, still hands them back, so peak memory
    stays bounded. Leaves the allocator alone when the user configured it through the
    environment, and does nothing outside glibc.

    Returns:
        Whether the thresholds were set.
    """
    import os

    mallopt = _libc("mallopt")
    if mallopt is None or any(os.environ.get(v) for v in _USER_SETTINGS):
        return False
    # both: a fixed trim threshold alone leaves the mmap one at 128 KB, a fixed mmap one alone
    # leaves the trim one at 128 KB: either alone made the forward fault more, not less
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


@functools.cache
def _libc(name: str) -> Callable[..., int] | None:
    """The C library's function ``name`` (glibc), or None where there is none (macOS, musl...)."""
    import ctypes

    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None
