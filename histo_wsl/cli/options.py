"""The options several commands share, declared once (name, unit, range and help).

A command's own options stay in its module; the training options both training commands take are
in :mod:`histo_wsl.cli.train`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = [
    "JsonOpt",
    "QuietOpt",
    "OverwriteOpt",
    "SkipErrorsOpt",
    "ShardOpt",
    "SlideMppOpt",
    "SeedOpt",
    "WorkersOpt",
    "InputsArg",
    "OutOpt",
]

JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print a machine-readable JSON summary on stdout (logs and progress go to stderr).",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Redo slides finished in an earlier run "
        "(their old outputs stay until the new ones are complete).",
    ),
]
SkipErrorsOpt = Annotated[
    bool,
    typer.Option(
        "--skip-errors",
        help="Record a failing slide in run.json and go on; the exit code is then 1.",
    ),
]
ShardOpt = Annotated[
    str | None,
    typer.Option(
        "--shard",
        metavar="K/N",
        help="Process only every N-th "
        "slide from the K-th (1 <= K <= N), e.g. one SLURM array "
        "task per shard; each shard is resumable.",
    ),
]
SlideMppOpt = Annotated[
    float | None,
    typer.Option(
        "--slide-mpp",
        min=0.0,
        metavar="µm/px",
        help="Level-0 resolution that overrides the slides' "
        "metadata (per slide: a slide_mpp CSV column).",
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (recorded in run.json).")]
WorkersOpt = Annotated[
    int,
    typer.Option(
        "--workers", "-j", min=1, help="Processes reading slides; each opens the slide itself."
    ),
]
InputsArg = Annotated[
    list[str],
    typer.Argument(
        help="Slides, images, folders, glob patterns ('*.svs', "
        "quoted), CSV lists (path[,slide_mpp][,label]) or - (paths on standard input, one per "
        "line).",
        show_default=False,
    ),
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder (created if needed).")]
