"""``histo-wsl demo``: the whole job on an embedded synthetic default, no data or network needed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histo_wsl.cli.common import JsonOpt, QuietOpt, SeedOpt, print_json, reports_errors

EPILOG = "Example: histo-wsl demo --out histo-wsl-demo"


@reports_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Demo output folder.")] = Path(
        "histo-wsl-demo"
    ),
    size: Annotated[
        int,
        typer.Option(
            "--size",
            min=1024,
            max=40000,
            metavar="PX",
            help="Side of the synthetic slide in level-0 pixels.",
        ),
    ] = 6000,
    seed: SeedOpt = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo every step.")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run what histo-wsl can do on an embedded synthetic default.

    In this version that is: write a synthetic pyramidal H&E-like slide (0.5 µm/px, tissue sections
    with glands at known places) and extract patches from it with the real extract-patches code.
    Training, localization and evaluation join the demo when those commands arrive.
    """
    from histo_wsl.demo import run_demo

    result = run_demo(out, size=size, seed=seed, overwrite=overwrite, quiet=quiet)
    if json_out:
        print_json(result)
    raise typer.Exit(result["exit_code"])
