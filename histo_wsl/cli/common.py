"""What every subcommand shares: error reporting, exit codes, JSON output and common options."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from histo_wsl.errors import HistoWSLError

F = TypeVar("F", bound=Callable[..., Any])

#: Exit codes (DESIGN.md): 0 all done, 1 some items failed (with --skip-errors), 2 bad usage/input.
EXIT_OK, EXIT_SOME_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    """Print ``histo-wsl: error: <message>`` on one stderr line; return the Exit to raise."""
    print(f"histo-wsl: error: {message}", file=sys.stderr)
    return typer.Exit(code)


def reports_errors(fn: F) -> F:
    """Turn histo-wsl's own errors into one clear stderr line and their exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except HistoWSLError as exc:
            raise fail(str(exc), exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def print_json(data: object) -> None:
    """Write one JSON document on stdout (the ``--json`` output)."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def run_batch_command(
    run: Callable[..., Any],
    inputs: list[str],
    out: Path,
    params: Any,
    *,
    shard: str | None,
    overwrite: bool,
    skip_errors: bool,
    quiet: bool,
    json_out: bool,
    describe: Callable[[Any], str],
) -> typer.Exit:
    """Collect inputs, apply ``--shard``, run a batch command, report; return the Exit to raise.

    ``run`` is a library batch function (``extract_patches``, ``localize``) returning a
    :class:`~histo_wsl.batch.RunSummary`; ``describe`` turns the summary into the one-line
    human report printed on stderr when ``--json`` is not given.
    """
    from histo_wsl.inputs import collect_inputs, parse_shard, select_shard

    shard_kn = parse_shard(shard)
    items = select_shard(collect_inputs(inputs), shard_kn)
    summary = run(
        items,
        out,
        params,
        overwrite=overwrite,
        skip_errors=skip_errors,
        shard=shard_kn,
        quiet=quiet,
        argv=sys.argv,
    )
    if json_out:
        print_json(summary.as_dict())
    else:
        print(describe(summary), file=sys.stderr)
    return typer.Exit(summary.exit_code)


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
        "quoted) or CSV lists (path[,slide_mpp][,label]).",
        show_default=False,
    ),
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder (created if needed).")]
