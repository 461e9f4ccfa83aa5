"""``extract-patches``: tile slides into a patch folder that training reads directly.

Per slide, under ``<out>/<slide>/``: ``patches/<slide>_x<X>_y<Y>.png`` (X, Y = level-0 top-left),
``patches.csv``, ``thumbnail.png``, ``tissue.png`` (thumbnail with tissue contours), ``patches.png``
(thumbnail with the extracted patches), ``tissue.geojson`` (QuPath, level-0) and ``slide.json``
(written last: the slide is finished). ``<out>/manifest.csv`` lists every finished slide's patches
and ``<out>/run.json`` records the run.

Memory does not grow with the slide: the thumbnail is read band by band and never held whole
(tissue detection works strip by strip into a 1-bit mask, the QC images are PNGs written band by
band; :func:`histo_wsl.tissue.scan.scan_tissue`), tissue fractions come from summed-area tables
of one band of mask rows at a time, and ``patches.csv`` and the patch-writing jobs are streamed.
Each slide's record gives the thumbnail's size and the resolution detection ran at
(``thumbnail_size``, ``tissue_mpp``).

A small slide costs little more than its patches: when its thumbnail is resampled from level 0
(a slide without a pyramid, or too small for one) and its level 0 is at most
:data:`histo_wsl.tissue.scan.HELD_LEVEL_BYTES`, level 0 is read once, in threads
(:class:`~histo_wsl.tissue.scan.HeldLevel`), for the thumbnail and for patches read from level 0
in this process; the thumbnail's blocks, the median filter and the closing of tissue detection
and the QC PNGs are shared among threads too (:func:`histo_wsl.tissue.detect.work_threads`); the
QC images and the GeoJSON are written in a thread while the patches are, and with ``min_tissue``
0 (every grid position kept whatever the tissue) the tissue is found in that thread too; worker
processes start only for a slide of at least :data:`POOL_MIN_PATCHES` grid positions. The files
are the same either way.
"""

from __future__ import annotations

import csv
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from histo_wsl.errors import InputError
from histo_wsl.runtime import atomic
from histo_wsl.runtime.batch import BatchOptions, BatchRunner, Progress, RunSummary
from histo_wsl.runtime.console import warn
from histo_wsl.runtime.inputs import InputItem
from histo_wsl.slideio.geojson import mask_to_geojson, write_geojson
from histo_wsl.slideio.grid import PatchGrid, make_grid
from histo_wsl.slideio.slide import (
    ReadPlan,
    Slide,
    open_slide,
    plan_read,
    read_patch,
    thumbnail_geometry,
)
from histo_wsl.tissue import detect as tissue
from histo_wsl.tissue.fraction import grid_tissue_fractions
from histo_wsl.tissue.scan import (
    ASSUMED_MPP,
    HeldLevel,
    TissueMap,
    keeps_thumbnail,
    scan_tissue,
    tissue_geojson_for,
    write_tissue_images,
)

MANIFEST_COLUMNS = (
    "slide",
    "path",
    "x",
    "y",
    "level",
    "mpp",
    "size",
    "tissue_fraction",
    "label",
    "size_level0",
    "downsample",
)
#: zlib level for PNG patches: 1 is several times faster to write than Pillow's default 6 and
#: costs about a tenth more disk on H&E.
PNG_COMPRESS_LEVEL = 1
__all__ = ["ASSUMED_MPP", "ExtractParams", "extract_patches", "extract_slide", "write_manifest"]

CHUNK = 32
#: A slide with fewer grid positions than this has its patches written in this process even with
#: ``workers > 1`` (:class:`PatchWriter`): a worker's start-up (about 0.3 s of CPU) is worth
#: about a hundred patches.
POOL_MIN_PATCHES = 256


