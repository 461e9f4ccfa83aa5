"""The stderr console: logs, warnings and progress go to stderr, machine output to stdout."""

from __future__ import annotations

from functools import lru_cache

from rich.console import Console

__all__ = ["print_line", "stderr_console", "warn"]


@lru_cache(maxsize=1)
def stderr_console() -> Console:
    """The process-wide rich console writing to stderr."""
    return Console(stderr=True, highlight=False)


def warn(message: str) -> None:
    """Print a one-line warning on stderr."""
    stderr_console().print(f"[yellow]warning:[/yellow] {message}", soft_wrap=True)


def print_line(text: str) -> None:
    """One plain line on stderr (no markup, no highlighting, never wrapped: file names stay whole)."""
    stderr_console().print(text, markup=False, highlight=False, soft_wrap=True)
