"""A GlaS validation slide: the model as labs run it (``localize`` on a slide) next to the papers' protocol.

The 18 validation images of a GlaS fold are laid out as one pyramidal TIFF at 0.62 µm/px (GlaS's
scan resolution) on white glass, with gaps between the images so that tissue detection matters,
and their gland masks as ``<slide>_mask.png`` beside it. Then, each a ``histo-wsl`` child process:

1. ``localize <slide> --model M`` (sliding windows at the card's µm/px, as for any slide);
2. ``evaluate --predictions <localize out> --annotations <masks>``: slide PxAP and Dice;
3. ``evaluate M --data GLAS --fold F --split val``: the papers' protocol (each image resized whole
   to the network input) on the same images.

It prints one JSON object: both PxAPs, the slide's Dice, the gap (papers' − slide) and the seconds
of each step; with ``--tta card,flips`` the flips' numbers and localize-time ratio under
``other_tta``.

``tissue_bounds`` (``--no-tissue-bounds`` skips it; two more localize + evaluate pairs, with the
first TTA) splits the gap into three parts by running ``localize --tissue-geojson`` with two
tissue masks the layout knows exactly (:func:`write_tissue_bounds`): the images' pixels without
the glass open to the slide's glass (white pixels 4-connected to it: what a perfect tissue
detector keeps), and the images' whole rectangles (every pixel the papers' protocol scores,
glass inside an image included). ``detection`` is the first's slide PxAP minus the detected
tissue's, ``glass_labelled_gland`` the second's minus the first's (GlaS labels some white areas
open to an image's edge gland: a map kept off glass cannot score them), ``windows`` the papers'
protocol minus the second's (the model on sliding windows instead of each whole image).

``<out>/card.json`` holds the headline numbers for a model card (``histo-wsl models export ...
--slide-metrics <out>/card.json``). Exit status 0, or 2 when GlaS is missing (``--skip-missing``:
a message and 0).

    python benchmarks/glas_slide.py                         # the default model, fold 0
    python benchmarks/glas_slide.py --model runs/negev/best-loc.pt --out runs/glas-slide-negev
    python benchmarks/glas_slide.py --tta card,flips         # is --tta flips worth its time?
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import eval_numbers, fresh_glas_run, histo_wsl, run_logged  # noqa: E402

#: GlaS scan resolution (µm/px; Sirinukunwattana et al. 2017)
GLAS_MPP = 0.62
#: the white of the glass between the images
GLASS = 243
#: a pixel whose min(R, G, B) is above this is white (glass, or a lumen as bright as glass)
WHITE = 200


def place_images(
    images: list[np.ndarray], truths: list[np.ndarray], columns: int, gap: int
) -> tuple[np.ndarray, np.ndarray, list[dict[str, int]]]:
    """Images on white glass in a grid of ``columns``, ``gap`` px apart, with their masks.

    Args:
        images: RGB uint8 arrays.
        truths: one boolean (or 0/non-0) mask per image, its shape.

    Returns:
        (RGB slide, uint8 mask (255 inside), one placement per image: x, y, width, height).
    """
    cell_w = max(im.shape[1] for im in images) + gap
    cell_h = max(im.shape[0] for im in images) + gap
    rows = -(-len(images) // columns)
    width, height = gap + min(columns, len(images)) * cell_w, gap + rows * cell_h
    rgb = np.full((height, width, 3), GLASS, np.uint8)
    truth = np.zeros((height, width), np.uint8)
    placed = []
    for i, (im, m) in enumerate(zip(images, truths, strict=True)):
        x, y = gap + (i % columns) * cell_w, gap + (i // columns) * cell_h
        h, w = im.shape[:2]
        rgb[y : y + h, x : x + w] = im
        truth[y : y + h, x : x + w] = np.where(m > 0, 255, 0)
        placed.append({"x": x, "y": y, "width": w, "height": h})
    return rgb, truth, placed


def write_pyramid(path: Path, rgb: np.ndarray, mpp: float = GLAS_MPP) -> None:
    """A tiled (256 px), JPEG (quality 95), pyramidal TIFF with resolution tags, halved to 512 px."""
    import tifffile
    from PIL import Image

    levels = [rgb]
    while max(levels[-1].shape[:2]) > 512:
        prev = Image.fromarray(levels[-1])
        levels.append(np.asarray(prev.resize((prev.width // 2, prev.height // 2), Image.BOX)))
    with tifffile.TiffWriter(path) as tw:
        for i, level in enumerate(levels):
            res = 1e4 / (mpp * 2**i)
            tw.write(
                level,
                tile=(256, 256),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 95},
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1,
                metadata=None,
            )


def write_slide(folder: Path, name: str, rgb: np.ndarray, truth: np.ndarray) -> tuple[Path, Path]:
    """``folder/<name>.tif`` (:func:`write_pyramid`) and ``folder/annotations/<name>_mask.png``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    slide = folder / f"{name}.tif"
    write_pyramid(slide, rgb)
    mask = folder / "annotations" / f"{name}_mask.png"
    mask.parent.mkdir(exist_ok=True)
    Image.fromarray(truth).save(mask)
    return slide, mask


