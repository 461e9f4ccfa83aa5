"""``localize``: sliding-window inference over slides and images, with QuPath-ready outputs.

Per slide, under ``<out>/<slide>/`` (DESIGN.md §3):

- ``<slide>.prob.tif``: foreground probability (uint8 0-255 = 0-1), pyramidal tiled TIFF at the
  output resolution; it covers the whole slide, one pixel = ``output_mpp / slide_mpp`` level-0
  pixels (see :mod:`histo_wsl.slideio.writers`), 0 outside tissue.
- ``<slide>.mask.png``: the binary mask (255 = ROI) on the same grid, probability >= threshold.
- ``<slide>.geojson``: the mask's outlines as a QuPath FeatureCollection in level-0 pixels
  (polygons with holes; classification = the ROI class; measurements: area µm², mean probability).
- ``<slide>.overlay.png``: the thumbnail tinted by the probability, ROI and tissue outlined.
- ``<slide>.json`` (written last, by the batch runner): slide-level class and score, ROI and
  tissue areas, threshold, resolutions, window layout, timings, model; with ``--mil``, a
  ``train-mil`` model's slide score too (:mod:`histo_wsl.inference.mil_slide`).

Plain images (PNG, JPEG...) take the same path as one-level slides, and also get
``<image>.prob.png`` and ``<image>.mask.png`` at the image's own size. ``--whole-image`` is the
papers' protocol for such images instead: the image is resized to the network input, predicted
once, and the map resized back.

How a slide is processed:

1. Windows: the network's input size at the model's resolution (the card's ``mpp``, the one the
   network saw in training, or ``--mpp``), every ``input × (1 - overlap)`` px, the last row and
   column flush with the slide's edges (:func:`~histo_wsl.slideio.grid.cover_grid`); only windows that
   touch tissue (detected on the thumbnail, or ``--tissue-geojson``) are read.
2. A reader (a background thread, or ``--workers`` processes that each open the slide) reads
   batches of windows ahead of the model, so reading hides behind inference.
3. Blending (as MONAI's sliding-window inferer): each window's map is weighted by an importance
   map (Gaussian with σ = ``sigma_scale`` × window, linear tent, or constant), both are
   area-resampled onto the output grid at the window's exact sub-pixel position, and the output is
   Σ weight·probability / Σ weight, so overlapping windows leave no seams.
4. The weighted sums live in a band of output rows only; finished rows are divided, zeroed
   outside tissue and written into the uint8 map, which is a memmap in the staging folder when it
   exceeds ``--canvas-max-mb``: memory does not grow with the slide.

Slide-level class: the mean of the windows' softmax class probabilities over the tissue windows
(each window counts once); the predicted class is its argmax and the score its value.

The ROI class: ``--class`` if given; else, when the card names a negative class and one other
class, that class; else ``ROI``. For stage-1 (CAM) checkpoints the map is that class's CAM (or the
predicted class's per window when it is ``ROI``); CAMs are min-max normalised per window, as in
training, so a CAM map shows where each window's evidence is, relative to that window. NEGEV
decoders give a class-agnostic foreground probability.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from histo_wsl.inference.blending import BandCanvas, WindowBlender
from histo_wsl.inference.domain import check_domain
from histo_wsl.inference.engine import Engine, run_windows
from histo_wsl.inference.job import SlideGrid, SlideJob
from histo_wsl.inference.outputs import (
    ROI_COLOR,
    OutputTissue,
    check_mpp,
    check_whole_image,
    mpp_notes,
    write_slide_outputs,
    write_tile_detections,
)
from histo_wsl.inference.params import OUTPUT_FACTOR, LocalizeParams
from histo_wsl.inference.windows import WindowBatches
from histo_wsl.runtime.batch import BatchOptions, BatchRunner, Progress, RunSummary
from histo_wsl.runtime.console import warn
from histo_wsl.runtime.inputs import InputItem
from histo_wsl.runtime.memory import release_freed_memory
from histo_wsl.slideio.geojson import GeoJSONStyle, mask_to_geojson, write_geojson
from histo_wsl.slideio.slide import ReadPlan, open_slide, plan_read, thumbnail_geometry
from histo_wsl.tissue.fraction import grid_tissue_fractions, window_masks
from histo_wsl.tissue.scan import (
    WHOLE_SLIDE,
    HeldLevel,
    SlideTissue,
    find_tissue,
    tissue_geojson_for,
)

if TYPE_CHECKING:
    from histo_wsl.slideio.grid import PatchGrid
    from histo_wsl.slideio.slide import Slide

__all__ = ["check_inputs", "localize", "localize_slide", "localize_whole_image", "tissue_grid"]


def localize_slide(
    item: InputItem, stage: Path, progress: Progress, engine: Engine, params: LocalizeParams
) -> dict:
    """Sliding-window inference over one slide into ``stage/<slide>/``; returns its record."""
    t_start = time.perf_counter()
    mpp_override = item.slide_mpp if item.slide_mpp is not None else params.slide_mpp
    slide_dir = stage / item.name
    slide_dir.mkdir(parents=True)
    scratch = stage / f".scratch-{item.name}"
    try:
        with open_slide(item.path, mpp=mpp_override) as slide:
            job = SlideJob(item, slide, slide_dir, scratch, engine, params, mpp_override, t_start)
            return _localize_open_slide(job, progress)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _slide_grid(job: SlideJob) -> SlideGrid:
    """The reading plan at the model's resolution and the output grid (warnings noted)."""
    item, slide, engine, params = job.item, job.slide, job.engine, job.params
    model_mpp = check_mpp(slide, engine.model_mpp, item.path)
    notes = list(slide.notes) + list(engine.notes)
    plan = plan_read(slide, mpp=model_mpp)
    for note in mpp_notes(slide, model_mpp, plan):
        notes.append(note)
        warn(f"{item.path}: {note}")
    output_mpp = float(params.output_mpp or model_mpp * OUTPUT_FACTOR)
    s_out = output_mpp / slide.mpp
    w0, h0 = slide.dimensions
    out_w, out_h = max(1, math.ceil(w0 / s_out - 1e-9)), max(1, math.ceil(h0 / s_out - 1e-9))
    if output_mpp < slide.mpp * 0.999:
        notes.append(
            f"--output-mpp {output_mpp:.4g} is finer than the slide ({slide.mpp:.4g} µm/px): "
            "the map has more pixels than the slide"
        )
    return SlideGrid(model_mpp, plan, output_mpp, s_out, out_w, out_h, notes)


