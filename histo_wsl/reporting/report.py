"""The evaluation report: ``report.md`` and a self-contained ``report.html`` with plots.

Plots are drawn with matplotlib's object-oriented API on the Agg renderer (no pyplot, no global
backend switch, no display needed): the dataset-level precision-recall curve, the Dice/mIoU-vs-
threshold curve and, per model, a grid of the best and worst images (image, ground truth, score map,
prediction against ground truth). The HTML embeds them as base64 PNG and has inline CSS only, so
the one file can be mailed or archived and opens offline in any browser; ``report.md`` shows the same
tables and links the PNG files written beside it.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histo_wsl.runtime import atomic

__all__ = ["dice_curve_png", "examples_png", "pr_curve_png", "write_reports"]

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
    height = len(examples) * 2.2 + 0.9
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
"""


def _summary_lines(metrics: dict) -> list[tuple[str, str]]:
    d = metrics["data"]
    per_class = ", ".join(f"{k}: {v}" for k, v in d["images_per_class"].items())
    lines = [
        ("data", f"{d['source']} ({d['layout']})"),
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
        lines.append(("model", f"{m['name']}: {m['checkpoint']} — {m['method']}, {m['map']}"))
        if "calibration" in m:
            c = m["calibration"]
            lines.append(
                (
                    "calibrated",
                    f"{m['name']}: threshold {c['threshold']:g} "
                    f"(mIoU {100 * (c['value'] or 0):.2f}%) written to {c['checkpoint']}",
                )
            )
    skipped = d.get("skipped_missing_masks") or []
    if skipped:
        lines.append(("left out (no mask)", f"{len(skipped)}: " + ", ".join(skipped[:10])))
    mm = d.get("skipped_mask_size_mismatch") or {}
    if mm:
        lines.append(("left out (mask of another size)", f"{len(mm)}: " + ", ".join(list(mm)[:10])))
    return lines


def render_markdown(metrics: dict, images: dict[str, str]) -> str:
    """report.md: the same content as the HTML, with the plots as linked PNG files.

    Args:
        metrics: the metrics.json content.
        images: title -> PNG file name (relative to the report).

    Returns:
        Markdown text.
    """
    models = metrics["models"]
    parts = ["# histo-wsl evaluation report", ""]
    parts += [f"- **{k}**: {v}" for k, v in _summary_lines(metrics)]
    parts += ["", "## Numbers", "", "All in %; [95% bootstrap interval over images].", ""]
    parts.append(_md_table(*numbers_table(models)))
    for m in models:
        parts += ["", f"## Classes — {m['name']}", "", _md_table(*confusion_table(m)), ""]
        parts.append(_md_table(*per_class_table(m)))
    parts += ["", "## Plots", ""]
    parts += [f"![{t}]({f})" for t, f in images.items()]
    parts += ["", "## Definitions", ""]
    parts += [f"- **{k}**: {v}" for k, v in metrics["definitions"].items()]
    parts += ["", "## Command and versions", "", "```", " ".join(metrics["argv"]), "```", ""]
    parts += ["```json", json.dumps(metrics["versions"], indent=1), "```", ""]
    return "\n".join(parts)


def render_html(metrics: dict, images: dict[str, bytes]) -> str:
    """report.html, self-contained: inline CSS and base64 PNG plots, no external reference.

    Args:
        metrics: the metrics.json content.
        images: title -> PNG bytes.

    Returns:
        HTML text.
    """
    e = html.escape
    models = metrics["models"]
    body = ["<h1>histo-wsl evaluation report</h1>", "<table>"]
    body += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _summary_lines(metrics)]
    body += ["</table>", "<h2>Numbers</h2>"]
    body.append(
        '<p class="note">All in %; [95% bootstrap interval over images]. The best '
        "threshold is chosen on this very set, so its numbers are optimistic.</p>"
    )
    body.append(_html_table(*numbers_table(models)))
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
    body.append("<h2>Definitions</h2><dl>")
    body += [f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in metrics["definitions"].items()]
    body.append("</dl><h2>Command and versions</h2>")
    body.append(f"<pre>{e(' '.join(metrics['argv']))}</pre>")
    body.append(f"<pre>{e(json.dumps(metrics['versions'], indent=1))}</pre>")
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
        results: the :class:`~histo_wsl.evaluation.accumulator.ModelResult` of each model (example images).

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
    atomic.write_text(out / "report.md", render_markdown(metrics, files))
    atomic.write_text(out / "report.html", render_html(metrics, images))
    written["report_md"] = out / "report.md"
    written["report_html"] = out / "report.html"
    return written