def layout_slide(
    glas: Path, fold: int, out: Path, columns: int = 6, gap: int = 256
) -> tuple[Path, Path, list[dict]]:
    """Write ``out/glas-val-fold<F>.tif`` (pyramidal, tiled, JPEG) and its ``_mask.png``.

    Returns:
        (slide, mask, one placement per image: name, x, y, width, height).
    """
    from PIL import Image

    from histo_wsl.data.sources import load_samples

    samples = [s for s in load_samples(glas, fold=fold).samples if s.split == "val"]
    images = [np.asarray(Image.open(s.image).convert("RGB")) for s in samples]
    masks = [np.asarray(Image.open(s.mask)) for s in samples]
    masks = [m if m.ndim == 2 else m.max(axis=2) for m in masks]
    rgb, truth, placed = place_images(images, masks, columns, gap)
    for p, s in zip(placed, samples, strict=True):
        p["name"] = s.image.stem
    slide, mask = write_slide(out, f"glas-val-fold{fold}", rgb, truth)
    return slide, mask, placed


def open_glass(rgb: np.ndarray) -> np.ndarray:
    """White pixels (min(R, G, B) > :data:`WHITE`) 4-connected to the slide's border: the glass.

    A white lumen enclosed by tissue is not glass; one open to an image's edge joins the glass
    between the images and is.
    """
    import cv2

    white = (rgb.min(axis=2) > WHITE).astype(np.uint8)
    _, labels = cv2.connectedComponents(white, connectivity=4)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    glass = np.unique(border[border > 0])
    return np.isin(labels, glass)


def write_tissue_bounds(slide: Path, placed: list[dict], folder: Path) -> dict[str, Path]:
    """Two tissue GeoJSONs for ``localize --tissue-geojson`` that the layout knows exactly.

    ``images``: each image's rectangle. ``images_without_open_glass``: the same pixels less the
    glass open to the slide's glass (:func:`open_glass`, on level 0 as written, JPEG and all).

    Returns:
        {name: path} for the two files in ``folder``.
    """
    import tifffile

    from histo_wsl.slideio.geojson import mask_to_geojson, write_geojson

    rgb = tifffile.imread(slide, key=0)
    rects = np.zeros(rgb.shape[:2], dtype=bool)
    for p in placed:
        rects[p["y"] : p["y"] + p["height"], p["x"] : p["x"] + p["width"]] = True
    masks = {"images": rects, "images_without_open_glass": rects & ~open_glass(rgb)}
    paths = {}
    for name, mask in masks.items():
        paths[name] = folder / f"{name.replace('_', '-')}.geojson"
        write_geojson(paths[name], mask_to_geojson(mask, 1.0))
    return paths


def gap_parts(detected: float, perfect: float, rects: float, papers: float) -> dict[str, float]:
    """The gap (papers' − detected slide PxAP) in three parts that add up to it.

    Args:
        detected: slide PxAP with localize's detected tissue.
        perfect: with the images' pixels less the open glass as tissue.
        rects: with the images' rectangles as tissue.
        papers: the papers' protocol on the same images.
    """
    return {
        "detection": round(perfect - detected, 2),
        "glass_labelled_gland": round(rects - perfect, 2),
        "windows": round(papers - rects, 2),
    }