def _held_level(job: SlideJob, plan: ReadPlan) -> HeldLevel | None:
    """A small slide's level 0 held in memory when its thumbnail and windows both read it.

    The thumbnail and the windows then come from one read of the file instead of one each (the
    same pixels: :class:`~histo_wsl.tissue.scan.HeldLevel`); on ``cmu-1-small-region.svs`` the
    two reads took 0.43 and 0.66 s of a 5.4 s slide. Reader processes (``--workers``) open the
    slide themselves, so they read it as before.
    """
    thumb = thumbnail_geometry(job.slide, mpp=job.params.thumbnail_mpp)
    if job.engine.workers != 0 or plan.level != 0 or thumb.plan.level != 0:
        return None
    return HeldLevel.read(job.slide)


def _tissue_windows(
    job: SlideJob, plan: ReadPlan, held: HeldLevel | None
) -> tuple[SlideTissue, PatchGrid, PatchGrid, int]:
    """The slide's tissue, the window grid, the windows that touch tissue, and the stride."""
    slide, params, size = job.slide, job.params, job.engine.size
    found = find_tissue(
        slide,
        thumbnail_mpp=params.thumbnail_mpp,
        geojson=tissue_geojson_for(job.item, params.tissue_geojson),
        params=params.tissue,
        whole_slide=not params.tissue_detection,
        pixels=held,
    )
    grid, windows, stride = tissue_grid(slide, plan, found, size, params.overlap)
    release_freed_memory()
    return found, grid, windows, stride


def tissue_grid(
    slide: Slide, plan: ReadPlan, found: SlideTissue, size: int, overlap: float
) -> tuple[PatchGrid, PatchGrid, int]:
    """(The window grid, the windows that touch the tissue, the stride) ``localize`` uses.

    ``size`` px windows at ``plan``'s resolution, ``overlap`` of a window apart, covering the
    slide; ``found`` is its tissue.
    """
    from histo_wsl.slideio.grid import cover_grid

    stride = max(1, round(size * (1.0 - overlap)))
    grid = cover_grid(slide, plan, size, stride)
    windows = grid.subset(grid_tissue_fractions(found.mask, found.downsample, grid) > 0)
    return grid, windows, stride


