"""``histo-wsl demo``: the whole job on an embedded synthetic default, no data or network needed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histo_wsl.cli.common import print_json, reports_errors
from histo_wsl.cli.options import JsonOpt, QuietOpt, SeedOpt

EPILOG = """Examples:

  histo-wsl demo                       # under a minute on a 2-core CPU

  histo-wsl demo --quick --out /tmp/d  # a shortened run (smaller data, fewer epochs)
"""


@reports_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Demo output folder.")] = Path(
        "histo-wsl-demo"
    ),
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help="Shortened run: a 2048 px slide, 24 patches a class, fewer epochs (the tests "
            "run it).",
        ),
    ] = False,
    seed: SeedOpt = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo every step.")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run the whole pipeline on an embedded synthetic default: no data, no network, CPU is enough.

    Writes synthetic H&E-like patches (glands = the region of interest; normal patches = fully
    negative images) and a synthetic pyramidal slide with known glands, then runs the real code of
    extract-patches, train-classifier (a small CNN from scratch), train-decoder (NEGEV), localize
    (the slide) and evaluate (CAM vs NEGEV on held-out patches; the slide against its true glands).
    Prints where the report and the QuPath files are; demo.json holds every number. Finished steps
    are skipped on a rerun.
    """
    from histo_wsl.synthetic.demo import RECIPE, SHORT_RECIPE, run_demo

    result = run_demo(
        out,
        seed=seed,
        overwrite=overwrite,
        quiet=quiet or json_out,
        recipe=SHORT_RECIPE if quick else RECIPE,
    )
    if json_out:
        print_json(result)
    raise typer.Exit(result["exit_code"])