def _dice(model: dict[str, Any]) -> float | None:
    card = ((model.get("localization") or {}).get("at_threshold") or {}).get("card") or {}
    value = (card.get("dice_fg") or {}).get("value")
    return None if value is None else round(value, 4)


def main(argv: list[str] | None = None) -> int:
    """Lay the slide out, localize, evaluate both ways; print JSON; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="GlaS folder (default: ../shared/data/glas next to the repo).")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--model", default="glas-negev-mobilenetv2", help="Checkpoint or model name.")
    p.add_argument("--out", default="runs/glas-slide")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--localize-options",
        default="",
        help="More localize options, one string (e.g. '--overlap 0.5 --mpp 1.2'): a sweep.",
    )
    p.add_argument(
        "--tta",
        default="card",
        help="Comma list of test-time augmentations (card = the card's own, none, flips): both "
        "protocols for each; the first is the headline, the others are reported with their "
        "gain and time ratio.",
    )
    p.add_argument(
        "--tissue-bounds",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Also localize with the layout's exact tissue (two more runs) and split the gap.",
    )
    p.add_argument("--skip-missing", action="store_true")
    args = p.parse_args(argv)
    ttas = [t.strip() for t in args.tta.split(",") if t.strip()]
    if not ttas or len(set(ttas)) != len(ttas):
        p.error("--tta: a comma list of distinct test-time augmentations, e.g. none,flips")
    run = fresh_glas_run(args.data, args.skip_missing, args.out)
    if isinstance(run, int):
        return run
    data, out = run
    t0 = time.perf_counter()
    slide, mask, placed = layout_slide(data, args.fold, out)
    seconds: dict[str, float] = {"layout": round(time.perf_counter() - t0, 1)}
    rows, commands = {}, {}
    for tta in ttas:
        tag = "" if tta == ttas[0] else f"-{tta}"
        row = _measure(args, data, out, slide, mask, tta, tag, seconds, commands)
        if row is None:
            return 1
        rows[tta] = row
    first = rows[ttas[0]]
    bounds = None
    if args.tissue_bounds:
        bounds = _tissue_bounds(args, out, slide, mask, placed, ttas[0], first, seconds, commands)
        if bounds is None:
            return 1
    report = {
        "model": args.model,
        "localize_options": args.localize_options,
        "fold": args.fold,
        "images": len(placed),
        "slide": {"path": str(slide), "mpp": GLAS_MPP, "size": list(map(int, _size(slide)))},
        **first,
        **({"tissue_bounds": bounds} if bounds else {}),
        "seconds": seconds,
        "commands": commands,
    }
    if len(ttas) > 1:  # each other TTA against the first: its gain and its cost
        base = seconds["localize"]
        report["other_tta"] = {
            t: {**r, "localize_time_ratio": round(seconds[f"localize-{t}"] / base, 2)}
            for t, r in rows.items()
            if t != ttas[0]
        }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    card = card_entry(report, argv if argv is not None else sys.argv[1:])
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    return 0


def card_entry(report: dict[str, Any], argv: list[str]) -> dict[str, Any]:
    """The report as a model card's ``evaluation_slide`` (``models export --slide-metrics``).

    The numbers and the command that measured them, without the run's absolute paths.
    """
    keep = (
        "tta",
        "slide_pxap",
        "slide_dice",
        "papers_protocol_pxap",
        "papers_protocol_dice",
        "gap",
    )
    entry: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/glas_slide.py", *argv]),
        "data": f"GlaS fold {report['fold']}, the {report['images']} validation images laid out "
        f"as one slide at {GLAS_MPP} µm/px",
        **{k: report[k] for k in keep},
    }
    if report.get("localize_options"):
        entry["localize_options"] = report["localize_options"]
    for tta, row in (report.get("other_tta") or {}).items():
        entry[f"tta_{tta}"] = {k: row[k] for k in (*keep[1:], "localize_time_ratio")}
    return entry


def _measure(
    args: argparse.Namespace,
    data: Path,
    out: Path,
    slide: Path,
    mask: Path,
    tta: str,
    tag: str,
    seconds: dict[str, float],
    commands: dict[str, str],
) -> dict[str, Any] | None:
    """Both protocols with one test-time augmentation; None when a step failed (logged)."""
    tta_option = [] if tta == "card" else ["--tta", tta]
    steps = {
        **_slide_steps(args, out, slide, mask, tag, tta_option),
        f"evaluate_images{tag}": histo_wsl(
            "evaluate", args.model, "--data", str(data), "--fold", str(args.fold), "--split",
            "val", *tta_option, "--out", str(out / f"eval-images{tag}"), "--device",
            args.device, "--quiet",
        ),
    }  # fmt: skip
    if not _run_steps(steps, out, seconds, commands):
        return None
    slide_m = json.loads((out / f"eval-slide{tag}" / "metrics.json").read_text())["models"][0]
    image_m = json.loads((out / f"eval-images{tag}" / "metrics.json").read_text())["models"][0]
    slide_pxap, image_pxap = eval_numbers(slide_m)["pxap"], eval_numbers(image_m)["pxap"]
    record = out / f"localize{tag}" / slide.stem / f"{slide.stem}.json"
    return {
        "tta": json.loads(record.read_text())["model"]["tta"],  # what localize actually used
        "slide_pxap": slide_pxap,
        "slide_dice": _dice(slide_m),
        "papers_protocol_pxap": image_pxap,
        "papers_protocol_dice": _dice(image_m),
        "gap": None if None in (slide_pxap, image_pxap) else round(image_pxap - slide_pxap, 2),
    }


def _slide_steps(
    args: argparse.Namespace,
    out: Path,
    slide: Path,
    mask: Path,
    tag: str,
    extra: list[str],
) -> dict[str, list[str]]:
    """``localize{tag}`` and ``evaluate_slide{tag}``: the slide's map and its PxAP."""
    return {
        f"localize{tag}": histo_wsl(
            "localize", str(slide), "--model", args.model, "--out", str(out / f"localize{tag}"),
            "--device", args.device, *extra, "--quiet", *shlex.split(args.localize_options),
        ),
        f"evaluate_slide{tag}": histo_wsl(
            "evaluate", "--predictions", str(out / f"localize{tag}"), "--annotations",
            str(mask.parent), "--out", str(out / f"eval-slide{tag}"), "--quiet",
        ),
    }  # fmt: skip


