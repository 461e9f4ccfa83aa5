"""What every subcommand shares: error reporting, exit codes, JSON output and common options."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from histo_wsl.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAULT,
    EXIT_INTERNAL,
    DiskFullError,
    HistoWSLError,
    is_disk_full,
)

if TYPE_CHECKING:
    from histo_wsl.runtime.batch import BatchOptions

F = TypeVar("F", bound=Callable[..., Any])

#: exit code of a command interrupted with Ctrl-C (128 + SIGINT, as shells report it)
EXIT_INTERRUPTED = 130


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
        except _cli_exceptions():
            raise
        except KeyboardInterrupt:
            raise fail("interrupted; outputs finished so far are kept", EXIT_INTERRUPTED) from None
        except Exception as exc:
            if is_disk_full(exc):
                full = DiskFullError(Path(getattr(exc, "filename", None) or Path.cwd() / "?"))
                raise fail(str(full), EXIT_FAULT) from None
            saved = save_traceback(exc)
            raise fail(
                f"internal error: {type(exc).__name__}: {_first_line(exc)} (a bug in histo-wsl, "
                f"not in your data; the traceback is in {saved}: please report it)",
                EXIT_INTERNAL,
            ) from None

    return wrapper  # type: ignore[return-value]


@functools.cache
def _cli_exceptions() -> tuple[type[BaseException], ...]:
    """The exceptions the command-line framework handles itself (exits, usage errors, aborts)."""
    kinds: list[type[BaseException]] = [typer.Exit, typer.Abort]
    for module in ("click.exceptions", "typer._click.exceptions"):  # older / newer Typer
        try:
            mod = __import__(module, fromlist=["ClickException"])
        except ImportError:
            continue
        kinds += [getattr(mod, n) for n in ("ClickException", "Exit", "Abort") if hasattr(mod, n)]
    return tuple(kinds)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else ""


def crash_dir() -> Path:
    """Where internal-error tracebacks go.

    ``$HISTO_WSL_CRASH_DIR``, else the user's state folder (``$XDG_STATE_HOME/histo-wsl/crashes``,
    default ``~/.local/state/histo-wsl/crashes``).
    """
    import os

    if os.environ.get("HISTO_WSL_CRASH_DIR"):
        return Path(os.environ["HISTO_WSL_CRASH_DIR"])
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "histo-wsl" / "crashes"


def save_traceback(exc: BaseException) -> Path:
    """Write the command line, versions and traceback of ``exc`` to a new file; returns its path.

    Falls back to the temporary folder when the crash folder cannot be written.
    """
    import os
    import tempfile
    import time
    import traceback

    from histo_wsl import __version__

    text = (
        f"histo-wsl {__version__}, python {sys.version.split()[0]}\n"
        f"command: {' '.join(sys.argv)}\ncwd: {os.getcwd()}\n\n"
        + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    )
    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    for folder in (crash_dir(), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    return Path("(nowhere: no writable folder)")


def print_json(data: object) -> None:
    """Write one JSON document on stdout (the ``--json`` output)."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def batch_options(
    shard: str | None, overwrite: bool, skip_errors: bool, quiet: bool
) -> BatchOptions:
    """The batch options of a command line (``--shard K/N`` checked here)."""
    from histo_wsl.runtime.batch import BatchOptions
    from histo_wsl.runtime.inputs import parse_shard

    return BatchOptions(overwrite, skip_errors, parse_shard(shard), quiet, tuple(sys.argv))


def run_batch_command(
    run: Callable[..., Any],
    inputs: list[str],
    out: Path,
    params: Any,
    options: BatchOptions,
    *,
    json_out: bool,
    describe: Callable[[Any], str],
) -> typer.Exit:
    """Collect inputs, keep this ``--shard``'s, run a batch command, report; return the Exit.

    ``run`` is a library batch function (``extract_patches``, ``localize``) returning a
    :class:`~histo_wsl.runtime.batch.RunSummary`; ``describe`` turns the summary into the one-line
    human report printed on stderr when ``--json`` is not given.
    """
    from histo_wsl.runtime.inputs import collect_inputs, select_shard

    items = select_shard(collect_inputs(inputs), options.shard)
    summary = run(items, out, params, options)
    if json_out:
        print_json(summary.as_dict())
    else:
        print(describe(summary), file=sys.stderr)
    return typer.Exit(summary.exit_code)
