"""Whole-slide inference speed and memory, as a user waits for them: ``histo-wsl localize`` against
the pure forward of the same model.

For each slide, each load (``quiet``; ``busy``: beside another process that keeps one core busy)
and each thread count (``--threads 1,2``; ``0`` is localize's own choice, :mod:`histo_wsl.runtime.
threads`), in one run:

* ``forward``: the compute limit. A child process loads the model as ``localize`` does
  (:class:`histo_wsl.inference.engine.Engine`, the card's every step: k-NN refinement, flips)
  and runs :meth:`Engine.predict` on one batch of the slide's windows, drawn from those
  ``localize`` runs and already in memory, with their tissue (the k-NN lookup only near it, as
  inside ``localize``), with the same thread count, for ``--forward-seconds``. It is measured right before and
  right after each localize run, and their mean is the reference (load from other processes then
  weighs on both sides of the ratio alike).
* ``localize``: ``python -m histo_wsl localize SLIDE --model M --threads N`` in a fresh child
  process, its peak RSS from ``os.wait4``. Two ratios: ``slide`` counts the slide's own
  processing (thumbnail, tissue detection, reading, forward, blending, writing every output:
  ``total_s`` of its JSON) and is the one held to the target; ``process`` counts the whole
  process, with Python's start, the imports and the model's load (a fixed cost of each
  ``histo-wsl`` call, reported in seconds as ``startup_s``; a batch of slides pays it once).

* ``hand loop`` (``--no-hand-loop`` skips it): the peer issue #28 compares against, in the same
  run: a child that reads every window of localize's grid with OpenSlide in one thread (no tissue
  detection, no prefetch), runs the same engine on them in batches and writes nothing
  (:func:`hand_loop_child`). ``hand_loop_ratio`` is its windows/s over the same forward;
  ``hand_loop_s_over_slide_s`` its seconds over localize's ``total_s`` (above 1: localize
  finished the slide, outputs and all, sooner than the loop ran its windows).

Slides: ``cmu1`` (``../shared/data/wsi/cmu-1-small-region.svs``, skipped when absent) and
``band``, a synthetic 40,000 × 4,480 px slide at 0.5 µm/px (written once into ``--cache``).
The parent process stays small (everything heavy runs in children), because on Linux a child's
``ru_maxrss`` starts from its parent's peak.

Repeats (``--repeats N``): on a shared VM the forward measured right before and right after one
localize run can differ by a third, so one run of a configuration is one draw of that noise.
With N > 1 each configuration runs N times, round-robin with the others of the same load (a slow
minute of the machine then falls on several configurations, not on all runs of one); its row is
the run with the median slide ratio, with ``slide_ratio_runs`` (every run's, in order) and the
highest ``peak_rss_mb`` of its runs beside it.

Targets: slide ratio >= 0.9 and peak RSS <= 1,500 MB in every configuration, and the
forward >= 0.3 × a ResNet18 segmentation forward (1×1 head, stride 32, the same windows, batch
and threads; measured in the forward child, quiet). Output: one JSON object; exit status 1 when a
target is missed.

Usage::

    python benchmarks/localize_speed.py                               # CPU, the default model
    python benchmarks/localize_speed.py --slides band --loads quiet --threads 2
    python benchmarks/localize_speed.py --repeats 3 --no-hand-loop    # the median of 3 runs a row
    python benchmarks/localize_speed.py --device cuda --workers 4 --batch-size 64 --loads quiet
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract_memory import peak_rss  # noqa: E402

TARGETS = {"slide_ratio": 0.9, "peak_rss_mb": 1500.0, "forward_vs_resnet18": 0.3}
REAL_SLIDE = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "wsi" / "cmu-1-small-region.svs"
)
BAND = (40000, 4480, 0.5)
#: a process that keeps one core busy (the "busy" load)
BUSY_CODE = "while True:\n    pass\n"
WRITE_BAND = (
    "import sys\n"
    "from histo_wsl.synthetic.slides import make_layout, write_pyramid_tiff\n"
    "w, h, mpp = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])\n"
    "write_pyramid_tiff(sys.argv[1], make_layout(w, h, mpp=mpp, n_sections=6, seed=0))\n"
)


def band_slide(cache: Path) -> Path:
    """The cached synthetic band slide (written by a child process)."""
    w, h, mpp = BAND
    path = cache / f"band_{w}x{h}_{mpp:g}mpp.tiff"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-c", WRITE_BAND, str(path), str(w), str(h), str(mpp)], check=True
        )
    return path


#: most windows of a slide the pure forward cycles over (all of a small slide's)
FORWARD_WINDOWS = 64


def tissue_batch(slide: Path, engine, batch_size: int):
    """Up to :data:`FORWARD_WINDOWS` of the windows ``localize`` runs on the slide, read as it
    reads them, as whole batches of ``batch_size``.

    Returns (uint8 windows (N,S,S,3), their tissue (N,S,S) bool): the same grid, tissue and
    windows as ``localize`` (its default overlap and tissue detection), drawn at random, so the
    forward does what it does inside ``localize``, the k-NN lookup only near the tissue
    (``Engine.predict``'s ``where``) included.
    """
    import numpy as np
    import torch

    from histo_wsl.inference.localize import tissue_grid
    from histo_wsl.inference.params import LocalizeParams
    from histo_wsl.slideio.slide import open_slide, plan_read, read_patch
    from histo_wsl.tissue.fraction import window_masks
    from histo_wsl.tissue.scan import find_tissue

    size = engine.size
    with open_slide(slide) as s:
        found = find_tissue(s)
        plan = plan_read(s, mpp=float(engine.model_mpp))
        _, windows, _ = tissue_grid(s, plan, found, size, LocalizeParams().overlap)
        order = np.random.default_rng(0).permutation(len(windows.xs))[:FORWARD_WINDOWS]
        n = -(-len(order) // batch_size) * batch_size  # whole batches: some windows twice
        order = np.resize(order, n)
        xs, ys = windows.xs[order], windows.ys[order]
        wins = [
            np.asarray(read_patch(s, plan, (int(x), int(y)), (size, size)).convert("RGB"))
            for x, y in zip(xs, ys, strict=True)
        ]
    side = float(windows.size_level0)
    where = window_masks(found.mask, found.downsample, xs, ys, side, size)
    return torch.from_numpy(np.stack(wins)), where


def _rate(fn, seconds: float, per_call: int) -> float:
    fn()  # warm-up
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += per_call
        if time.perf_counter() - start >= seconds:
            return n / (time.perf_counter() - start)


def _child_engine(args: argparse.Namespace):
    """(In a child) the engine ``localize`` would build with these options."""
    from histo_wsl.inference.engine import Engine
    from histo_wsl.inference.params import LocalizeParams

    return Engine(
        LocalizeParams(model=args.model, device=args.device, threads=args.child_threads or None)
    )


def forward_child(args: argparse.Namespace) -> None:
    """(In a child) windows/s of the model's forward, and of ResNet18's with ``--resnet18``."""
    import torch

    engine = _child_engine(args)
    size = args.batch_size or engine.batch_size  # localize's own when not given
    windows, where = tissue_batch(Path(args.forward_child), engine, size)
    batches = itertools.cycle(
        [(windows[i : i + size], where[i : i + size]) for i in range(0, len(windows), size)]
    )
    batch = windows[:size]  # ResNet18's
    out = {"threads": torch.get_num_threads(), "batch_size": size, "windows": len(windows)}

    def model_step() -> None:
        engine.predict(*next(batches))[1].cpu()  # the map leaves the device, as in localize

    out["forward"] = _rate(model_step, args.forward_seconds, size)
    if args.resnet18:
        import torchvision

        net = torchvision.models.resnet18()
        seg = torch.nn.Sequential(*list(net.children())[:-2], torch.nn.Conv2d(512, 2, 1))
        seg = seg.eval().to(engine.device)
        x = ((batch.permute(0, 3, 1, 2).float() - engine._mean.cpu()) / engine._std.cpu()).to(
            engine.device
        )

        def r18_step() -> None:
            with torch.no_grad():
                seg(x).cpu()

        out["resnet18"] = _rate(r18_step, args.forward_seconds, size)
        out["forward_again"] = _rate(model_step, args.forward_seconds, size)
    print(json.dumps(out))


def hand_loop_child(args: argparse.Namespace) -> None:
    """(In a child) the simplest loop a user could write: every window read, then the forward.

    The peer of issue #28's table ("hand loop"): the slide opened with OpenSlide itself, every
    window of localize's grid (no tissue detection, so glass too) read in this thread with
    ``read_region`` at the plan's level, resized to the input with PIL's bilinear filter, batched
    and run through the same :class:`~histo_wsl.inference.engine.Engine`, its maps brought to the
    CPU; no blending, no outputs. Timed from opening the slide to the last map, as ``total_s``
    times localize's slide, with the model already loaded.
    """
    import math

    import numpy as np
    import openslide
    import torch
    from PIL import Image

    from histo_wsl.inference.params import LocalizeParams
    from histo_wsl.slideio.grid import cover_grid
    from histo_wsl.slideio.slide import open_slide, plan_read

    engine = _child_engine(args)
    size, batch = engine.size, args.batch_size or engine.batch_size
    stride = max(1, round(size * (1.0 - LocalizeParams().overlap)))
    with open_slide(args.hand_loop_child) as s:
        plan = plan_read(s, mpp=float(engine.model_mpp))
        grid = cover_grid(s, plan, size, stride)
    side = math.ceil(size * plan.scale / plan.level_downsample)
    engine.predict(torch.zeros((1, size, size, 3), dtype=torch.uint8))  # warm, as the forward's
    t_read = t_model = 0.0
    t0 = time.perf_counter()
    slide = openslide.OpenSlide(args.hand_loop_child)
    for lo in range(0, len(grid), batch):
        t1 = time.perf_counter()
        wins = []
        for x, y in zip(grid.xs[lo : lo + batch], grid.ys[lo : lo + batch], strict=True):
            region = slide.read_region((int(x), int(y)), plan.level, (side, side))
            wins.append(
                np.asarray(region.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
            )
        t2 = time.perf_counter()
        engine.predict(torch.from_numpy(np.stack(wins)))[1].cpu()
        t_read += t2 - t1
        t_model += time.perf_counter() - t2
    slide.close()
    total = time.perf_counter() - t0
    out = {"windows": len(grid), "seconds": total, "read_s": t_read, "model_s": t_model}
    print(json.dumps(out))


def _run_child(args, flag: str, slide: Path, threads: int, *extra: str) -> dict:
    """Run this script as a child (``--forward-child`` / ``--hand-loop-child``); its last JSON line."""
    cmd = [sys.executable, __file__, flag, str(slide), "--model", args.model]
    cmd += ["--child-threads", str(threads), "--device", args.device, *extra]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{flag} child failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_hand_loop(args, slide: Path, threads: int) -> dict:
    """Run :func:`hand_loop_child` in a fresh process."""
    return _run_child(args, "--hand-loop-child", slide, threads)


def run_forward(args, slide: Path, threads: int, resnet18: bool = False) -> dict:
    """Run :func:`forward_child` in a fresh process."""
    extra = ["--forward-seconds", str(args.forward_seconds)] + (["--resnet18"] if resnet18 else [])
    return _run_child(args, "--forward-child", slide, threads, *extra)


class GpuSampler:
    """Samples the GPU's utilisation (``nvidia-smi``) every half second in a thread."""

    def __init__(self, enabled: bool) -> None:
        import threading

        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True) if enabled else None

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.wait(0.5):
            try:
                out = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return

    def __enter__(self) -> GpuSampler:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> dict | None:
        """Mean and median utilisation (%) over the samples, None without any."""
        if not self.samples:
            return None
        ordered = sorted(self.samples)
        return {
            "mean_pct": round(sum(ordered) / len(ordered), 1),
            "median_pct": ordered[len(ordered) // 2],
            "samples": len(ordered),
        }


def run_localize(args, slide: Path, threads: int, out: Path) -> dict:
    """``histo-wsl localize`` in a fresh process: wall seconds, peak RSS and the slide's JSON."""
    cmd = [sys.executable, "-m", "histo_wsl", "localize", str(slide), "--model", args.model]
    cmd += ["--out", str(out), "--threads", str(threads), "--quiet", "--overwrite"]
    cmd += ["--device", args.device]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    with GpuSampler(args.device.startswith("cuda")) as gpu:
        res = peak_rss(cmd)
    if res["exit_code"] != 0:
        raise RuntimeError(f"localize failed: {res['output_tail']}")
    record = json.loads((out / slide.stem / f"{slide.stem}.json").read_text(encoding="utf-8"))
    return {
        "seconds": res["seconds"],
        "peak_rss_mb": res["peak_rss_mb"],
        "record": record,
        "gpu_utilisation": gpu.summary(),
    }


def measure(args, name: str, slide: Path, load: str, threads: int, work: Path) -> dict:
    """One configuration: forward, localize, forward; the ratios."""
    fwd_threads = threads or args.auto_reference
    before = run_forward(args, slide, fwd_threads)["forward"]
    loc = run_localize(args, slide, threads, work / f"{name}-{load}-{threads}")
    hand = run_hand_loop(args, slide, fwd_threads) if args.hand_loop else None
    after = run_forward(args, slide, fwd_threads)["forward"]
    rec = loc["record"]
    n, total = rec["windows"], rec["timings"]["total_s"]
    forward = (before + after) / 2
    peer = {}
    if hand is not None:
        peer = {
            "hand_loop_ratio": round(hand["windows"] / hand["seconds"] / forward, 3),
            # > 1: localize finished the whole slide (tissue, windows, outputs) sooner than the
            # loop read and ran every window of the grid
            "hand_loop_s_over_slide_s": round(hand["seconds"] / total, 3),
            "hand_loop": {k: round(v, 3) for k, v in hand.items()},
        }
    return {
        "slide": name,
        "load": load,
        "threads": threads or "auto",
        "threads_used": rec.get("threads"),
        "batches_read": rec.get("batches_read"),
        "windows": n,
        "forward_windows_per_s": round(forward, 2),
        "forward_before_after": [round(before, 2), round(after, 2)],
        "localize_slide_windows_per_s": round(n / total, 2),
        "slide_ratio": round(n / total / forward, 3),
        **peer,
        "process_ratio": round(n / loc["seconds"] / forward, 3),
        "process_s": loc["seconds"],
        "startup_s": round(loc["seconds"] - total, 2),
        "peak_rss_mb": loc["peak_rss_mb"],
        "gpu_utilisation": loc["gpu_utilisation"],
        "slides_per_hour": round(3600.0 / loc["seconds"], 1),
        "timings": rec["timings"],
    }


def median_run(runs: list[dict]) -> dict:
    """One configuration's repeated runs as one row: the run with the median slide ratio.

    Every run's slide ratio is kept beside it (``slide_ratio_runs``, in the order they ran), and
    the highest peak RSS of the runs replaces the median run's (the memory target holds for each
    run, not for a typical one). With an even count the lower of the two middle runs is taken.
    """
    ordered = sorted(runs, key=lambda r: r["slide_ratio"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    row["repeats"] = len(runs)
    row["slide_ratio_runs"] = [r["slide_ratio"] for r in runs]
    row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return row


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="glas-negev-mobilenetv2", help="model name or checkpoint")
    ap.add_argument("--slides", default="cmu1,band", help="comma list of cmu1, band")
    ap.add_argument("--loads", default="quiet,busy", help="comma list of quiet, busy")
    ap.add_argument("--threads", default="1,2,0", help="comma list; 0 = localize's own choice")
    ap.add_argument(
        "--batch-size", type=int, default=None, help="default: localize's own (4 on CPU, 16 on GPU)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=None, help="localize's reader processes")
    ap.add_argument("--forward-seconds", type=float, default=8.0)
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of each configuration, round-robin; its row is the median run (see above)",
    )
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "histo-wsl-bench")
    ap.add_argument(
        "--no-hand-loop",
        dest="hand_loop",
        action="store_false",
        help="skip the hand-written loop measured beside each localize run (hand_loop_ratio)",
    )
    ap.add_argument("--forward-child", help=argparse.SUPPRESS)
    ap.add_argument("--hand-loop-child", help=argparse.SUPPRESS)
    ap.add_argument("--child-threads", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--resnet18", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.forward_child:
        forward_child(args)
        return 0
    if args.hand_loop_child:
        hand_loop_child(args)
        return 0
    slides = {}
    for name in args.slides.split(","):
        if name == "cmu1":
            if REAL_SLIDE.is_file():
                slides[name] = REAL_SLIDE
        elif name == "band":
            slides[name] = band_slide(args.cache)
        else:
            ap.error(f"unknown slide {name!r}")
    threads = [int(t) for t in args.threads.split(",")]
    # the forward reference of the "auto" rows: the best fixed count under that load
    args.auto_reference = os.cpu_count() or 1
    rows, busy = [], None
    first = next(iter(slides.values()))
    quiet_fwd = run_forward(args, first, os.cpu_count() or 1, resnet18=True)
    with tempfile.TemporaryDirectory(prefix="histo-wsl-bench-") as tmp:
        for load in args.loads.split(","):
            if load == "busy":
                busy = subprocess.Popen([sys.executable, "-c", BUSY_CODE])
                time.sleep(2.0)
            try:
                runs: dict[tuple[str, int], list[dict]] = {}
                for _ in range(args.repeats):
                    for name, slide in slides.items():
                        best = {}
                        for t in threads:
                            if t == 0:
                                args.auto_reference = max(best, key=best.get) if best else 1
                            row = measure(args, name, slide, load, t, Path(tmp))
                            if t:
                                best[t] = row["forward_windows_per_s"]
                            runs.setdefault((name, t), []).append(row)
                            print(json.dumps(row), file=sys.stderr)
                rows += [median_run(r) for r in runs.values()]
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
                    busy = None
    fwd_ratio = quiet_fwd["forward"] / quiet_fwd["resnet18"]
    result = {
        "benchmark": "localize_speed",
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": _processor(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "device": args.device,
        },
        "model": args.model,
        "batch_size": quiet_fwd["batch_size"],
        "repeats": args.repeats,
        "quiet_forward": {
            "threads": quiet_fwd["threads"],
            "model_windows_per_s": round(quiet_fwd["forward"], 2),
            "model_again_windows_per_s": round(quiet_fwd["forward_again"], 2),
            "resnet18_windows_per_s": round(quiet_fwd["resnet18"], 2),
            "ratio": round(fwd_ratio, 3),
        },
        "rows": rows,
        "targets": TARGETS,
        "pass": {
            "slide_ratio": all(r["slide_ratio"] >= TARGETS["slide_ratio"] for r in rows),
            "peak_rss_mb": all(r["peak_rss_mb"] <= TARGETS["peak_rss_mb"] for r in rows),
            "forward_vs_resnet18": fwd_ratio >= TARGETS["forward_vs_resnet18"],
        },
    }
    print(json.dumps(result, indent=2))
    return 0 if all(result["pass"].values()) else 1


def _processor() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


if __name__ == "__main__":
    sys.exit(main())
