"""Memory handed back to the operating system after large temporaries (long runs stay flat)."""

from __future__ import annotations

import functools
from collections.abc import Callable

__all__ = ["release_freed_memory"]


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
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """The C library's ``malloc_trim`` (glibc), or None where there is none (macOS, musl...)."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