def _window_tissue(
    found: SlideTissue, windows: PatchGrid, size: int
) -> Callable[[int, int], np.ndarray] | None:
    """``where(i, j)``: the tissue of windows ``i:j`` as ``size``-px masks.

    Their maps are needed only there: the output keeps the map only on tissue
    (:class:`_MapSink`; :func:`~histo_wsl.tissue.fraction.window_masks`). None when the whole
    slide counts as tissue.
    """
    if found.source == WHOLE_SLIDE:
        return None
    side = float(windows.size_level0)

    def where(i: int, j: int) -> np.ndarray:
        xs, ys = windows.xs[i:j], windows.ys[i:j]
        return window_masks(found.mask, found.downsample, xs, ys, side, size)

    return where


class _MapSink:
    """Finished output rows into the uint8 map, zeroed outside tissue (counts the tissue pixels).

    The map is kept on every output pixel that overlaps tissue (:class:`OutputTissue`), and the
    tissue area is the area of those pixels, so the ROI's share of it stays a share.
    """

    def __init__(self, prob_u8: np.ndarray, found: SlideTissue, g: SlideGrid) -> None:
        self.prob_u8 = prob_u8
        self.tissue = OutputTissue(found.mask, found.downsample, (g.out_h, g.out_w), g.s_out)
        self.tissue_px = 0

    def __call__(self, r0: int, prob: np.ndarray, covered: np.ndarray) -> None:
        inside = self.tissue.rows(r0, prob.shape[0]) & covered
        self.tissue_px += int(inside.sum())
        u8 = np.rint(prob * 255.0).astype(np.uint8)
        u8[~inside] = 0
        self.prob_u8[r0 : r0 + prob.shape[0]] = u8


def _slide_class(
    class_sum: np.ndarray, n: int, engine: Engine
) -> tuple[str | None, float | None, dict]:
    """The slide's predicted class, its score and every class's mean probability (None: no window)."""
    if not n:
        return None, None, {}
    mean_probs = (class_sum / n).tolist()
    top = int(np.argmax(mean_probs))
    class_probs = {
        c: round(float(p), 6) for c, p in zip(engine.class_names, mean_probs, strict=True)
    }
    return engine.class_names[top], round(float(mean_probs[top]), 6), class_probs


