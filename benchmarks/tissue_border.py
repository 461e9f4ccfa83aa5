"""Lines along the tissue border: is the ROI more frequent on the tissue mask's edge than inside it?

Issue #25: maps drew one-pixel high-probability lines along the tissue border (slivers on the
overlay, spike polygons in the GeoJSON). A window at the border sees glass, and a model that never
saw glass in training may call it ROI; the tissue mask then cuts the map just outside tissue and
leaves a rim. Per slide, ``histo-wsl localize`` runs with the model, and on its output grid
(the tissue mask mapped as ``localize`` keeps its map: every output pixel overlapping tissue)
this compares the mask's ROI rate on the tissue's outer one-pixel ring with its rate inside (the
tissue eroded by four pixels):

* ``roi_rate_ring``, ``roi_rate_inside``: share of those pixels in ``<slide>.mask.png``;
* ``ring_excess`` = ring / inside (1: no border effect; the target is at most ``--max-excess``);
* ``roi_share_on_ring``: share of the ROI's pixels that lie on the ring;
* ``slivers``, ``sliver_pixels``: the ROI's connected regions (8-connected) with at least half of
  their pixels on the ring, what the overlay shows as lines hugging the border, and their pixels.

Default slides: ``cmu-1-small-region.svs`` from ``../shared/data/wsi`` and, with ``--glas``, the
GlaS validation slide ``glas_slide.py`` lays out. Prints one JSON object; exit status 1 when a
slide's ``ring_excess`` exceeds ``--max-excess``, 2 when no slide is there.

    python benchmarks/tissue_border.py                                   # the shipped model
    python benchmarks/tissue_border.py --model runs/negev/best-loc.pt --glas
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import DEFAULT_GLAS, ROOT, histo_wsl, run_logged  # noqa: E402

#: the target: the ROI at most this much more frequent on the tissue's rim than inside
MAX_EXCESS = 1.5
DEFAULT_SLIDES = [ROOT.parent / "shared" / "data" / "wsi" / "cmu-1-small-region.svs"]


def border_rates(slide_path: Path, out_dir: Path, max_excess: float = MAX_EXCESS) -> dict[str, Any]:
    """The ring and inside ROI rates of one localized slide (see the module docs).

    ``ring_excess`` is None when there is nothing to divide by (no ROI inside); ``border_ok`` is
    whether the ring's rate is at most ``max_excess`` times the inside's (a rim of ROI around
    empty tissue is not).
    """
    import cv2
    from PIL import Image

    from histo_wsl.inference.outputs import OutputTissue
    from histo_wsl.slideio.slide import open_slide
    from histo_wsl.tissue.scan import find_tissue

    name = slide_path.stem
    record = json.loads((out_dir / name / f"{name}.json").read_text(encoding="utf-8"))
    roi = np.asarray(Image.open(out_dir / name / f"{name}.mask.png")) > 0
    h, w = roi.shape
    with open_slide(slide_path) as slide:
        found = find_tissue(slide)
    tissue = np.asarray(found.mask, dtype=bool)  # find_tissue: a whole bool array
    s_out = float(record["output_downsample"])
    t = OutputTissue(tissue, found.downsample, (h, w), s_out).rows(0, h).astype(np.uint8)
    kernel = np.ones((3, 3), np.uint8)
    border = {"borderType": cv2.BORDER_CONSTANT, "borderValue": 0}
    ring = (t > 0) & (cv2.erode(t, kernel, **border) == 0)
    inside = cv2.erode(t, kernel, iterations=4, **border) > 0
    on_ring = float(roi[ring].mean()) if ring.any() else None
    within = float(roi[inside].mean()) if inside.any() else None
    n, labels = cv2.connectedComponents(roi.astype(np.uint8), connectivity=8)
    sizes = np.bincount(labels.ravel(), minlength=n)
    on_ring_px = np.bincount(labels.ravel(), weights=ring.ravel(), minlength=n)
    slivers = [i for i in range(1, n) if on_ring_px[i] >= 0.5 * sizes[i]]
    excess = None if on_ring is None or not within else on_ring / within
    ok = on_ring is None or within is None or on_ring <= max_excess * within
    return {
        "slide": name,
        "roi_pixels": int(roi.sum()),
        "ring_pixels": int(ring.sum()),
        "roi_rate_ring": None if on_ring is None else round(on_ring, 4),
        "roi_rate_inside": None if within is None else round(within, 4),
        "ring_excess": None if excess is None else round(excess, 3),
        "roi_share_on_ring": round(float((roi & ring).sum() / max(1, roi.sum())), 4),
        "slivers": len(slivers),
        "sliver_pixels": int(sizes[slivers].sum()),
        "border_ok": bool(ok),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("slides", nargs="*", type=Path, help="Slides (default: cmu-1-small-region).")
    p.add_argument("--model", default=None, help="Model name or checkpoint (default: shipped).")
    p.add_argument("--glas", action="store_true", help="Also the GlaS validation slide (fold 0).")
    p.add_argument("--data", type=Path, default=DEFAULT_GLAS, help="GlaS folder for --glas.")
    p.add_argument("--max-excess", type=float, default=MAX_EXCESS)
    p.add_argument("--out", type=Path, default=None, help="Keep the outputs here.")
    return p


def main(argv: list[str] | None = None) -> int:
    """Localize each slide, measure its border; print JSON; returns the exit status."""
    args = _parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="histo-wsl-border-") as tmp:
        out = args.out or Path(tmp)
        slides = [s for s in (args.slides or DEFAULT_SLIDES) if s.is_file()]
        if args.glas and (args.data / "train").is_dir():
            from glas_slide import layout_slide

            slides.append(layout_slide(args.data, 0, out / "glas")[0])
        if not slides:
            print("no slide to measure (../shared/data/wsi absent?)", file=sys.stderr)
            return 2
        model = ["--model", args.model] if args.model else []
        results = []
        for slide in slides:
            cmd = histo_wsl("localize", str(slide), *model, "--out", str(out / "maps"), "--quiet")
            code, seconds = run_logged(cmd + ["--overwrite"], out / "localize.log")
            if code != 0:
                print(f"localize failed on {slide}: see {out / 'localize.log'}", file=sys.stderr)
                return 2
            rates = border_rates(slide, out / "maps", args.max_excess)
            results.append({**rates, "localize_s": round(seconds, 1)})
        met = all(r["border_ok"] for r in results)
        report = {
            "benchmark": "tissue_border",
            "model": args.model or "default",
            "slides": results,
            "max_excess": args.max_excess,
            "target_met": met,
        }
        print(json.dumps(report, indent=1))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
