"""The evaluation report: ``report.md`` and a self-contained ``report.html`` with plots.

Plots are drawn with matplotlib's object-oriented API on the Agg renderer (no pyplot, no global
backend switch, no display needed): the dataset-level precision-recall curve, the Dice/mIoU-vs-
threshold curve and, per model, a grid of the best and worst images (image, ground truth, score map,
prediction against ground truth). The HTML embeds them as base64 PNG and has inline CSS only, so
the one file can be mailed or archived and opens offline in any browser; ``report.md`` shows the same
tables and links the PNG files written beside it.

Every evaluated image (or slide) is in the HTML too: a small JPEG thumbnail at the image's own
aspect ratio (:func:`thumbnail_jpeg`, made while evaluation streams, so only those few kilobytes per
image are kept) with the map over it and the ground truth outlined, in pages of
:data:`PAGE_SIZE`, and a per-image table whose columns sort on a click (a little inline JavaScript,
no library). Paths are shown relative to the report's folder when below it, else by their last name
only (:func:`display_path`): no absolute path of the machine goes into ``report.md`` or
``report.html``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from histo_wsl.runtime import atomic

__all__ = [
    "PAGE_SIZE",
    "THUMB_SIDE",
    "dice_curve_png",
    "display_path",
    "examples_png",
    "fit_size",
    "gallery_html",
    "image_columns",
    "image_table_html",
    "pr_curve_png",
    "relative_text",
    "resize_array",
    "thumbnail_jpeg",
    "write_reports",
]

#: longest side of the per-image thumbnails of the HTML report, in pixels
THUMB_SIDE = 160
#: thumbnails shown per page of the HTML report
PAGE_SIZE = 48
_JPEG_QUALITY = 70  # with full-resolution colour (4:4:4): the one-pixel outlines stay green

_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
_MARKERS = {"card": "o", "user": "s", "best": "*"}
_TP, _FP, _FN = (np.array(c, dtype=np.float32) for c in ((0, 200, 0), (230, 0, 0), (0, 90, 255)))


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    # fixed margins: a layout engine would cost more time than the whole evaluation of a small set
    fig = Figure(figsize=(width, height), dpi=100)
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.12, top=0.92)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _array(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def pr_curve_png(models: list[dict]) -> bytes:
    """Dataset-level pixel precision-recall curves of the models (metrics.json entries).

    Args:
        models: ``metrics["models"]`` entries (``curves``, ``localization``, ``n_pixels``).

    Returns:
        PNG bytes.
    """
    fig = _figure(5.6, 4.4)
    ax = fig.add_subplot()
    for i, m in enumerate(models):
        colour = _COLOURS[i % len(_COLOURS)]
        prec, rec = _array(m["curves"]["precision"]), _array(m["curves"]["recall"])
        ok = np.isfinite(prec) & np.isfinite(rec)
        pxap = m["localization"]["pxap"]["value"]
        label = f"{m['name']} (PxAP {pxap:.2f})" if pxap is not None else m["name"]
        ax.plot(rec[ok], prec[ok], color=colour, lw=1.8, label=label)
        for key, at in m["localization"]["at_threshold"].items():
            k = int(round(at["threshold"] * 1000))
            if k < 1000 and ok[k]:
                ax.plot(rec[k], prec[k], _MARKERS[key], color=colour, ms=9 if key == "best" else 6)
    if models:
        n = models[0]["n_pixels"]
        total = n["positive"] + n["negative"]
        if total:
            rate = n["positive"] / total
            ax.axhline(rate, color="grey", ls=":", lw=1, label=f"chance ({100 * rate:.1f}% ROI)")
    ax.set(xlim=(0, 1.01), ylim=(0, 1.02), xlabel="recall (pixels)", ylabel="precision (pixels)")
    ax.set_title("Precision-recall, all pixels pooled", fontsize=10)
    ax.grid(alpha=0.3)
    ax.plot([], [], "o", color="k", label="card threshold")
    ax.plot([], [], "s", color="k", label="--threshold")
    ax.plot([], [], "*", color="k", ms=9, label="best threshold (optimistic)")
    ax.legend(fontsize=7, loc="lower left")
    return _png(fig)


def dice_curve_png(models: list[dict]) -> bytes:
    """Dataset-level foreground Dice (solid) and mIoU (dashed) against the threshold.

    Args:
        models: ``metrics["models"]`` entries.

    Returns:
        PNG bytes.
    """
    fig = _figure(5.6, 4.0)
    ax = fig.add_subplot()
    grid = np.arange(1000) / 1000
    for i, m in enumerate(models):
        colour = _COLOURS[i % len(_COLOURS)]
        ax.plot(
            grid, _array(m["curves"]["dice_fg"]), color=colour, lw=1.8, label=f"{m['name']} Dice fg"
        )
        ax.plot(
            grid,
            _array(m["curves"]["miou"]),
            color=colour,
            lw=1.2,
            ls="--",
            label=f"{m['name']} mIoU",
        )
        for key, at in m["localization"]["at_threshold"].items():
            ax.axvline(at["threshold"], color=colour, lw=0.8, ls=":")
            curve = "miou" if key == "best" else "dice_fg"  # best: the mIoU maximum
            ax.plot(at["threshold"], at[curve]["value"] or 0.0, _MARKERS[key], color=colour)
    ax.set(
        xlim=(0, 1), ylim=(0, 1.02), xlabel="threshold (score >= t is foreground)", ylabel="score"
    )
    ax.set_title("Dice (foreground) and mIoU vs threshold, all pixels pooled", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _png(fig)


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _blend(image: np.ndarray, where: np.ndarray, colour: np.ndarray, alpha: float) -> np.ndarray:
    out = image.astype(np.float32).copy()
    out[where] = (1 - alpha) * out[where] + alpha * colour
    return out


def overlays(
    image: np.ndarray, mask: np.ndarray, score_map: np.ndarray, threshold: float
) -> list[np.ndarray]:
    """The grid's four panels for one image: image, ground truth, score map, prediction vs truth.

    Args:
        image: (H, W, 3) uint8.
        mask: (H, W) bool ground truth.
        score_map: (H, W) scores in [0, 1] (or uint8 0-255).
        threshold: the prediction threshold.

    Returns:
        Four (H, W, 3) uint8 arrays.
    """
    from matplotlib import colormaps

    scores = score_map.astype(np.float32)
    if score_map.dtype == np.uint8:
        scores = scores / 255.0
    gt = _blend(image, mask, _TP, 0.35)
    gt[_outline(mask)] = _TP
    heat = colormaps["inferno"](scores)[..., :3] * 255
    hm = 0.45 * image.astype(np.float32) + 0.55 * heat
    pred = scores >= threshold
    err = image.astype(np.float32).copy()
    err = _blend(err, pred & mask, _TP, 0.45)
    err = _blend(err, pred & ~mask, _FP, 0.45)
    err = _blend(err, ~pred & mask, _FN, 0.45)
    err[_outline(pred)] = (255, 255, 0)
    return [image, gt, hm, err]


def resize_array(arr: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """An image, map or mask resized to ``size`` (width, height) with Pillow.

    Args:
        arr: (H, W) or (H, W, 3) uint8, or (H, W) bool (resized as 0/255, returned as bool).
        size: (width, height) of the result.
        nearest: nearest neighbour (masks) instead of bilinear.

    Returns:
        The resized array, of the input's dtype.
    """
    from PIL import Image

    if arr.shape[1] == size[0] and arr.shape[0] == size[1]:
        return arr
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    if arr.dtype == bool:
        small = Image.fromarray(arr.astype(np.uint8) * 255).resize(size, resample)
        return np.asarray(small) > 127
    return np.asarray(Image.fromarray(arr).resize(size, resample))


def fit_size(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) scaled so that the longest side is ``side`` (aspect ratio kept)."""
    scale = side / max(width, height, 1)
    return max(1, round(width * scale)), max(1, round(height * scale))


