"""Peak memory of ``extract-patches`` on a small and a large slide: it must not grow with the slide.

Writes two synthetic pyramidal TIFFs (default 10,000 and 40,000 px square at 0.5 µm/px, cached in
``--cache`` so reruns skip them), then runs ``python -m histo_wsl extract-patches`` on each in a
fresh child process and takes the child's peak resident set size from ``os.wait4`` (the kernel's
``ru_maxrss`` of that process, exact, no polling). Two modes:

* ``coords_only`` (the target): ``extract-patches SLIDE --out TMP --coords-only`` with default
  options: the whole grid, thumbnail, tissue detection, QC images and manifest, no patch images;
* ``images``: the same writing PNG patches, ``--max-patches N`` (random over the whole slide) so
  the run stays short.

A ``baseline`` child only imports what ``extract-patches`` imports, so the slide-dependent part is
``peak - baseline``. Output is one JSON object; exit status 1 when the 40k / 10k peak ratio of any
mode measured is above the target (1.2).

Usage::

    python benchmarks/extract_memory.py --cache ~/.cache/histo-wsl-bench
    python benchmarks/extract_memory.py --sizes 10000 30000 --max-patches 500
    python benchmarks/extract_memory.py --no-images
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 1.2
BASELINE_CODE = (
    "import numpy, PIL.Image, cv2, openslide\n"
    "import histo_wsl.cli.app, histo_wsl.data.extract, histo_wsl.tissue.detect, histo_wsl.runtime.batch\n"
)


WRITE_CODE = (
    "import sys\n"
    "from histo_wsl.synthetic.slides import make_layout, write_pyramid_tiff\n"
    "size, mpp = int(sys.argv[2]), float(sys.argv[3])\n"
    "write_pyramid_tiff(sys.argv[1], make_layout(size, size, mpp=mpp, seed=0))\n"
)


def synthetic_slide(folder: Path, size: int, mpp: float) -> tuple[Path, float]:
    """A cached synthetic pyramidal TIFF of ``size`` x ``size`` px; returns (path, seconds written).

    It is written by a child process: this process must stay small, because on Linux a child's
    ``ru_maxrss`` starts from its parent's peak at ``fork``.
    """
    path = folder / f"synthetic_{size}px_{mpp:g}mpp.tiff"
    if path.is_file():
        return path, 0.0
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", WRITE_CODE, str(path), str(size), str(mpp)], check=True)
    return path, time.perf_counter() - start


def self_peak_rss_mb() -> float:
    """This process's own peak RSS (MiB)."""
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round((kib / 1024 if sys.platform == "darwin" else kib) / 1024, 1)


def peak_rss(cmd: list[str]) -> dict:
    """Run ``cmd`` in a fresh child; returns its peak RSS (MiB), exit code, seconds and output tail."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        log.seek(0)
        tail = log.read()[-2000:].decode(errors="replace")
    # ru_maxrss: KiB on Linux, bytes on macOS
    kib = usage.ru_maxrss / 1024 if sys.platform == "darwin" else usage.ru_maxrss
    return {
        "peak_rss_mb": round(kib / 1024, 1),
        "exit_code": proc.returncode,
        "seconds": round(seconds, 2),
        "output_tail": tail,
    }


def extract_cmd(slide: Path, out: Path, extra: list[str]) -> list[str]:
    """The ``extract-patches`` command line for one slide."""
    return [
        sys.executable,
        "-m",
        "histo_wsl",
        "extract-patches",
        str(slide),
        "--out",
        str(out),
        "--quiet",
        "--json",
        *extra,
    ]


def patch_count(out: Path, slide: Path) -> int:
    """Rows of the slide's patches.csv (patches chosen)."""
    csv = out / slide.stem / "patches.csv"
    if not csv.is_file():
        return -1
    with open(csv, encoding="utf-8") as fh:
        return sum(1 for _ in fh) - 1


