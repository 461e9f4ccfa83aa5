"""``histo-wsl models``: list, show and export shipped and user models."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from histo_wsl.cli.common import print_json, reports_errors
from histo_wsl.cli.options import JsonOpt

EPILOG = """Examples:

  histo-wsl models

  histo-wsl models show glas-negev-mobilenetv2

  histo-wsl models export runs/negev/best-loc.pt --name my-negev --metrics eval/test/metrics.json
"""

EXPORT_EPILOG = """Examples:

  histo-wsl models export runs/negev/calib/best-loc.calibrated.pt --name my-negev

  histo-wsl models export runs/negev/calib/best-loc.calibrated.pt --name glas-negev-mobilenetv2 \\
      --dest models --description "NEGEV over MobileNetV2, trained on GlaS" \\
      --recipe "histo-wsl train-decoder ..." --metrics runs/negev/test/metrics.json \\
      --license-note "GlaS: research use only; cite the GlaS challenge"
"""

#: Terminal width from which the listing is a table (narrower: one block per model).
WIDE = 110

app = typer.Typer(
    name="models",
    help="List the installed models (shipped and user), show a model card, export a compact "
    "model.\n\nModels are folders <root>/<name>/ holding card.yaml and model.pt; roots are "
    "searched in order: $HISTO_WSL_MODELS (os.pathsep-separated), the user folder "
    "($XDG_DATA_HOME/histo-wsl/models, default ~/.local/share/histo-wsl/models), the repository's "
    "models/. The first root with a DEFAULT file (one line: a name) sets the model localize uses "
    "without --model. A name works wherever a checkpoint is taken (localize --model, evaluate).",
    epilog=EPILOG,
    invoke_without_command=True,
    no_args_is_help=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _fmt(value: object, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and spec:
        return format(value, spec)
    return str(value)


def _classes(row: dict) -> str:
    names = row.get("classes") or []
    neg = row.get("negative_class")
    return ", ".join(f"{n} (neg)" if n == neg else str(n) for n in names) or "-"


def _evaluated(r: dict) -> str:
    """``84.2 (79.9)``: the card's PxAP on images and, in brackets, on a slide ("-" if neither)."""
    ev = r.get("evaluated") or {}
    pxap, slide = ev.get("pxap"), ev.get("slide_pxap")
    if pxap is None and slide is None:
        return "-"
    return _fmt(pxap, ".1f") + ("" if slide is None else f" ({slide:.1f})")


def _cells(r: dict) -> list[str]:
    """A model's row: name (* default), method, backbone, classes, µm/px, threshold..."""
    val = r["validation"]
    return [
        ("* " if r["default"] else "") + r["name"],
        _fmt(r["method"]),
        _fmt(r["backbone"]),
        _classes(r),
        _fmt(r["mpp"], ".3g"),
        _fmt(r["threshold"], ".3g"),
        "-" if val is None else f"{val['metric']} {val['value']:.3f}",
        _evaluated(r),
        _fmt(r["size_mb"], ".1f"),
        r["where"] + (" (unusable)" if r["problem"] else ""),
    ]


def _list(json_out: bool) -> None:
    from histo_wsl.registry.registry import registry

    reg = registry()
    rows = [m.summary() for m in reg.models]
    if json_out:
        print_json(
            {
                "models": rows,
                "default": reg.default.name if reg.default else None,
                "search_path": [
                    {"path": str(r.path), "kind": r.kind, "exists": r.path.is_dir()}
                    for r in reg.roots
                ],
                "notes": reg.notes,
            }
        )
        return
    for note in reg.notes:
        print(f"histo-wsl: warning: {note}", file=sys.stderr)
    if not rows:
        where = "; ".join(f"{r.path} ({r.kind})" for r in reg.roots)
        print(
            f"no models installed (searched: {where}); add one with `histo-wsl models export`",
            file=sys.stderr,
        )
        return
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(soft_wrap=False)
    if console.width >= WIDE:
        table = Table(
            title="histo-wsl models (* default)",
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
        )
        table.add_column("name", no_wrap=True)
        for col in ("method", "backbone", "classes", "µm/px", "threshold", "validation"):
            table.add_column(col, overflow="fold")
        table.add_column("PxAP (slide)", overflow="fold")
        table.add_column("MB", justify="right")
        table.add_column("where", no_wrap=True)
        for r in rows:
            table.add_row(*(escape(c) for c in _cells(r)))
        console.print(table)
    else:  # a narrow terminal: one block per model
        for r in rows:
            name, method, backbone, classes, mpp, thr, val, ev, mb, where = _cells(r)
            console.print(escape(f"{name}  ({where}, {mb} MB)"), soft_wrap=True)
            console.print(
                escape(
                    f"    {method} / {backbone}; classes {classes}; {mpp} µm/px; threshold {thr}; "
                    f"validation {val}; PxAP (slide) {ev}"
                ),
                soft_wrap=True,
            )
    for root in reg.roots:
        console.print(escape(f"{root.kind}: {root.path}"), soft_wrap=True)
    for r in rows:
        if r["problem"]:
            console.print(escape(f"{r['name']} is unusable: {r['problem']}"), soft_wrap=True)