@lru_cache(maxsize=1)
def _heat_lut() -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps["inferno"](np.arange(256) / 255.0)[:, :3] * 255).astype(np.float32)


def thumbnail_jpeg(
    image: np.ndarray,
    score_map: np.ndarray,
    mask: np.ndarray | None,
    side: int = THUMB_SIDE,
) -> tuple[bytes, int, int]:
    """One image's thumbnail for the report's grid: the map over the image, the truth outlined.

    The thumbnail has the image's aspect ratio and its longest side is ``side`` (never larger
    than the image); the map and the mask are resized onto it.

    Args:
        image: (H, W, 3) uint8 at the image's aspect ratio (any size).
        score_map: the map, uint8 0-255 or float in [0, 1], of any size (resized to the image's).
        mask: the ground truth (bool, any size), or None (no outline).
        side: longest side of the thumbnail in pixels.

    Returns:
        (JPEG bytes, width, height).
    """
    from PIL import Image

    h, w = image.shape[:2]
    size = fit_size(w, h, min(side, max(w, h)))
    small = resize_array(np.ascontiguousarray(image[..., :3]), size).astype(np.float32)
    scores = score_map
    if scores.dtype != np.uint8:
        scores = (np.clip(scores.astype(np.float32), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    heat = _heat_lut()[resize_array(scores, size)]
    out = 0.45 * small + 0.55 * heat
    if mask is not None:
        out[_outline(resize_array(mask.astype(bool), size, nearest=True))] = _TP
    buf = io.BytesIO()
    Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8)).save(
        buf, format="JPEG", quality=_JPEG_QUALITY, subsampling=0, optimize=True
    )
    return buf.getvalue(), size[0], size[1]


