"""Window reads: the direct TIFF tile reader against OpenSlide, on the windows ``localize`` reads.

For each slide, the sliding-window grid ``localize`` lays at ``--mpp`` (``--size`` px windows,
``--overlap``; :func:`histo_wsl.slideio.grid.cover_grid`), its first ``--windows`` windows in
row order, are read with :func:`histo_wsl.slideio.slide.read_patch` twice per repeat, once by
each reader, each from a freshly opened slide (cold caches, as a slide starts):

* ``tiles``: the default, Aperio SVS and generic TIFF tiles decoded by histo-wsl
  (:mod:`histo_wsl.slideio.tiff_tiles`);
* ``openslide``: the same with the tile reader off (``HISTO_WSL_TILE_READER=openslide``).

Per reader: CPU-ms per window (``time.thread_time``, one thread) and the best of ``--repeats``
interleaved passes; ``speedup`` = OpenSlide's CPU per window / the tile reader's. ``equal``: every
window of the two readers is the same to the byte (``max_abs_diff`` otherwise). On a level whose
downsample is not a whole number (``uneven_downsample``: every level above 0 of a scanner's
pyramid) they are not meant to be: OpenSlide paints such a level shifted by a fraction of a pixel,
the tile reader reads its own whole pixels (:meth:`histo_wsl.slideio.slide.Slide.read_level_region`),
so ``equal`` is held to its target only on the other slides. ``decoded_by``: the slide's
``reader_record()`` after the tile reader's pass.

Default slides: ``cmu-1-small-region.svs`` from ``../shared/data/wsi`` when present, and a
synthetic 8,000² px JPEG-tiled pyramid at 0.5 µm/px (written once into ``--cache``), read at
1.57 µm/px as the shipped model's windows are (level 1, resized). Output: one JSON object on
stdout; exit status 1 when a target is missed.

Usage::

    python benchmarks/read_speed.py --cache ~/.cache/histo-wsl-bench
    python benchmarks/read_speed.py --slide /path/to/slide.svs --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from extract_speed import synthetic_slide

TARGETS = {"equal": True, "speedup": 2.0}
#: cmu-1 in ../shared/data/wsi next to the repository
REAL_SLIDE = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "wsi" / "cmu-1-small-region.svs"
)


def read_pass(path: Path, reader: str, args: argparse.Namespace) -> tuple[float, list, dict, bool]:
    """One pass of one reader: (CPU-s, the windows, the reader record, uneven downsample)."""
    import numpy as np

    from histo_wsl.slideio.grid import cover_grid
    from histo_wsl.slideio.slide import open_slide, plan_read, read_patch
    from histo_wsl.slideio.tiff_tiles import TILE_READER_ENV

    saved = os.environ.get(TILE_READER_ENV)
    if reader == "openslide":
        os.environ[TILE_READER_ENV] = "openslide"
    else:
        os.environ.pop(TILE_READER_ENV, None)
    try:
        with open_slide(path) as slide:
            plan = plan_read(slide, mpp=args.mpp)
            stride = max(1, round(args.size * (1.0 - args.overlap)))
            grid = cover_grid(slide, plan, args.size, stride)
            spots = list(zip(grid.xs.tolist(), grid.ys.tolist(), strict=True))[: args.windows]
            start = time.thread_time()
            windows = [
                np.asarray(read_patch(slide, plan, (round(x), round(y)), (args.size, args.size)))
                for x, y in spots
            ]
            cpu = time.thread_time() - start
            uneven = not float(plan.level_downsample).is_integer()
            return cpu, windows, slide.reader_record(), uneven
    finally:
        if saved is None:
            os.environ.pop(TILE_READER_ENV, None)
        else:
            os.environ[TILE_READER_ENV] = saved


def run_slide(path: Path, args: argparse.Namespace) -> dict:
    """Both readers on one slide, interleaved ``--repeats`` times."""
    import numpy as np

    cpu: dict[str, list[float]] = {"tiles": [], "openslide": []}
    equal, uneven, diff = True, False, 0
    record: dict = {}
    n = 0
    for _ in range(args.repeats):
        got = {}
        for reader in ("tiles", "openslide"):
            seconds, windows, rec, uneven = read_pass(path, reader, args)
            cpu[reader].append(seconds)
            got[reader] = windows
            if reader == "tiles":
                record = rec
        n = len(got["tiles"])
        pairs = list(zip(got["tiles"], got["openslide"], strict=True))
        equal = equal and all(np.array_equal(a, b) for a, b in pairs)
        diff = max([diff] + [int(np.abs(a.astype(int) - b).max()) for a, b in pairs])
    best = {k: min(v) for k, v in cpu.items()}
    per = {k: round(1000.0 * v / max(1, n), 3) for k, v in best.items()}
    speedup = best["openslide"] / best["tiles"] if best["tiles"] > 0 else float("inf")
    return {
        "slide": str(path),
        "windows": n,
        "cpu_ms_per_window": per,
        "cpu_s_runs": {k: [round(x, 4) for x in v] for k, v in cpu.items()},
        "speedup": round(speedup, 3),
        "equal": equal,
        "max_abs_diff": diff,
        "uneven_downsample": uneven,
        "decoded_by": record,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--slide", type=Path, action="append", help="slide(s) to read instead")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "histo-wsl-bench")
    parser.add_argument("--mpp", type=float, default=1.57, help="window resolution (µm/px)")
    parser.add_argument("--size", type=int, default=224, help="window side (px)")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--windows", type=int, default=600, help="windows read per pass")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    if not args.slide:
        args.cache.mkdir(parents=True, exist_ok=True)
    slides = args.slide or [p for p in (REAL_SLIDE,) if p.is_file()] + [
        synthetic_slide(args.cache, 8000, 0.5)[0]  # extract_speed.py's slide, cached
    ]
    rows = []
    for path in slides:
        row = run_slide(Path(path), args)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    checks = {
        "equal": all(r["equal"] for r in rows if not r["uneven_downsample"]),
        "speedup": all(r["speedup"] >= TARGETS["speedup"] for r in rows),
    }
    result = {
        "benchmark": "read_speed",
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("slide", "cache")},
        "slides": rows,
        "targets": TARGETS,
        "pass": checks,
    }
    print(json.dumps(result, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