def _localize_open_slide(job: SlideJob, progress: Progress) -> dict:
    """Tissue, windows, blended map, outputs of one open slide; returns the slide's record."""
    from histo_wsl.slideio import writers

    item, slide, engine, params = job.item, job.slide, job.engine, job.params
    g = _slide_grid(job)
    w0, h0 = slide.dimensions
    size = engine.size
    held = _held_level(job, g.plan)
    found, grid, windows, stride = _tissue_windows(job, g.plan, held)
    domain, domain_notes = check_domain(found.thumbnail, engine.card, item.path, params.force)
    g.notes += domain_notes
    t_tissue = time.perf_counter() - job.t_start

    # the output map: uint8, in memory or a memmap in the staging folder
    prob_u8 = writers.scratch_array(
        (g.out_h, g.out_w), np.uint8, scratch=job.scratch, max_bytes=job.max_bytes, name="prob"
    )
    sink = _MapSink(prob_u8, found, g)
    footprint = size * g.plan.scale / g.s_out
    blender = WindowBlender(size, footprint, params.blend, params.sigma_scale, engine.device)
    band = blender.n + math.ceil(stride * g.plan.scale / g.s_out) + 2
    canvas = BandCanvas(g.out_h, g.out_w, band, sink)
    n = len(windows)
    progress.start(n, item.name)
    t_infer0 = time.perf_counter()
    in_process = (held or slide) if engine.workers == 0 else None
    dataset = WindowBatches(
        item.path,
        job.slide_mpp,
        g.plan,
        windows.xs,
        windows.ys,
        size,
        engine.batch_size,
        in_process,
    )
    origin = (windows.xs / g.s_out, windows.ys / g.s_out)
    class_sum, t_model, t_wait, reads = run_windows(
        engine,
        dataset,
        blender,
        canvas,
        *origin,
        (w0 / g.s_out, h0 / g.s_out),
        progress,
        where=_window_tissue(found, windows, size),
    )
    canvas.close()
    mil = None
    if engine.mil is not None:
        mil = engine.mil.score(slide, item.path, job.slide_mpp, found, held)
    if held is not None:
        held.close()
    release_freed_memory()
    t_infer = time.perf_counter() - t_infer0

    t_write0 = time.perf_counter()
    written = write_slide_outputs(job, g, prob_u8, found)
    if params.geojson_tiles:
        side = float(grid.size_level0)
        write_tile_detections(
            job, g, prob_u8, windows.xs.astype(float), windows.ys.astype(float), side
        )
        written["outputs"].append(f"{item.name}.tiles.geojson")
    g.notes += written.pop("notes")
    t_write = time.perf_counter() - t_write0

    predicted, score, class_probs = _slide_class(class_sum, n, engine)
    if not n:
        g.notes.append("no tissue found: the map is empty and the GeoJSON has no feature")
        warn(f"{item.path}: no tissue found; empty map written")
    roi_px, roi_sum = written["roi_px"], written["roi_sum"]
    px_um2 = (g.s_out * slide.mpp) ** 2
    tissue_area = sink.tissue_px * px_um2
    return {
        "mode": "sliding-window",
        "predicted_class": predicted,
        "score": score,
        "class_probabilities": class_probs,
        "slide_score_rule": "mean of the tissue windows' softmax; predicted class = its argmax",
        **({} if mil is None else {"mil": mil}),
        "roi_class": engine.roi_name,
        "threshold": engine.threshold,
        "roi_area_um2": round(roi_px * px_um2, 3),
        "roi_pixels": roi_px,
        "roi_mean_probability": round(roi_sum / roi_px / 255.0, 6) if roi_px else None,
        "roi_features": written["features"],
        "tissue_area_um2": round(tissue_area, 3),
        "roi_fraction_of_tissue": round(roi_px * px_um2 / tissue_area, 6) if tissue_area else None,
        "domain": domain,
        "tissue_source": found.source,
        "tissue_fraction": found.fraction,
        "slide_mpp": slide.mpp,
        "mpp_source": slide.mpp_source,
        "slide_size": [w0, h0],
        "model_mpp": g.model_mpp,
        "read": {**g.plan.as_dict(), "decoded_by": slide.reader_record()},
        "output_mpp": g.output_mpp,
        "output_size": [g.out_w, g.out_h],
        "output_downsample": g.s_out,
        "geojson_downsample": g.s_out * written["step"],
        "window": {
            "size": size,
            "stride": stride,
            "overlap": params.overlap,
            "size_level0": grid.size_level0,
            "blend": params.blend,
        },
        "windows": n,
        "grid_windows": len(grid),
        "batch_size": engine.batch_size,
        "device": str(engine.device),
        "workers": engine.workers,
        "threads": engine.threads_record(),
        **({} if reads is None else {"batches_read": reads}),
        "canvas": "memmap" if isinstance(prob_u8, np.memmap) else "memory",
        "timings": {
            "tissue_s": round(t_tissue, 3),
            "inference_s": round(t_infer, 3),
            "model_s": round(t_model, 3),
            "read_wait_s": round(t_wait, 3),
            "write_s": round(t_write, 3),
            "total_s": round(time.perf_counter() - job.t_start, 3),
            "windows_per_s": round(n / t_infer, 2) if n and t_infer > 0 else None,
        },
        "model": engine.describe(),
        "outputs": written["outputs"],
        "notes": g.notes,
    }