@dataclass
class ExtractParams:
    """Parameters of ``extract-patches`` (CLI options of the same names).

    Attributes:
        patch_size: patch side in pixels at the target resolution.
        mpp: target resolution in µm/px (ignored when ``level`` is given).
        level: pyramid level to read natively instead of a target mpp.
        stride: step between patches in pixels at the target resolution (default: patch_size,
            reduced by ``overlap``).
        overlap: overlap between neighbouring patches as a fraction of the patch (0 to 0.95).
        min_tissue: minimum tissue fraction of a patch (0-1) for it to be kept.
        image_format: ``png`` or ``jpg``.
        jpeg_quality: JPEG quality (1-100).
        coords_only: write coordinates only, no patch images.
        label: label written for every patch (a CSV ``label`` column overrides it per slide).
        max_patches: keep at most this many patches per slide, chosen at random (seeded).
        seed: random seed of that choice.
        workers: processes reading and writing patches.
        slide_mpp: level-0 µm/px overriding every slide's metadata (a CSV column overrides it).
        tissue_geojson: a GeoJSON file, or a folder of ``<slide>.geojson`` /
            ``<slide>/tissue.geojson``, replacing tissue detection.
        thumbnail_mpp: resolution of the thumbnail that tissue detection works on (µm/px).
        tissue: tissue-detection parameters.
    """

    patch_size: int = 224
    mpp: float | None = 0.5
    level: int | None = None
    stride: int | None = None
    overlap: float = 0.0
    min_tissue: float = 0.5
    image_format: str = "png"
    jpeg_quality: int = 90
    coords_only: bool = False
    label: str | None = None
    max_patches: int | None = None
    seed: int = 0
    workers: int = 1
    slide_mpp: float | None = None
    tissue_geojson: Path | None = None
    thumbnail_mpp: float = 8.0
    tissue: tissue.TissueParams = field(default_factory=tissue.TissueParams)

    @property
    def step(self) -> int:
        """Stride in pixels at the target resolution."""
        if self.stride is not None:
            return self.stride
        return max(1, round(self.patch_size * (1.0 - self.overlap)))

    def validate(self) -> None:
        """Raise InputError on impossible combinations."""
        if self.patch_size < 8:
            raise InputError(f"--patch-size {self.patch_size} is too small; use 8 px or more")
        if self.stride is not None and self.stride < 1:
            raise InputError("--stride must be at least 1 px")
        if not 0.0 <= self.overlap <= 0.95:
            raise InputError(f"--overlap {self.overlap} must be a fraction between 0 and 0.95")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise InputError(f"--min-tissue {self.min_tissue} must be a fraction between 0 and 1")
        if self.image_format not in ("png", "jpg"):
            raise InputError(f"--format {self.image_format!r}: use png or jpg")
        if self.workers < 1:
            raise InputError("--workers must be at least 1")
        if self.level is None and self.mpp is None:
            raise InputError("give --mpp or --level")

    def record(self) -> dict:
        """JSON-ready parameters for run.json."""
        out = asdict(self)
        out["stride"] = self.step
        out["tissue_geojson"] = None if self.tissue_geojson is None else str(self.tissue_geojson)
        return out


# -- patch writing (runs in worker processes too) -------------------------------------------------
_WORKER_SLIDE: dict = {}


def _worker_slide(path: str, mpp: float | None):
    key = (path, mpp)
    if _WORKER_SLIDE.get("key") != key:
        old = _WORKER_SLIDE.pop("slide", None)
        if old is not None:
            old.close()
        _WORKER_SLIDE["slide"] = open_slide(path, mpp=mpp)
        _WORKER_SLIDE["key"] = key
    return _WORKER_SLIDE["slide"]


def write_patch_chunk(
    path: str,
    slide_mpp: float | None,
    plan: ReadPlan,
    coords: list[tuple[int, int]],
    size: int,
    folder: str,
    prefix: str,
    fmt: str,
    quality: int,
) -> int:
    """Read and save the patches at ``coords``; returns how many were written."""
    return _save_patches(
        _worker_slide(path, slide_mpp), plan, coords, size, folder, prefix, fmt, quality
    )