def _run_steps(
    steps: dict[str, list[str]], out: Path, seconds: dict[str, float], commands: dict[str, str]
) -> bool:
    """Run each command, logged; False (and a message) at the first that fails."""
    for name, cmd in steps.items():
        code, secs = run_logged(cmd, out / "logs" / f"{name}.log")
        seconds[name] = round(secs, 1)
        commands[name] = " ".join(cmd)
        if code != 0:
            print(f"error: {name} failed; see {out / 'logs' / (name + '.log')}", file=sys.stderr)
            return False
    return True


def _tissue_bounds(
    args: argparse.Namespace,
    out: Path,
    slide: Path,
    mask: Path,
    placed: list[dict],
    tta: str,
    row: dict[str, Any],
    seconds: dict[str, float],
    commands: dict[str, str],
) -> dict[str, Any] | None:
    """Slide PxAP with the layout's exact tissue masks and the gap's parts; None on a failure."""
    files = write_tissue_bounds(slide, placed, out / "tissue")
    tta_option = [] if tta == "card" else ["--tta", tta]
    pxap = {}
    for name, path in files.items():
        tag = f"-tissue-{path.stem}"
        steps = _slide_steps(
            args, out, slide, mask, tag, [*tta_option, "--tissue-geojson", str(path)]
        )
        if not _run_steps(steps, out, seconds, commands):
            return None
        metrics = json.loads((out / f"eval-slide{tag}" / "metrics.json").read_text())
        pxap[name] = eval_numbers(metrics["models"][0])["pxap"]
    result: dict[str, Any] = {f"slide_pxap_{name}": value for name, value in pxap.items()}
    values = (row["slide_pxap"], pxap["images_without_open_glass"], pxap["images"])
    if None not in values and row["papers_protocol_pxap"] is not None:
        result["gap_parts"] = gap_parts(*values, row["papers_protocol_pxap"])
    return result


def _size(slide: Path) -> tuple[int, int]:
    import tifffile

    with tifffile.TiffFile(slide) as tif:
        return tif.pages[0].shape[1], tif.pages[0].shape[0]


if __name__ == "__main__":
    raise SystemExit(main())