@app.callback()
@reports_errors
def models(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """List the installed models: name, method, backbone, classes, µm/px, threshold, validation.

    ``validation`` is the metric training selected the checkpoint by; ``PxAP (slide)`` the card's
    measured PxAP on images and, in brackets, on a slide (``models export --metrics /
    --slide-metrics``).
    """
    if ctx.invoked_subcommand is None:
        _list(json_out)


@app.command("list", epilog="Example: histo-wsl models list --json")
@reports_errors
def list_models(json_out: JsonOpt = False) -> None:
    """List the installed models (same as `histo-wsl models`); * marks the default."""
    _list(json_out)


@app.command("show", epilog="Example: histo-wsl models show glas-negev-mobilenetv2")
@reports_errors
def show(
    model: Annotated[
        str,
        typer.Argument(
            metavar="NAME|PATH",
            help="An installed model's name, a model folder or a checkpoint (.pt).",
            show_default=False,
        ),
    ],
    json_out: JsonOpt = False,
) -> None:
    """Print a model card: data, µm/px, classes, threshold, recipe, metrics, seed, terms of use."""
    from histo_wsl.registry.registry import CARD_FILE, card_of

    card, source = card_of(model)
    if json_out:
        print_json({"source": str(source), "card": card})
        return
    print(f"# {source}", file=sys.stderr)
    if source.name == CARD_FILE:
        sys.stdout.write(source.read_text(encoding="utf-8"))
    else:
        import yaml

        from histo_wsl.registry.export import plain

        sys.stdout.write(
            yaml.safe_dump(plain(card), sort_keys=False, allow_unicode=True, width=100)
        )


@app.command("export", epilog=EXPORT_EPILOG)
@reports_errors
def export(
    checkpoint: Annotated[
        str,
        typer.Argument(
            metavar="CHECKPOINT",
            help="The checkpoint to export (e.g. runs/negev/best-loc.pt, or a calibrated copy "
            "from evaluate --calibrate).",
            show_default=False,
        ),
    ],
    name: Annotated[
        str,
        typer.Option(
            "--name",
            "-n",
            help="The model's name (its folder): lower-case letters, digits, '.', '_', '-'.",
            show_default=False,
        ),
    ],
    dest: Annotated[
        Path | None,
        typer.Option(
            "--dest",
            help="Models folder to write <dest>/<name>/ in (default: the user folder, "
            "$XDG_DATA_HOME/histo-wsl/models; 'models' for the repository's shipped ones).",
            show_default=False,
        ),
    ] = None,
    fp16: Annotated[
        bool,
        typer.Option(
            "--fp16/--no-fp16",
            help="Store floating weights in fp16 (half the size; loaded back as fp32).",
        ),
    ] = True,
    description: Annotated[
        str | None,
        typer.Option("--description", help="What the model is, in a sentence or two."),
    ] = None,
    recipe: Annotated[
        str | None,
        typer.Option(
            "--recipe", help="The exact command(s) that trained the model (recorded in the card)."
        ),
    ] = None,
    metrics: Annotated[
        Path | None,
        typer.Option(
            "--metrics",
            help="JSON of evaluation numbers for the card: evaluate's metrics.json (headline "
            "numbers with 95% intervals) or any JSON object.",
        ),
    ] = None,
    slide_metrics: Annotated[
        Path | None,
        typer.Option(
            "--slide-metrics",
            help="JSON of the model's numbers on a slide, as labs run it (e.g. the output of "
            "benchmarks/glas_slide.py): the card's evaluation_slide.",
            show_default=False,
        ),
    ] = None,
    license_note: Annotated[
        str | None,
        typer.Option(
            "--license-note",
            help="Terms of use of the weights and their training data, e.g. 'GlaS: research use "
            "only; cite the GlaS challenge'.",
        ),
    ] = None,
    license_id: Annotated[
        str | None,
        typer.Option("--license", help="The weights' licence (SPDX identifier or short name)."),
    ] = None,
    intended_use: Annotated[
        str | None,
        typer.Option("--intended-use", help="What the model is for (task, data, users)."),
    ] = None,
    out_of_scope: Annotated[
        str | None,
        typer.Option("--out-of-scope", help="Uses it is not meant for (e.g. clinical diagnosis)."),
    ] = None,
    modality: Annotated[
        str | None,
        typer.Option(
            "--modality",
            help="What it was trained on: brightfield or dark-field (localize refuses slides "
            "of the other kind unless --force; default: the checkpoint's, else brightfield).",
            show_default=False,
        ),
    ] = None,
    stain: Annotated[
        str | None, typer.Option("--stain", help="The stain it was trained on, e.g. H&E.")
    ] = None,
    tissue: Annotated[
        str | None, typer.Option("--tissue", help="The tissue it was trained on, e.g. colon.")
    ] = None,
    knn_bank: Annotated[
        int | None,
        typer.Option(
            "--knn-bank",
            help="Keep at most this many pixels of the k-NN refiner's bank, the same number "
            "from each training image, its glass whole (the lookup's cost is proportional to it).",
            show_default=False,
        ),
    ] = None,
    knn_k: Annotated[
        int | None,
        typer.Option(
            "--knn-k",
            help="Neighbours per pixel of the k-NN refinement (default with --knn-bank: the "
            "card's k scaled with the bank).",
            show_default=False,
        ),
    ] = None,
    knn_alpha: Annotated[
        float | None,
        typer.Option(
            "--knn-alpha",
            help="Weight of the k-NN map in a k-NN refined model's map, (1 - a)·own map + "
            "a·k-NN map (training's --refine-alpha; 1: the k-NN map alone); set before the "
            "other --knn options, so --knn-slide-keys values the bank by the map it gives.",
            show_default=False,
        ),
    ] = None,
    knn_glass: Annotated[
        Path | None,
        typer.Option(
            "--knn-glass",
            help="The model's training data (as given to training): its training images, "
            "placed on glass, add glass pixels valued 0 to the k-NN refiner's bank, so that "
            "glass beside tissue is not called ROI (what --glass does in training); glass "
            "the bank holds is drawn again.",
            show_default=False,
        ),
    ] = None,
    knn_glass_share: Annotated[
        float | None,
        typer.Option(
            "--knn-glass-share",
            help="With --knn-glass: glass pixels per image pixel of the bank (default 1/16).",
            show_default=False,
        ),
    ] = None,
    knn_slide_keys: Annotated[
        Path | None,
        typer.Option(
            "--knn-slide-keys",
            help="The model's training data (as given to training): the k-NN refiner's bank is "
            "keyed again from its training images read as localize reads a slide (the card's "
            "µm/px, aspect kept) and valued by the model's own map of each, averaged over its "
            "flips (same size, glass kept).",
            show_default=False,
        ),
    ] = None,
    knn_stages: Annotated[
        int | None,
        typer.Option(
            "--knn-stages",
            help="With --knn-slide-keys: key the bank with the encoder's last N stages instead "
            "of the card's (5: every stage of MobileNetV2, fine texture beside context); "
            "glass the bank holds needs --knn-glass to be drawn again.",
            min=1,
            show_default=False,
        ),
    ] = None,
    knn_dims: Annotated[
        int | None,
        typer.Option(
            "--knn-dims",
            help="With --knn-slide-keys: principal axes per stage of the bank's keys instead of "
            "the card's (with --knn-stages, what keeps the lookup's cost).",
            min=1,
            show_default=False,
        ),
    ] = None,
    knn_grid: Annotated[
        int | None,
        typer.Option(
            "--knn-grid",
            help="With --knn-slide-keys: key the bank, and look every pixel up, on a grid this "
            "many times finer than the CAM layer's (2: stride 4 for the stride-8 networks; "
            "finer borders for four times the lookup's cost); glass the bank holds needs "
            "--knn-glass to be drawn again.",
            min=1,
            max=4,
            show_default=False,
        ),
    ] = None,
    mask_range: Annotated[
        Path | None,
        typer.Option(
            "--mask-range",
            help="The model's training data (as given to training): a stage-1 model's CAMs or a "
            "Max-Min model's mask are normalised on a slide's windows by the range its map has "
            "on the training images read as localize reads a slide, instead of each window's "
            "own min and max (which stretches a window of stroma or glass into foreground). "
            "Training records it itself; this adds it to a model trained before.",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing model of that name.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Write <dest>/<name>/model.pt (compact: fp16, no training state) and card.yaml.

    The card is the checkpoint's (method, classes, µm/px, threshold, training data, validation
    metrics, seed, versions) plus the name and the given description, recipe, evaluation and
    terms. The folder appears complete or not at all; the copy is loaded back and its predictions
    compared with the source's on a fixed random input (the largest difference is reported).
    """
    from histo_wsl.registry.export import BankEdit, CardText, export_model

    domain = {"modality": modality, "stain": stain, "tissue": tissue}
    text = CardText(
        description=description,
        recipe=recipe,
        terms=license_note,
        license=license_id,
        intended_use=intended_use,
        out_of_scope=out_of_scope,
        domain={k: v for k, v in domain.items() if v is not None},
    )
    result = export_model(
        checkpoint,
        name,
        dest,
        fp16=fp16,
        text=text,
        metrics=metrics,
        slide_metrics=slide_metrics,
        overwrite=overwrite,
        knn=BankEdit(
            pixels=knn_bank,
            k=knn_k,
            glass=knn_glass,
            slide_keys=knn_slide_keys,
            glass_share=knn_glass_share,
            stages=knn_stages,
            dims=knn_dims,
            grid=knn_grid,
            alpha=knn_alpha,
        ),
        mask_range=mask_range,
    )
    for note in result.notes:
        print(f"histo-wsl: warning: {note}", file=sys.stderr)
    if json_out:
        print_json(result.as_dict())
    else:
        print(
            f"exported {name}: {result.weights} ({result.size_mb:.1f} MB {result.dtype}, source "
            f"{result.source_mb:.1f} MB; predictions within {result.max_diff:.2g}) and "
            f"{result.card}",
            file=sys.stderr,
        )