def _save_patches(
    slide: Slide | HeldLevel,
    plan: ReadPlan,
    coords: list[tuple[int, int]],
    size: int,
    folder: str,
    prefix: str,
    fmt: str,
    quality: int,
) -> int:
    """Read the patches at ``coords`` from ``slide`` and save them; returns how many."""
    for x, y in coords:
        patch = read_patch(slide, plan, (x, y), (size, size))  # type: ignore[arg-type]
        target = os.path.join(folder, f"{prefix}_x{x}_y{y}.{fmt}")
        if fmt == "png":
            patch.save(target, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        else:
            patch.save(target, format="JPEG", quality=quality)
    return len(coords)


class PatchWriter:
    """Writes patches in this process (1 worker) or a pool of processes that each open the slide.

    The pool is started for the first slide with at least :data:`POOL_MIN_PATCHES` grid positions
    (:meth:`prepare`): on a smaller slide, starting worker processes (an interpreter and its imports
    each) costs more than they save, and its patches are written in this process.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    @property
    def in_process(self) -> bool:
        """Whether :meth:`write` writes in this process (1 worker, or no pool started)."""
        return self._pool is None

    def prepare(self, grid_patches: int) -> None:
        """Start the pool for a slide of ``grid_patches`` positions when it is worth it.

        Called before the slide's thumbnail is read, so that the workers start up meanwhile;
        they are spawned, so they never copy the parent's memory.
        """
        if grid_patches >= POOL_MIN_PATCHES:
            self.start()

    def start(self) -> None:
        """Start the worker processes (a no-op for 1 worker or a started pool)."""
        if self.workers > 1 and self._pool is None:
            import multiprocessing

            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn")
            )

    def write(
        self, jobs: Iterator[tuple], progress: Progress, source: HeldLevel | None = None
    ) -> None:
        """Run :func:`write_patch_chunk` over ``jobs`` (argument tuples), advancing ``progress``.

        Jobs are taken lazily: at most ``4 × workers`` are queued at a time. In this process,
        ``source`` (the slide's level 0 held in memory) is read instead of opening the slide.
        """
        if self._pool is None:
            for job in jobs:
                if source is not None:
                    progress.advance(_save_patches(source, *job[2:]))
                else:
                    progress.advance(write_patch_chunk(*job))
            return
        pending: set = set()
        todo = iter(jobs)
        try:
            while True:
                for job in todo:
                    pending.add(self._pool.submit(write_patch_chunk, *job))
                    if len(pending) >= 4 * self.workers:
                        break
                if not pending:
                    return
                finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in finished:
                    progress.advance(fut.result())
        finally:
            for fut in pending:
                fut.cancel()

    def close(self) -> None:
        """Stop the worker processes."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        _WORKER_SLIDE.pop("key", None)
        old = _WORKER_SLIDE.pop("slide", None)
        if old is not None:
            old.close()


# -- one slide ------------------------------------------------------------------------------------
def extract_slide(
    item: InputItem, stage: Path, progress: Progress, params: ExtractParams, writer: PatchWriter
) -> dict:
    """Extract one slide's patches into ``stage/<slide>/``; returns the slide's record.

    A small slide whose thumbnail is resampled from level 0 has its level 0 read once
    (:class:`~histo_wsl.tissue.scan.HeldLevel`, at most
    :data:`~histo_wsl.tissue.scan.HELD_LEVEL_BYTES`, in threads) for the thumbnail and, when
    they are read from level 0 in this process, the patches: the same pixels, one read instead of
    two. With ``min_tissue`` 0 every grid position is kept whatever the tissue, so the patches are
    written while the tissue is found (:func:`_find_tissue_in_background`); else they wait for it.
    """
    mpp_override = item.slide_mpp if item.slide_mpp is not None else params.slide_mpp
    label = item.label if item.label is not None else params.label
    slide_dir = stage / item.name
    patch_dir = slide_dir / "patches"
    patch_dir.mkdir(parents=True)
    with open_slide(item.path, mpp=mpp_override) as slide, ExitStack() as cleanup:
        plan = plan_read(slide, mpp=params.mpp, level=params.level)
        grid = make_grid(slide, plan, params.patch_size, params.step)
        grid_patches = len(grid)
        geometry = thumbnail_geometry(slide, mpp=params.thumbnail_mpp)
        writes = not params.coords_only and grid_patches > 0
        if writes:
            writer.prepare(grid_patches)
        # a thumbnail resampled from level 0: a small level 0 is read once and held
        held = HeldLevel.read(slide) if geometry.plan.level == 0 else None
        if held is not None:
            cleanup.callback(held.close)
        patch_source = held if writes and writer.in_process and plan.level == 0 else None
        kept = keeps_thumbnail(geometry)
        thumbnail_png = slide_dir / "thumbnail.png"
        geojson = tissue_geojson_for(item, params.tissue_geojson)  # a missing one fails first

        def find() -> TissueMap:
            # a thumbnail kept in memory is written with the other QC images, else while it is read
            found = scan_tissue(
                slide,
                thumbnail_mpp=params.thumbnail_mpp,
                geojson=geojson,
                params=params.tissue,
                thumbnail_png=None if kept else thumbnail_png,
                pixels=held,
            )
            if held is not None and patch_source is None:
                held.close()  # the patches are not read from it: let it go now
            return found

        def qc(found: TissueMap, chosen: PatchGrid) -> None:
            _write_qc(slide, found, chosen, slide_dir, item.name, thumbnail_png if kept else None)

        # the QC images and GeoJSON (and with min_tissue 0 the tissue itself) are made in a
        # thread while the patches are written (OpenSlide, zlib, OpenCV and Pillow's encoders
        # release the GIL); both are finished before the slide is
        with ThreadPoolExecutor(1, thread_name_prefix="histo-wsl-qc") as background:
            if params.min_tissue <= 0:
                keep = _sample(np.arange(grid_patches), params, item.name)
                chosen, tissue_patches = grid.subset(keep), grid_patches
                after = background.submit(_find_tissue_in_background, find, qc, grid, keep, chosen)
            else:
                found = find()
                chosen, chosen_fractions, tissue_patches = _choose(grid, found, params, item.name)
                after = background.submit(_qc_then, qc, found, chosen, chosen_fractions)
            del grid
            n = len(chosen)
            progress.start(n, item.name)
            if writes and n:
                jobs = _patch_jobs(item, mpp_override, plan, chosen, params, patch_dir)
                writer.write(jobs, progress, source=patch_source)
            found, chosen_fractions = after.result()

        _write_patches_csv(
            slide_dir / "patches.csv", item.name, chosen, chosen_fractions, plan, params, label
        )
        if params.coords_only:
            patch_dir.rmdir()
        notes = list(slide.notes)
        if n == 0:
            notes.append(_no_patches(item, found, params))
        return {
            "patches": n,
            "grid_patches": grid_patches,
            "tissue_patches": tissue_patches,
            "tissue_fraction": found.fraction,
            "tissue_source": found.source,
            "slide_mpp": slide.mpp,
            "mpp_source": slide.mpp_source,
            "label": label,
            "read": plan.as_dict(),
            "size_level0": chosen.size_level0,
            "thumbnail_downsample": found.downsample,
            "thumbnail_size": [found.geometry.width, found.geometry.height],
            "tissue_mpp": round(found.tissue_mpp, 6),
            "notes": notes,
        }


def _no_patches(item: InputItem, found: TissueMap, params: ExtractParams) -> str:
    """Warn that a slide gave no patch, and why; returns the note for its record."""
    why = (
        "no tissue found"
        if found.fraction == 0
        else f"no grid position has --min-tissue {params.min_tissue:g} of tissue"
    )
    warn(
        f"{item.path}: 0 patches ({why}; tissue on {found.fraction:.1%} of the "
        f"thumbnail); see {item.name}/thumbnail.png, or give the tissue with --tissue-geojson"
    )
    return f"0 patches: {why}"


def _qc_then(
    qc: Callable[[TissueMap, PatchGrid], None],
    found: TissueMap,
    chosen: PatchGrid,
    fractions: np.ndarray,
) -> tuple[TissueMap, np.ndarray]:
    """The QC images of tissue found first; returns the tissue and fractions it was given."""
    qc(found, chosen)
    return found, fractions


def _find_tissue_in_background(
    find: Callable[[], TissueMap],
    qc: Callable[[TissueMap, PatchGrid], None],
    grid: PatchGrid,
    keep: np.ndarray,
    chosen: PatchGrid,
) -> tuple[TissueMap, np.ndarray]:
    """The tissue, the kept patches' tissue fractions and the QC images, for patches chosen first.

    With ``min_tissue`` 0 the patches (``grid[keep]``) do not depend on the tissue: this runs in a
    thread while they are written. Returns the tissue and the fractions :func:`_choose` gives
    otherwise.
    """
    found = find()
    fractions = grid_tissue_fractions(found.mask, found.downsample, grid)[keep]
    qc(found, chosen)
    return found, fractions


def _sample(keep: np.ndarray, params: ExtractParams, name: str) -> np.ndarray:
    """``keep`` (grid indices), or ``max_patches`` of them chosen at random (seeded by the slide)."""
    if params.max_patches is not None and keep.size > params.max_patches:
        rng = np.random.default_rng([params.seed, zlib.crc32(name.encode())])
        keep = np.sort(rng.choice(keep, size=params.max_patches, replace=False))
    return keep


def _choose(
    grid: PatchGrid, found: TissueMap, params: ExtractParams, name: str
) -> tuple[PatchGrid, np.ndarray, int]:
    """The grid positions kept: (patches, their tissue fractions, how many had enough tissue)."""
    fractions = grid_tissue_fractions(found.mask, found.downsample, grid)
    in_tissue = fractions >= params.min_tissue - 1e-9
    tissue_patches = int(np.count_nonzero(in_tissue))
    keep = _sample(np.flatnonzero(in_tissue), params, name)
    del in_tissue
    return grid.subset(keep), fractions[keep], tissue_patches


def _write_qc(
    slide: Slide,
    found: TissueMap,
    chosen: PatchGrid,
    slide_dir: Path,
    name: str,
    thumbnail_png: Path | None,
) -> None:
    """Write ``tissue.geojson``, ``tissue.png`` and ``patches.png``, and ``thumbnail_png`` if given.

    The GeoJSON and the drawings come from one tracing of the mask's contours.
    """
    import cv2

    ds = found.downsample
    full = found.mask.to_bool()
    write_geojson(
        slide_dir / "tissue.geojson",
        mask_to_geojson(full, ds, mpp=slide.mpp, id_namespace=name),
    )
    contours, _ = cv2.findContours(full.view(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    del full
    side = chosen.size_level0 / ds
    x0, y0 = chosen.xs / ds, chosen.ys / ds
    write_tissue_images(
        slide,
        found,
        tissue_png=slide_dir / "tissue.png",
        patches_png=slide_dir / "patches.png",
        boxes=np.stack([x0, y0, x0 + side, y0 + side], axis=1),
        contours=contours,
        thumbnail_png=thumbnail_png,
    )


def _patch_jobs(
    item: InputItem,
    mpp_override: float | None,
    plan: ReadPlan,
    chosen: PatchGrid,
    params: ExtractParams,
    patch_dir: Path,
) -> Iterator[tuple]:
    """:func:`write_patch_chunk` argument tuples of :data:`CHUNK` patches each."""
    for i in range(0, len(chosen), CHUNK):
        coords = list(
            zip(chosen.xs[i : i + CHUNK].tolist(), chosen.ys[i : i + CHUNK].tolist(), strict=True)
        )
        yield (
            str(item.path),
            mpp_override,
            plan,
            coords,
            params.patch_size,
            str(patch_dir),
            item.name,
            params.image_format,
            params.jpeg_quality,
        )


def _write_patches_csv(
    path: Path,
    name: str,
    chosen: PatchGrid,
    fractions: np.ndarray,
    plan: ReadPlan,
    params: ExtractParams,
    label: str | None,
) -> None:
    """Write a slide's ``patches.csv`` (manifest columns) atomically, a block of rows at a time."""
    mpp_text = "" if plan.mpp is None else f"{plan.mpp:.6g}"
    size0 = f"{chosen.size_level0:.3f}"
    scale = f"{plan.scale:.6g}"
    with atomic.atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh, lineterminator="\n")
        out.writerow(MANIFEST_COLUMNS)
        for i in range(0, len(chosen), 4096):
            xs = chosen.xs[i : i + 4096].tolist()
            ys = chosen.ys[i : i + 4096].tolist()
            fr = fractions[i : i + 4096].tolist()
            out.writerows(
                [
                    name,
                    ""
                    if params.coords_only
                    else f"{name}/patches/{name}_x{x}_y{y}.{params.image_format}",
                    x,
                    y,
                    plan.level,
                    mpp_text,
                    params.patch_size,
                    f"{f:.4f}",
                    label or "",
                    size0,
                    scale,
                ]
                for x, y, f in zip(xs, ys, fr, strict=True)
            )


def write_manifest(out_dir: Path) -> int:
    """Rebuild ``<out>/manifest.csv`` from every finished slide's ``patches.csv``; returns rows."""
    rows = 0
    with (
        atomic.atomic_path(out_dir / "manifest.csv") as tmp,
        open(tmp, "w", newline="", encoding="utf-8") as fh,
    ):
        fh.write(",".join(MANIFEST_COLUMNS) + "\n")
        for record in sorted(out_dir.glob("*/slide.json")):
            part = record.parent / "patches.csv"
            try:
                done = '"status": "done"' in record.read_text(encoding="utf-8")
            except OSError:
                continue
            if not done or not part.is_file():
                continue
            with open(part, encoding="utf-8") as src:
                next(src, None)
                for line in src:
                    fh.write(line)
                    rows += 1
    return rows


def extract_patches(
    inputs: Sequence[InputItem],
    out_dir: Path,
    params: ExtractParams,
    options: BatchOptions | None = None,
) -> RunSummary:
    """Extract patches from every input into ``out_dir`` (resumable; see module docs).

    ``options``: overwrite, skip errors, shard, quiet, the command line to record.
    """
    params.validate()
    runner = BatchRunner(
        out_dir,
        command="extract-patches",
        params=params.record(),
        marker=lambda name: f"{name}/slide.json",
        options=options,
        seed=params.seed,
    )
    writer = PatchWriter(params.workers)
    try:
        summary = runner.run(inputs, lambda it, st, pr: extract_slide(it, st, pr, params, writer))
    finally:
        writer.close()
    write_manifest(out_dir)
    return summary
