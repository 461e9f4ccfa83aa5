"""The ``histo-wsl`` Typer application and its entry point."""

from __future__ import annotations

from typing import Annotated

import typer

from histo_wsl import __version__
from histo_wsl.cli import demo, evaluate, extract, localize, models, slide_info, train

app = typer.Typer(
    name="histo-wsl",
    help="Weakly-supervised localization for histology: from image-level labels to pixel-accurate "
    "regions of interest on whole-slide images (NEGEV, Max-Min uncertainty).\n\n"
    "Coordinates in every output are level-0 pixels; resolutions are µm/px (mpp). Exit codes: 0 all "
    "done, 1 some items failed (with --skip-errors), 2 bad usage or bad input, 3 stopped by a "
    "fault (NaN, disk full; saved outputs intact), 4 internal error (traceback saved), 130 "
    "interrupted.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"histo-wsl {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Weakly-supervised localization for histology."""


app.command("demo", epilog=demo.EPILOG)(demo.demo)
app.command("extract-patches", epilog=extract.EPILOG)(extract.extract_patches)
app.command("slide-info")(slide_info.slide_info)
app.command("train-classifier", epilog=train.EPILOG)(train.train_classifier)
app.command("train-decoder", epilog=train.DECODER_EPILOG)(train.train_decoder)
app.command("train-mil", epilog=train.MIL_EPILOG)(train.train_mil)
app.command("evaluate", epilog=evaluate.EPILOG)(evaluate.evaluate)
app.command("localize", epilog=localize.EPILOG)(localize.localize)
app.add_typer(models.app, name="models")


def main() -> None:
    """Console-script entry point."""
    app()