def localize_whole_image(
    item: InputItem, stage: Path, progress: Progress, engine: Engine, params: LocalizeParams
) -> dict:
    """The papers' protocol for a plain image: resize to the input, predict once, resize back.

    Writes ``<image>.prob.png`` and ``<image>.mask.png`` at the image's size, and
    ``<image>.geojson`` (image pixels) into ``stage/<image>/``; returns its record.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812
    from PIL import Image

    from histo_wsl.slideio import writers

    t0 = time.perf_counter()
    mpp_override = item.slide_mpp if item.slide_mpp is not None else params.slide_mpp
    with open_slide(item.path, mpp=mpp_override) as slide:
        check_whole_image(slide, item.path)
        w, h = slide.dimensions
        image = slide.read_region((0, 0), 0, (w, h))
        mpp = slide.mpp
    domain, notes = check_domain(np.asarray(image), engine.card, item.path, params.force)
    progress.start(1, item.name)
    s = engine.size
    x = torch.from_numpy(np.asarray(image.resize((s, s), Image.Resampling.BILINEAR)).copy())
    probs, maps = engine.predict(x[None])
    full = F.interpolate(
        maps[:, None].float().cpu(), size=(h, w), mode="bilinear", align_corners=False
    )
    prob = full[0, 0].clamp_(0, 1).numpy()
    progress.advance(1)
    threshold = engine.threshold
    mask = prob >= threshold
    out = stage / item.name
    out.mkdir(parents=True)
    name = item.name
    writers.write_probability_png(out / f"{name}.prob.png", prob, bits=params.prob_bits)
    writers.write_mask_png(out / f"{name}.mask.png", mask)
    geo = mask_to_geojson(
        mask,
        1.0,
        style=GeoJSONStyle(engine.roi_name, ROI_COLOR),
        mpp=mpp,
        values=prob,
        id_namespace=name,
    )
    write_geojson(out / f"{name}.geojson", geo)
    p = probs[0].double().cpu().tolist()
    top = int(np.argmax(p))
    roi_px = int(mask.sum())
    return {
        "mode": "whole-image",
        "domain": domain,
        "predicted_class": engine.class_names[top],
        "score": round(float(p[top]), 6),
        "class_probabilities": {
            c: round(float(v), 6) for c, v in zip(engine.class_names, p, strict=True)
        },
        "roi_class": engine.roi_name,
        "threshold": threshold,
        "roi_pixels": roi_px,
        "roi_area_um2": None if mpp is None else round(roi_px * mpp * mpp, 3),
        "roi_mean_probability": round(float(prob[mask].mean()), 6) if roi_px else None,
        "roi_features": len(geo["features"]),
        "image_size": [w, h],
        "image_mpp": mpp,
        "input_size": s,
        "device": str(engine.device),
        "timings": {"total_s": round(time.perf_counter() - t0, 3)},
        "model": engine.describe(),
        "outputs": [f"{name}.prob.png", f"{name}.mask.png", f"{name}.geojson"],
        "notes": list(engine.notes) + notes,
    }


def check_inputs(
    inputs: Sequence[InputItem], out_dir: Path, params: LocalizeParams, *, overwrite: bool = False
) -> None:
    """Open every input still to do (its header only) before the model is loaded.

    Loading the model costs seconds and about a gigabyte; a batch with an unreadable slide, a
    slide without resolution or a missing tissue GeoJSON is refused before that. Inputs finished in
    an earlier run are not opened (unless ``overwrite``).

    Raises:
        InputError: the first input that cannot be localized, named, with the fix.
    """
    for item in inputs:
        marker = out_dir / item.name / f"{item.name}.json"
        if not overwrite and marker.is_file():
            try:
                if json.loads(marker.read_text(encoding="utf-8")).get("status") == "done":
                    continue
            except (OSError, ValueError, AttributeError):
                pass
        mpp = item.slide_mpp if item.slide_mpp is not None else params.slide_mpp
        with open_slide(item.path, mpp=mpp) as slide:
            if params.whole_image:
                check_whole_image(slide, item.path)
                continue
            check_mpp(slide, None, item.path)
        if params.tissue_detection:
            tissue_geojson_for(item, params.tissue_geojson)
    if params.mil is not None:
        from histo_wsl.inference.mil_slide import check_mil_file

        check_mil_file(params.mil)


def localize(
    inputs: Sequence[InputItem],
    out_dir: Path,
    params: LocalizeParams,
    options: BatchOptions | None = None,
) -> RunSummary:
    """Localize the model's class on every input into ``out_dir`` (resumable; see module docs).

    Args:
        inputs: slides or images (see :func:`histo_wsl.runtime.inputs.collect_inputs`).
        out_dir: output folder; each input gets ``<out>/<name>/``, the run ``run.json``.
        params: the parameters.
        options: overwrite, skip errors, shard, quiet, the command line to record.

    Returns:
        The run's summary (its ``exit_code`` is the command's).

    Raises:
        InputError: bad parameters or a model that cannot be used (before any input is touched).
    """
    params.validate()
    options = options or BatchOptions()
    if not options.skip_errors:
        check_inputs(inputs, out_dir, params, overwrite=options.overwrite)  # before the model load
    engine = Engine(params)
    record = params.record()
    record.update(
        {
            "threshold_used": engine.threshold,
            "model_mpp_used": engine.model_mpp,
            "roi_class": engine.roi_name,
            "workers_used": engine.workers,
            "batch_size_used": engine.batch_size,
        }
    )
    runner = BatchRunner(
        out_dir,
        command="localize",
        params=record,
        marker=lambda name: f"{name}/{name}.json",
        options=options,
        seed=params.seed,
        device=str(engine.device),
    )
    step = localize_whole_image if params.whole_image else localize_slide
    return runner.run(inputs, lambda it, st, pr: step(it, st, pr, engine, params))