def measure(args: argparse.Namespace, cache: Path, work: Path) -> dict:
    """Write (or reuse) the slides and measure every mode; returns the result."""
    slides: dict[int, Path] = {}
    write_s: dict[str, float] = {}
    for size in args.sizes:
        slides[size], secs = synthetic_slide(cache, size, args.mpp)
        write_s[f"{size // 1000}k"] = round(secs, 1)

    modes = {"coords_only": ["--coords-only"]}
    if not args.no_images:
        modes["images"] = ["--max-patches", str(args.max_patches)]
    baseline = peak_rss([sys.executable, "-c", BASELINE_CODE])
    runs: dict[str, dict[str, dict]] = {}
    for mode, extra in modes.items():
        runs[mode] = {}
        for size, slide in slides.items():
            out = work / f"{mode}_{size}"
            r = peak_rss(extract_cmd(slide, out, extra))
            if r["exit_code"] != 0:
                raise RuntimeError(f"extract-patches failed on {slide}: {r['output_tail']}")
            r["patches"] = patch_count(out, slide)
            r["growth_over_baseline_mb"] = round(r["peak_rss_mb"] - baseline["peak_rss_mb"], 1)
            del r["output_tail"]
            runs[mode][f"{size // 1000}k"] = r

    launcher = self_peak_rss_mb()
    if launcher >= 0.5 * baseline["peak_rss_mb"]:
        raise RuntimeError(
            f"this process peaked at {launcher} MiB, too close to the children's "
            f"{baseline['peak_rss_mb']} MiB: their ru_maxrss would include it"
        )
    small, large = (f"{s // 1000}k" for s in (min(args.sizes), max(args.sizes)))
    ratios = {
        mode: round(r[large]["peak_rss_mb"] / r[small]["peak_rss_mb"], 3)
        for mode, r in runs.items()
    }
    coords = runs["coords_only"]
    result = {
        "benchmark": "extract_memory",
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        f"peak_rss_mb_{small}": coords[small]["peak_rss_mb"],
        f"peak_rss_mb_{large}": coords[large]["peak_rss_mb"],
        "ratio": ratios["coords_only"],
        "target": TARGET,
        "pass": all(v <= TARGET for v in ratios.values()),
        "ratios": ratios,
        "baseline_import_rss_mb": baseline["peak_rss_mb"],
        "launcher_rss_mb": launcher,
        "slides": {f"{s // 1000}k": f"{s}x{s} px, {args.mpp:g} µm/px" for s in args.sizes},
        "slide_write_s": write_s,
        "max_patches_images_mode": None if args.no_images else args.max_patches,
        "runs": runs,
    }
    return result


def run_in_scratch(args: argparse.Namespace, measure) -> int:
    """Run ``measure(args, cache, work)`` in a scratch folder, print its JSON, return the exit code.

    Shared by the memory benchmarks: ``args.workdir`` (scratch parent) and ``args.cache`` (where
    the synthetic slides are kept between runs) as their options say.
    """
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="histo-wsl-bench-", dir=args.workdir) as tmp:
        cache = args.cache if args.cache is not None else Path(tmp) / "slides"
        cache.mkdir(parents=True, exist_ok=True)
        work = Path(tmp) / "out"
        work.mkdir()
        start = time.perf_counter()
        result = measure(args, cache, work)
        result["total_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))
    return 0 if result["pass"] else 1


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, help="folder for the slides (default: a temp dir)")
    parser.add_argument(
        "--sizes", type=int, nargs=2, default=[10000, 40000], help="small and large side, px"
    )
    parser.add_argument("--mpp", type=float, default=0.5, help="slides' µm/px")
    parser.add_argument("--max-patches", type=int, default=1000, help="patches in images mode")
    parser.add_argument("--no-images", action="store_true", help="coords-only mode only")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temp dir)")
    args = parser.parse_args(argv)
    if min(args.sizes) < 1000 or args.sizes[0] == args.sizes[1]:
        parser.error("--sizes: two different sides of at least 1000 px")
    return run_in_scratch(args, measure)


if __name__ == "__main__":
    sys.exit(main())