def examples_png(examples: list[Any], threshold: float, title: str) -> bytes | None:
    """A grid of the best and worst images of one model.

    Args:
        examples: :class:`~histo_wsl.evaluation.accumulator.Example` items with ``image`` and ``mask`` loaded.
        threshold: threshold of the prediction panel (the card's).
        title: figure title.

    Returns:
        PNG bytes, or None when there is no example.
    """
    examples = [e for e in examples if e.image is not None]
    if not examples:
        return None
    cols = ["image", "ground truth", "score map", f"prediction at {threshold:g}"]
    # captions: true class → predicted class and the image's mIoU; colours of the last panel:
    # green = true positive, red = false positive, blue = false negative, yellow = prediction outline
    # rows as high as the tallest image needs (panels 2 inches wide; square images: 2.2 inches),
    # but high enough for the row's label
    aspect = max(ex.image.shape[0] / max(ex.image.shape[1], 1) for ex in examples)
    height = len(examples) * max(2.0 * min(aspect, 2.0) + 0.2, 1.7) + 0.9
    fig = _figure(4 * 2.0, height)
    fig.subplots_adjust(
        left=0.04, right=0.99, top=1 - 0.8 / height, bottom=0.25 / height, hspace=0.2, wspace=0.04
    )
    fig.suptitle(
        f"{title}\nlast column: green true positive, red false positive, blue false negative",
        fontsize=9,
        y=1 - 0.06 / height,
        va="top",
    )
    axes = fig.subplots(len(examples), 4, squeeze=False)
    for r, ex in enumerate(examples):
        panels = overlays(ex.image, ex.mask, ex.score_map, threshold)
        for c, panel in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(np.clip(panel, 0, 255).astype(np.uint8), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=8)
        name = ex.name if len(ex.name) <= 28 else "…" + ex.name[-27:]
        axes[r][0].set_ylabel(f"{ex.kind}: {name}", fontsize=7)
        axes[r][3].set_xlabel(ex.caption, fontsize=6)
    return _png(fig)


# --------------------------------------------------------------------------------------------------
# paths: relative to the report, never absolute
# --------------------------------------------------------------------------------------------------

# an absolute path inside free text: POSIX (/...) or Windows (C:\... or C:/...), at the start or
# after a space, an equals sign, a bracket or a quote (so "µm/px", "value/255" and URLs are left)
_ABSOLUTE = re.compile(r"""(?<![^\s=(\['"])(?:/|[A-Za-z]:[\\/])[^\s'"<>|,;()\[\]]+""")
_FOLD = re.compile(r"^(.*?)(\s+\(fold \d+\))?$")


def _is_absolute(text: str) -> bool:
    return text.startswith("/") or bool(re.match(r"^[A-Za-z]:[\\/]", text))


def display_path(path: str | Path, base: Path | None = None) -> str:
    """A path as the reports show it: relative to ``base`` when below it, else its last name.

    A relative path is shown as given (it is what was typed); an absolute one never is.

    Args:
        path: a file or folder path.
        base: the report's folder (None: absolute paths show their last name only).

    Returns:
        The path to show.
    """
    text = str(path)
    if not _is_absolute(text):
        return text
    kind = PurePosixPath if text.startswith("/") else PureWindowsPath
    pure = kind(text)
    if base is not None:
        for root in {str(Path(base).absolute()), str(Path(base).resolve())}:
            try:
                return pure.relative_to(kind(root)).as_posix()
            except ValueError:
                continue
    return pure.name or "."


def relative_text(text: str, base: Path | None = None) -> str:
    """``text`` with every absolute path in it shown by :func:`display_path`.

    Args:
        text: free text (a command line, a data source, a threshold's name...).
        base: the report's folder.

    Returns:
        The text without absolute paths.
    """

    def one(match: re.Match) -> str:
        found = match.group(0)
        tail = ""
        while found and found[-1] in ".:":  # the end of a sentence, not of the path
            found, tail = found[:-1], found[-1] + tail
        return display_path(found, base) + tail

    return _ABSOLUTE.sub(one, text)


def _display_source(source: str, base: Path | None) -> str:
    """A data source (a path, ``path (fold k)``, or ``predictions + annotations``) made relative."""
    parts = []
    for part in str(source).split(" + "):
        m = _FOLD.match(part)
        path, fold = (m.group(1), m.group(2) or "") if m else (part, "")
        parts.append(display_path(path, base) + fold if _is_absolute(path) else part)
    return relative_text(" + ".join(parts), base)


