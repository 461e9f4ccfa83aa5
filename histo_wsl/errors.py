"""Errors that reach the user as one clear line.

Every problem a user can fix (a bad file, a missing option, an impossible request) is raised as an
:class:`InputError` whose message names the file and says what to do. The CLI prints it on one line
to stderr and exits with code 2 (or records it per item with ``--skip-errors``).
"""

from __future__ import annotations

from pathlib import Path


class HistoWSLError(Exception):
    """Base class of the errors histo-wsl raises on purpose."""

    exit_code = 2


class InputError(HistoWSLError):
    """Bad input: a file that cannot be used, or parameters that cannot work for it.

    Args:
        message: what is wrong and what to do about it, in one sentence.
        path: the file concerned; it is put in front of the message.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)
