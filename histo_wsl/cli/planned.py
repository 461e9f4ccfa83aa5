"""Subcommands of the product that later versions fill in: they say so and exit 2."""

from __future__ import annotations

import typer

from histo_wsl import __version__
from histo_wsl.cli.common import EXIT_BAD_INPUT, fail

PLANNED = {
    "localize": (
        "Whole-slide inference: probability pyramid TIFF, mask, QuPath GeoJSON and overlay per slide.",
        "slides or images and a model",
    ),
    "evaluate": (
        "Pixel and image metrics (PxAP, Dice/IoU, F1+/F1-, accuracy) with a report.",
        "a model or predictions, and ground-truth masks or annotations",
    ),
}


def register(app: typer.Typer) -> None:
    """Add the planned subcommands to ``app``: each explains that it is not available yet."""
    for name, (summary, takes) in PLANNED.items():

        def command(ctx: typer.Context, _name: str = name) -> None:
            raise fail(
                f"'{_name}' is not available in histo-wsl {__version__} yet: it is planned and will "
                "arrive in a later version; nothing was run",
                EXIT_BAD_INPUT,
            )

        command.__doc__ = (
            f"(not available yet) {summary}\n\nNOT AVAILABLE YET in version {__version__}: planned "
            f"(it will take {takes}). "
            "Running it exits with code 2 and does nothing."
        )
        app.command(
            name,
            context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
            rich_help_panel="Planned",
        )(command)