def _display_argv(argv: Sequence[str], base: Path | None) -> str:
    """The command line with its absolute paths (``/x``, ``--out=/x``) made relative."""
    words = []
    for word in argv:
        word = str(word)
        key, eq, value = word.partition("=")
        if _is_absolute(word):
            word = display_path(word, base)
        elif eq and key.startswith("-") and _is_absolute(value):
            word = f"{key}={display_path(value, base)}"
        else:
            word = relative_text(word, base)
        words.append(word)
    return " ".join(words)


# --------------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------------


def _pct(v: Any, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _cell(entry: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    if not entry or entry.get("value") is None:
        return "–"
    text = f"{entry['value'] * scale:.{digits}f}"
    ci = entry.get("ci95")
    if ci and ci[0] is not None and ci[1] is not None:
        text += f" [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"
    return text


def numbers_table(models: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The headline table: one column per model, values in % with their 95 % intervals.

    Args:
        models: ``metrics["models"]`` entries.

    Returns:
        (header, rows) of strings.
    """
    header = ["metric"] + [m["name"] for m in models]
    rows: list[list[str]] = [
        ["images (with ROI / without)"]
        + [
            f"{m['n_images']} ({m['n_images_with_roi']} / {m['n_images_without_roi']})"
            for m in models
        ]
    ]
    rows.append(["PxAP (%)"] + [_cell(m["localization"]["pxap"]) for m in models])
    f1 = [m["localization"]["f1"] for m in models]
    rows.append(["F1+ at 0.5, per image (%)"] + [_cell(f["f1_pos"], 100) for f in f1])
    rows.append(["F1− at 0.5, per image (%)"] + [_cell(f["f1_neg"], 100) for f in f1])
    for key in ("card", "user", "best"):
        ats = [m["localization"]["at_threshold"][key] for m in models]
        rows.append([f"**{ats[0]['name']}**"] + [f"τ = {a['threshold']:g}" for a in ats])
        for k, label in (
            ("dice_fg", "Dice fg (%)"),
            ("dice_bg", "Dice bg (%)"),
            ("iou_fg", "IoU fg (%)"),
            ("iou_bg", "IoU bg (%)"),
            ("miou", "mIoU (%)"),
        ):
            rows.append([f"  {label}"] + [_cell(a[k], 100) for a in ats])
    rows.append(["accuracy (%)"] + [_cell(m["classification"]["accuracy"]) for m in models])
    rows.append(
        ["classification error (%)"] + [_cell(m["classification"]["error"]) for m in models]
    )
    return header, rows


def per_class_table(model: dict) -> tuple[list[str], list[list[str]]]:
    """Per-class numbers of one model (localization and classification, in %)."""
    header = [
        "class",
        "images",
        "with ROI",
        "PxAP",
        "F1+",
        "F1−",
        "Dice fg @card",
        "precision",
        "recall",
        "F1 (class)",
    ]
    rows = []
    for name, c in model["per_class"].items():
        rows.append(
            [
                name,
                str(c["n_images"]),
                str(c["n_images_with_roi"]),
                _pct(c["pxap"]),
                _pct(None if c["f1_pos"] is None else 100 * c["f1_pos"]),
                _pct(None if c["f1_neg"] is None else 100 * c["f1_neg"]),
                _pct(None if c["dice_fg@card"] is None else 100 * c["dice_fg@card"]),
                _pct(100 * c["precision"]),
                _pct(100 * c["recall"]),
                _pct(100 * c["f1"]),
            ]
        )
    return header, rows


def confusion_table(model: dict) -> tuple[list[str], list[list[str]]]:
    """The confusion matrix (rows true class, columns predicted class)."""
    cm = model["classification"]["confusion_matrix"]
    header = ["true \\ predicted"] + list(cm["classes"])
    rows = [[c] + [str(v) for v in row] for c, row in zip(cm["classes"], cm["counts"], strict=True)]
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |"]
    lines.append("|" + "|".join(["---"] * len(header)) + "|")
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(s: str, tag: str) -> str:
        bold = s.startswith("**") and s.endswith("**")
        text = html.escape(s.strip("*") if bold else s.strip())
        if bold:
            text = f"<b>{text}</b>"
        elif s.startswith("  "):  # a row under a threshold heading
            text = f'<span class="sub">{text}</span>'
        return f"<{tag}>{text}</{tag}>"

    out = ["<table>", "<tr>" + "".join(cell(h, "th") for h in header) + "</tr>"]
    out += ["<tr>" + "".join(cell(c, "td") for c in r) + "</tr>" for r in rows]
    out.append("</table>")
    return "\n".join(out)


def _fmt(value: Any, kind: str) -> tuple[str, str]:
    """(shown text, sort key) of one per-image cell."""
    if value is None or value == "":
        return "–", ""
    if kind == "bool":
        return ("yes" if value else "no"), ("1" if value else "0")
    if kind == "pct":
        return f"{100 * float(value):.1f}", f"{float(value):.6g}"
    if kind == "num":
        return f"{float(value):.3f}", f"{float(value):.6g}"
    return str(value), ""


def image_columns(rows: list[dict], threshold: float) -> list[tuple[str, str, str]]:
    """The per-image table's columns: (header, per_image.csv key, kind: text, num, pct or bool).

    Args:
        rows: one model's per-image rows (the per_image.csv rows).
        threshold: the card's threshold (on the 0.001 grid): the Dice/IoU columns are at it.

    Returns:
        The columns present in the rows.
    """
    t = f"{threshold:g}"
    cols = [("image", "image", "text"), ("label", "label", "text")]
    if any(r.get("predicted") is not None for r in rows):
        cols += [("predicted", "predicted", "text"), ("correct", "correct", "bool")]
    if any(r.get("p_predicted") is not None for r in rows):
        cols.append(("p(predicted)", "p_predicted", "num"))
    cols += [
        ("has ROI", "has_roi", "bool"),
        ("ROI in truth (%)", "gt_fg_fraction", "pct"),
        (f"Dice fg @{t} (%)", f"dice_fg@{t}", "pct"),
        (f"IoU fg @{t} (%)", f"iou_fg@{t}", "pct"),
        (f"mIoU @{t} (%)", f"miou@{t}", "pct"),
    ]
    return [c for c in cols if any(c[1] in r for r in rows)]


def image_table_html(rows: list[dict], threshold: float, key: str) -> str:
    """One model's per-image table, one row per image; a click on a header sorts by that column.

    Args:
        rows: the model's per-image rows.
        threshold: the card's threshold (the Dice/IoU columns).
        key: the model's id in the page (the table is ``table-<key>``, its grid ``grid-<key>``).

    Returns:
        HTML.
    """
    e = html.escape
    cols = image_columns(rows, threshold)
    head = ['<th data-sort="num" title="order of evaluation">#</th>'] + [
        f'<th data-sort="{"text" if kind == "text" else "num"}">{e(h)}</th>' for h, _, kind in cols
    ]
    out = [
        f'<div class="scroll"><table class="sortable images" id="table-{key}" '
        f'data-grid="grid-{key}"><thead><tr>{"".join(head)}</tr></thead><tbody>'
    ]
    for k, row in enumerate(rows):
        cells = [f'<td data-v="{k + 1}">{k + 1}</td>']
        for _, name, kind in cols:
            text, sort = _fmt(row.get(name), kind)
            attr = f' data-v="{sort}"' if kind != "text" else ""
            cells.append(f"<td{attr}>{e(text)}</td>")
        out.append(f'<tr data-k="{k}">{"".join(cells)}</tr>')
    out.append("</tbody></table></div>")
    return "\n".join(out)


def gallery_html(thumbnails: list[Any], rows: list[dict], threshold: float, key: str) -> str:
    """Every image's thumbnail (map over the image, truth outlined), in pages of :data:`PAGE_SIZE`.

    Args:
        thumbnails: :class:`~histo_wsl.evaluation.accumulator.Thumbnail` items (``row``, ``name``,
            ``jpeg``, ``width``, ``height``).
        rows: the model's per-image rows (captions).
        threshold: the card's threshold (the mIoU of the captions).
        key: the model's id in the page.

    Returns:
        HTML (without thumbnails: an empty string).
    """
    e = html.escape
    if not thumbnails:
        return ""
    miou = f"miou@{threshold:g}"
    out = [f'<div class="grid" id="grid-{key}" data-page-size="{PAGE_SIZE}">']
    for th in thumbnails:
        row = rows[th.row] if 0 <= th.row < len(rows) else {}
        value = row.get(miou)
        caption = f"{row.get('label', '')} → {row.get('predicted') or '–'}"
        if value is not None:
            caption += f", mIoU {100 * value:.1f}%"
        data = base64.b64encode(th.jpeg).decode("ascii")
        out.append(
            f'<figure class="tile" data-k="{th.row}" data-miou="{"" if value is None else value}">'
            f'<img loading="lazy" decoding="async" width="{th.width}" height="{th.height}" '
            f'alt="{e(th.name)}" title="{e(th.name)}" src="data:image/jpeg;base64,{data}">'
            f'<figcaption><span class="name">{e(th.name)}</span><br>{e(caption)}</figcaption>'
            "</figure>"
        )
    out.append("</div>")
    return "\n".join(out)


# pages of the grids, its order, and the tables' sorting; no library, nothing fetched
_SCRIPT = """
(function(){
function el(tag,text){var x=document.createElement(tag);if(text)x.textContent=text;return x;}
document.querySelectorAll('.grid').forEach(function(g){
 var size=+g.getAttribute('data-page-size')||48,tiles=[].slice.call(g.children),page=0;
 var bar=el('div'),order=el('select'),prev=el('button','\u2039 previous'),
  next=el('button','next \u203a'),info=el('span');
 bar.className='pager';
 ['as evaluated','worst first (mIoU)','best first (mIoU)'].forEach(function(t,i){
  var o=el('option',t);o.value=i;order.appendChild(o);});
 [order,prev,info,next].forEach(function(x){bar.appendChild(x);});
 function show(){var n=Math.max(1,Math.ceil(tiles.length/size));page=Math.min(Math.max(page,0),n-1);
  tiles.forEach(function(t,i){t.hidden=i<page*size||i>=(page+1)*size;});
  info.textContent=' page '+(page+1)+' of '+n+' ('+tiles.length+' images) ';
  prev.disabled=page===0;next.disabled=page>=n-1;}
 function m(t){var v=t.getAttribute('data-miou');return v===''?NaN:+v;}
 order.onchange=function(){var o=+order.value;tiles.sort(function(a,b){
  if(o===0)return a.getAttribute('data-k')-b.getAttribute('data-k');
  var x=m(a),y=m(b);if(isNaN(x))return 1;if(isNaN(y))return -1;return o===1?x-y:y-x;});
  tiles.forEach(function(t){g.appendChild(t);});page=0;show();};
 prev.onclick=function(){page--;show();};next.onclick=function(){page++;show();};
 g.showImage=function(k){for(var i=0;i<tiles.length;i++){if(tiles[i].getAttribute('data-k')===k){
  page=Math.floor(i/size);show();var t=tiles[i];t.classList.add('hl');t.scrollIntoView({block:'center'});
  setTimeout(function(){t.classList.remove('hl');},1500);return;}}};
 g.parentNode.insertBefore(bar,g);show();});
document.querySelectorAll('table.sortable').forEach(function(t){
 var ths=t.tHead.rows[0].cells,body=t.tBodies[0];
 [].forEach.call(ths,function(th,c){th.title='click to sort';th.onclick=function(){
  var asc=th.getAttribute('aria-sort')!=='ascending',num=th.getAttribute('data-sort')==='num';
  [].forEach.call(ths,function(h){h.removeAttribute('aria-sort');});
  th.setAttribute('aria-sort',asc?'ascending':'descending');
  var rows=[].slice.call(body.rows);rows.sort(function(a,b){
   var x=a.cells[c],y=b.cells[c];
   if(num){var p=x.getAttribute('data-v'),q=y.getAttribute('data-v');
    if(p==='')return q===''?0:1;if(q==='')return -1;return asc?p-q:q-p;}
   var r=x.textContent.localeCompare(y.textContent,undefined,{numeric:true});return asc?r:-r;});
  rows.forEach(function(r){body.appendChild(r);});};});
 body.onclick=function(ev){var tr=ev.target.closest('tr'),g=document.getElementById(
  t.getAttribute('data-grid'));if(tr&&g&&g.showImage)g.showImage(tr.getAttribute('data-k'));};});
})();
"""


# --------------------------------------------------------------------------------------------------
# documents
# --------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}
img{max-width:100%;height:auto;border:1px solid #eee}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.8em;white-space:pre-wrap}
.note{color:#555;font-size:.9em}.plots{display:flex;flex-wrap:wrap;gap:1em}
dt{font-weight:600;margin-top:.4em}dd{margin-left:1.2em;font-size:.9em}.sub{padding-left:1.2em}
.grid{display:flex;flex-wrap:wrap;gap:.5em;align-items:flex-end}.grid [hidden]{display:none}
.tile{margin:0;width:162px;font-size:.72em;line-height:1.25}.tile img{display:block}
.tile .name{display:inline-block;max-width:160px;overflow:hidden;text-overflow:ellipsis;
white-space:nowrap;vertical-align:bottom}.tile.hl img{outline:3px solid #ff7f0e}
.pager{margin:.4em 0;font-size:.9em}.pager select,.pager button{margin-right:.4em}
.scroll{max-height:32em;overflow:auto;display:inline-block;max-width:100%}
table.images td{padding:.15em .5em}table.images tbody tr{cursor:pointer}
table.sortable th{cursor:pointer;position:sticky;top:0;white-space:nowrap}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
"""


def _summary_lines(metrics: dict, base: Path | None = None) -> list[tuple[str, str]]:
    """(key, value) lines of the report's head; paths relative to ``base`` (the report's folder)."""
    d = metrics["data"]
    per_class = ", ".join(f"{k}: {v}" for k, v in d["images_per_class"].items())
    lines = [
        ("data", f"{_display_source(d['source'], base)} ({d['layout']})"),
        ("split", f"{d['split']} ({d['split_rule']})"),
        ("images", f"{d['n_images']} ({per_class})"),
        ("negative class", str(d.get("negative_class")) + " (images without mask: all background)"),
        ("protocol", f"{metrics['protocol']['name']}: {metrics['protocol']['description']}"),
        (
            "bootstrap",
            f"{metrics['bootstrap']['n']} resamples of the images, seed {metrics['bootstrap']['seed']}"
            if metrics["bootstrap"]["n"]
            else "none (--bootstrap 0)",
        ),
    ]
    for m in metrics["models"]:
        checkpoint = display_path(m["checkpoint"], base)
        lines.append(("model", f"{m['name']}: {checkpoint} — {m['method']}, {m['map']}"))
        card = m["localization"]["at_threshold"]["card"]
        lines.append(("threshold", f"{m['name']}: {card['threshold']:g}, {card['name']}"))
        if "calibration" in m:
            c = m["calibration"]
            lines.append(
                (
                    "calibrated copy",
                    f"{m['name']}: threshold {c['threshold']:g} "
                    f"(mIoU {100 * (c['value'] or 0):.2f}%) chosen on this set by --calibrate, "
                    f"written to {display_path(c['checkpoint'], base)}",
                )
            )
    skipped = d.get("skipped_missing_masks") or []
    if skipped:
        lines.append(("left out (no mask)", f"{len(skipped)}: " + ", ".join(skipped[:10])))
    mm = d.get("skipped_mask_size_mismatch") or {}
    if mm:
        lines.append(("left out (mask of another size)", f"{len(mm)}: " + ", ".join(list(mm)[:10])))
    return [(k, relative_text(v, base)) for k, v in lines]


def _relative_table(
    table: tuple[list[str], list[list[str]]], base: Path | None
) -> tuple[list[str], list[list[str]]]:
    """A table whose cells show no absolute path (a calibration set's path in a threshold name)."""
    header, rows = table
    return [relative_text(h, base) for h in header], [
        [relative_text(c, base) for c in r] for r in rows
    ]


def render_markdown(metrics: dict, images: dict[str, str], base: Path | None = None) -> str:
    """report.md: the same content as the HTML, with the plots as linked PNG files.

    Args:
        metrics: the metrics.json content.
        images: title -> PNG file name (relative to the report).
        base: the report's folder: paths are shown relative to it (absolute ones never).

    Returns:
        Markdown text.
    """
    models = metrics["models"]
    parts = ["# histo-wsl evaluation report", ""]
    parts += [f"- **{k}**: {v}" for k, v in _summary_lines(metrics, base)]
    parts += ["", "## Numbers", "", "All in %; [95% bootstrap interval over images].", ""]
    parts.append(_md_table(*_relative_table(numbers_table(models), base)))
    for m in models:
        parts += ["", f"## Classes — {m['name']}", "", _md_table(*confusion_table(m)), ""]
        parts.append(_md_table(*per_class_table(m)))
    parts += ["", "## Plots", ""]
    parts += [f"![{t}]({f})" for t, f in images.items()]
    parts += [
        "",
        "## Every image",
        "",
        "One row per image and model, with Dice and IoU at each threshold: "
        "[per_image.csv](per_image.csv). report.html shows every image's thumbnail (the map over "
        "the image, the ground truth outlined) and a table that sorts by any column.",
    ]
    parts += ["", "## Definitions", ""]
    parts += [f"- **{k}**: {v}" for k, v in metrics["definitions"].items()]
    parts += ["", "## Command and versions", "", "```", _display_argv(metrics["argv"], base), "```"]
    parts += ["", "```json", json.dumps(metrics["versions"], indent=1), "```", ""]
    return "\n".join(parts)


def _images_html(metrics: dict, results: Sequence[Any]) -> list[str]:
    """Per model: the grid of every image's thumbnail and the sortable per-image table."""
    e = html.escape
    body: list[str] = []
    if not results:
        return body
    for i, (res, m) in enumerate(zip(results, metrics["models"], strict=True)):
        rows = list(getattr(res, "rows", None) or [])
        thumbnails = list(getattr(res, "thumbnails", None) or [])
        if not rows:
            continue
        t = m["localization"]["at_threshold"]["card"]["threshold"]
        unit = "slides" if metrics["data"].get("layout") == "slides" else "images"
        body.append(f"<h2>Every image — {e(m['name'])}</h2>")
        if thumbnails:
            body.append(
                f'<p class="note">{len(thumbnails)} {unit}, each at its own aspect ratio: the map '
                "(dark: low, yellow: high) over the image, the ground truth outlined in green; "
                f"captions: true → predicted class and the image's mIoU at {t:g}. A click on a "
                "row of the table below shows its image.</p>"
            )
            body.append(gallery_html(thumbnails, rows, t, str(i + 1)))
        body.append(
            f'<p class="note">One row per image (per_image.csv has every column); Dice, IoU and '
            f"mIoU of each image at the card threshold {t:g}, in %. Click a header to sort.</p>"
        )
        body.append(image_table_html(rows, t, str(i + 1)))
    return body


def render_html(
    metrics: dict,
    images: dict[str, bytes],
    results: Sequence[Any] | None = None,
    base: Path | None = None,
) -> str:
    """report.html, self-contained: inline CSS, script and base64 images, no external reference.

    Args:
        metrics: the metrics.json content.
        images: title -> PNG bytes.
        results: each model's :class:`~histo_wsl.evaluation.accumulator.ModelResult` (its
            per-image rows and thumbnails: the grid of every image and the per-image table), in
            the order of ``metrics["models"]``; None: no per-image section.
        base: the report's folder: paths are shown relative to it (absolute ones never).

    Returns:
        HTML text.
    """
    e = html.escape
    models = metrics["models"]
    body = ["<h1>histo-wsl evaluation report</h1>", "<table>"]
    body += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _summary_lines(metrics, base)]
    body += ["</table>", "<h2>Numbers</h2>"]
    body.append(
        '<p class="note">All in %; [95% bootstrap interval over images]. The best '
        "threshold is chosen on this very set, so its numbers are optimistic.</p>"
    )
    body.append(_html_table(*_relative_table(numbers_table(models), base)))
    for m in models:
        body.append(f"<h2>Classes — {e(m['name'])}</h2>")
        body.append(_html_table(*confusion_table(m)))
        body.append(_html_table(*per_class_table(m)))
    body.append("<h2>Plots</h2>")
    body.append('<div class="plots">')
    for title, png in images.items():
        data = base64.b64encode(png).decode("ascii")
        body.append(
            f'<figure><img alt="{e(title)}" title="{e(title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{e(title)}</figcaption></figure>"
        )
    body.append("</div>")
    per_image = _images_html(metrics, results or [])
    body += per_image
    body.append("<h2>Definitions</h2><dl>")
    body += [f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in metrics["definitions"].items()]
    body.append("</dl><h2>Command and versions</h2>")
    body.append(f"<pre>{e(_display_argv(metrics['argv'], base))}</pre>")
    body.append(f"<pre>{e(json.dumps(metrics['versions'], indent=1))}</pre>")
    if per_image:
        body.append(f"<script>{_SCRIPT}</script>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>histo-wsl evaluation</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def write_reports(out: Path, metrics: dict, results: list[Any]) -> dict[str, Path]:
    """Draw the plots and write report.md, report.html and the PNG files in ``out``.

    Args:
        out: output folder.
        metrics: the metrics.json content (cleaned: no NaN).
        results: the :class:`~histo_wsl.evaluation.accumulator.ModelResult` of each model (example
            images, per-image rows and thumbnails).

    Returns:
        Name -> path of the files written.
    """
    images: dict[str, bytes] = {
        "Precision-recall curve": pr_curve_png(metrics["models"]),
        "Dice and mIoU vs threshold": dice_curve_png(metrics["models"]),
    }
    files = {
        "Precision-recall curve": "pr_curve.png",
        "Dice and mIoU vs threshold": "dice_curve.png",
    }
    for i, (res, m) in enumerate(zip(results, metrics["models"], strict=True)):
        t = m["localization"]["at_threshold"]["card"]["threshold"]
        png = examples_png(
            res.examples, t, f"{m['name']}: best and worst images (mIoU at the card threshold)"
        )
        if png is not None:
            title = f"Best and worst images — {m['name']}"
            images[title] = png
            files[title] = "examples.png" if len(results) == 1 else f"examples-{i + 1}.png"
    written: dict[str, Path] = {}
    for title, name in files.items():
        with atomic.atomic_path(out / name) as tmp:
            tmp.write_bytes(images[title])
        written[name] = out / name
    atomic.write_text(out / "report.md", render_markdown(metrics, files, base=out))
    atomic.write_text(out / "report.html", render_html(metrics, images, results, base=out))
    written["report_md"] = out / "report.md"
    written["report_html"] = out / "report.html"
    return written
