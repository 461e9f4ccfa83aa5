"""What ``localize`` writes for a slide, and the resolution checks before it reads one.

The map and mask TIFFs, the overlay, the GeoJSON outlines (:func:`write_slide_outputs`), and the
checks that the slide's resolution fits the model's (:func:`check_mpp`, :func:`mpp_notes`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from histo_wsl.errors import InputError
from histo_wsl.inference.job import SlideGrid, SlideJob
from histo_wsl.slideio.geojson import GeoJSONStyle, mask_to_geojson, write_geojson
from histo_wsl.slideio.slide import ReadPlan, Slide
from histo_wsl.tissue.scan import SlideTissue

__all__ = [
    "MPP_WARN_FACTOR",
    "GEOJSON_MAX_PIXELS",
    "ROI_COLOR",
    "overlap_spans",
    "OutputTissue",
    "resize_u8",
    "mpp_notes",
    "check_mpp",
    "check_whole_image",
    "write_slide_outputs",
    "write_tile_detections",
]

#: Reduction (after reading the nearest pyramid level) beyond which a warning is given.
MPP_WARN_FACTOR = 4.0


#: Outlines (GeoJSON) are traced on a mask of at most this many pixels (coarser when larger).
GEOJSON_MAX_PIXELS = 16 * 2**20


#: Colour of the ROI class in the GeoJSON and overlay.
ROI_COLOR = (230, 30, 30)


def overlap_spans(
    n_out: int, out_step: float, n_src: int, src_step: float
) -> tuple[np.ndarray, np.ndarray]:
    """For each output pixel, the source pixels it overlaps: ``[lo, hi)`` (both grids start at 0).

    An output pixel past the source's end overlaps nothing (``lo == hi``).
    """
    edges = np.arange(n_out + 1, dtype=np.float64) * (out_step / src_step)
    lo = np.clip(np.floor(edges[:-1] + 1e-9).astype(np.int64), 0, n_src)
    hi = np.clip(np.ceil(edges[1:] - 1e-9).astype(np.int64), 0, n_src)
    return lo, np.maximum(lo, hi)


class OutputTissue:
    """A tissue mask (thumbnail grid) on the output grid: the pixels the map is kept on.

    An output pixel is tissue when any part of it overlaps a tissue pixel of the mask, so the map
    reaches the tissue's outline instead of stopping at the last output pixel whose centre is on
    tissue: where tissue ends abruptly (a core, a section's edge, a cut through glands) the
    pixels straddling the edge keep their probability. On the GlaS validation slide this gave
    slide PxAP 80.68 against 80.07 (NEGEV) and 76.95 against 76.69 (Max-Min); the demo's
    synthetic slide, whose glands never reach a section's edge, loses 0.5-0.85 (docs/results.md).
    Rows are made band by band (:meth:`rows`), with memory of the band only.

    Args:
        mask: the tissue mask (H, W), bool.
        downsample: level-0 pixels per mask pixel.
        out_shape: the output grid (rows, columns).
        out_downsample: level-0 pixels per output pixel.
    """

    def __init__(
        self,
        mask: np.ndarray,
        downsample: float,
        out_shape: tuple[int, int],
        out_downsample: float,
    ) -> None:
        th, tw = mask.shape
        self.mask = mask
        self.row_lo, self.row_hi = overlap_spans(out_shape[0], out_downsample, th, downsample)
        self.col_lo, self.col_hi = overlap_spans(out_shape[1], out_downsample, tw, downsample)

    def rows(self, r0: int, n: int) -> np.ndarray:
        """Output rows ``r0`` to ``r0 + n`` as a bool array (n, output width)."""
        lo, hi = self.row_lo[r0 : r0 + n], self.row_hi[r0 : r0 + n]
        if not len(lo):
            return np.zeros((0, len(self.col_lo)), bool)
        first, last = int(lo[0]), int(hi[-1])
        # counts of tissue pixels over each output row's source rows, then over its columns
        down = np.zeros((last - first + 1, self.mask.shape[1]), np.int32)
        np.cumsum(self.mask[first:last], axis=0, out=down[1:])
        any_row = (down[hi - first] - down[lo - first]) > 0
        across = np.zeros((len(lo), any_row.shape[1] + 1), np.int32)
        np.cumsum(any_row, axis=1, out=across[:, 1:])
        return (across[:, self.col_hi] - across[:, self.col_lo]) > 0


def resize_u8(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a uint8 map (maybe a memmap) to (H, W) with bounded memory: stride, then area."""
    import cv2

    h, w = shape
    step = max(1, min(image.shape[0] // max(4 * h, 1), image.shape[1] // max(4 * w, 1)))
    small = np.ascontiguousarray(image[::step, ::step])
    interp = cv2.INTER_AREA if small.shape[0] >= h else cv2.INTER_LINEAR
    return cv2.resize(small, (w, h), interpolation=interp)


def mpp_notes(slide: Slide, model_mpp: float, plan: ReadPlan) -> list[str]:
    """Warnings about the slide's resolution against the model's."""
    notes = []
    ratio = model_mpp / slide.mpp  # type: ignore[operator]
    resize = plan.scale / plan.level_downsample  # reduction after reading the chosen level
    if ratio < 1.0 / 1.05:
        notes.append(
            f"the slide ({slide.mpp:.4g} µm/px) is coarser than the model's resolution "
            f"({model_mpp:.4g} µm/px): windows are enlarged {1 / ratio:.2f}×, and the model sees "
            "less detail than in training"
        )
    elif resize > MPP_WARN_FACTOR:
        notes.append(
            f"the slide ({slide.mpp:.4g} µm/px) is {ratio:.1f}× finer than the model "
            f"({model_mpp:.4g} µm/px) and has no pyramid level near it: windows are read from "
            f"level {plan.level} and reduced {resize:.1f}×, which is slow (a pyramidal copy of "
            "the slide reads faster)"
        )
    return notes


def check_mpp(slide: Slide, model_mpp: float | None, path: Path) -> float:
    """The model's mpp, once the slide is known to have one (else a clear error)."""
    if slide.mpp is None:
        reads = (
            "" if model_mpp is None else f", and the model reads slides at {model_mpp:.4g} µm/px"
        )
        raise InputError(
            f"has no resolution (mpp) in its metadata{reads}; give the slide's level-0 µm/px with "
            "--slide-mpp (or a slide_mpp column in the input CSV)"
            + (", or use --whole-image for a plain image" if slide.vendor == "image" else ""),
            path,
        )
    return float(model_mpp or 0.0)


def check_whole_image(slide: Slide, path: Path) -> None:
    """``--whole-image`` takes plain images only (else a clear error)."""
    if slide.vendor != "image":
        raise InputError(
            f"--whole-image resizes a plain image (PNG, JPEG...) to the network input; this is "
            f"a {slide.vendor} slide: drop --whole-image to slide windows over it",
            path,
        )


def write_slide_outputs(
    job: SlideJob, grid: SlideGrid, prob_u8: np.ndarray, found: SlideTissue
) -> dict:
    """Write the probability TIFF, mask, GeoJSON and overlay of a finished map, band by band.

    ``prob_u8`` is the map on ``grid`` (uint8, 255 = probability 1); ``found`` the slide's tissue.

    Returns:
        ``roi_px`` and ``roi_sum`` (ROI pixels and their summed uint8 probability), ``step`` (the
        GeoJSON mask's subsampling), ``features``, ``outputs`` and ``notes``.
    """
    from histo_wsl.slideio import writers

    name, slide, slide_dir, scratch = job.item.name, job.slide, job.slide_dir, job.scratch
    engine, max_bytes = job.engine, job.max_bytes
    output_mpp, s_out = grid.output_mpp, grid.s_out
    out_h, out_w = prob_u8.shape
    w0, h0 = slide.dimensions
    t8 = max(1, math.ceil(engine.threshold * 255.0 - 1e-6))  # probability >= threshold
    notes: list[str] = []
    roi_px, roi_sum = 0, 0.0
    for r in range(0, out_h, 4096):
        part = np.asarray(prob_u8[r : r + 4096])
        sel = part >= t8
        roi_px += int(sel.sum())
        roi_sum += float(part[sel].sum(dtype=np.float64))
    description = {
        "map": "probability",
        "class": engine.roi_name,
        "scale": "value / 255",
        "mpp": output_mpp,
        "slide": str(slide.path),
        "slide_mpp": slide.mpp,
        "level0_px_per_px": s_out,
    }
    # the same pyramid twice: levels as pages (OpenSlide, QuPath's OpenSlide reader) and as
    # OME-TIFF SubIFDs (Bio-Formats, the layout TIAToolbox writes for QuPath)
    for ome, suffix in ((False, "prob.tif"), (True, "prob.ome.tif")):
        writers.write_pyramid_tiff(
            slide_dir / f"{name}.{suffix}",
            prob_u8,
            output_mpp,
            description=description,
            scratch=scratch,
            max_bytes=max_bytes,
            ome=ome,
        )
    outputs = [
        f"{name}.prob.tif",
        f"{name}.prob.ome.tif",
        f"{name}.mask.png",
        f"{name}.geojson",
        f"{name}.overlay.png",
    ]
    if slide.vendor == "image":  # plain images: maps at the image's own size
        full = resize_u8(prob_u8, (h0, w0))
        writers.write_probability_png(slide_dir / f"{name}.prob.png", full, mpp=slide.mpp)
        writers.write_mask_png(slide_dir / f"{name}.mask.png", full >= t8, mpp=slide.mpp)
        outputs.append(f"{name}.prob.png")
        notes.append(f"{name}.prob.png and {name}.mask.png are at the image's own size")
        del full
    else:
        mask_u8 = writers.scratch_array(
            (out_h, out_w), np.uint8, scratch=scratch, max_bytes=max_bytes, name="mask"
        )
        for r in range(0, out_h, 4096):
            part = np.asarray(prob_u8[r : r + 4096])
            mask_u8[r : r + 4096] = (part >= t8).astype(np.uint8) * 255
        writers.write_png(slide_dir / f"{name}.mask.png", mask_u8, mpp=output_mpp)
        del mask_u8

    # outlines on a mask of bounded size
    step = 1
    while (out_h // step) * (out_w // step) > GEOJSON_MAX_PIXELS:
        step *= 2
    small = np.ascontiguousarray(prob_u8[::step, ::step])
    geo = mask_to_geojson(
        small >= t8,
        s_out * step,
        style=GeoJSONStyle(engine.roi_name, ROI_COLOR, value_scale=1.0 / 255.0),
        mpp=slide.mpp,
        values=small,
        id_namespace=name,
    )
    write_geojson(slide_dir / f"{name}.geojson", geo)
    if step > 1:
        notes.append(f"GeoJSON outlines traced on the map subsampled {step}× (bounded memory)")
    del small

    thumb = found.thumbnail
    prob_thumb = resize_u8(prob_u8, thumb.shape[:2])
    overlay = writers.overlay_image(
        thumb, prob_thumb, prob_thumb >= t8, color=ROI_COLOR, tissue=found.mask
    )
    writers.write_qc_png(slide_dir / f"{name}.overlay.png", overlay)
    return {
        "roi_px": roi_px,
        "roi_sum": roi_sum,
        "step": step,
        "features": len(geo["features"]),
        "outputs": outputs,
        "notes": notes,
    }


def write_tile_detections(
    job: SlideJob, grid: SlideGrid, prob_u8: np.ndarray, xs: np.ndarray, ys: np.ndarray, side: float
) -> int:
    """``<slide>.tiles.geojson``: each window read as a QuPath detection with its mean probability.

    Args:
        job: the slide.
        grid: its output grid.
        prob_u8: the finished map (uint8, 255 = probability 1) on ``grid``.
        xs: the windows' level-0 left edges.
        ys: the windows' level-0 top edges.
        side: the windows' side in level-0 pixels.

    Returns:
        The number of detections written.
    """
    import uuid

    name, engine = job.item.name, job.engine
    h, w = prob_u8.shape
    rgb = list(ROI_COLOR)
    features = []
    for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
        c0, r0 = int(x / grid.s_out), int(y / grid.s_out)
        c1, r1 = (
            min(w, max(c0 + 1, round((x + side) / grid.s_out))),
            min(h, max(r0 + 1, round((y + side) / grid.s_out))),
        )
        mean = (
            float(np.asarray(prob_u8[r0:r1, c0:c1]).mean()) / 255.0 if r1 > r0 and c1 > c0 else 0.0
        )
        x1, y1 = min(x + side, job.slide.dimensions[0]), min(y + side, job.slide.dimensions[1])
        ring = [[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"histo-wsl-tile|{name}|{x},{y}")),
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": engine.roi_name, "color": rgb},
                    "measurements": {"Mean probability": round(mean, 4)},
                },
            }
        )
    write_geojson(
        job.slide_dir / f"{name}.tiles.geojson", {"type": "FeatureCollection", "features": features}
    )
    return len(features)
