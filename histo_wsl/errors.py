"""Errors that reach the user as one clear line.

Every problem a user can fix (a bad file, a missing option, an impossible request) is raised as an
:class:`InputError` whose message names the file and says what to do. The CLI prints it on one line
to stderr and exits with code 2 (or records it per item with ``--skip-errors``). A run that stops on a
fault it cannot fix itself (a diverged training, a full disk) raises a :class:`FaultError`: one line,
exit code 3, earlier outputs intact.

Exit codes (the README's table): :data:`EXIT_OK`, :data:`EXIT_SOME_FAILED`, :data:`EXIT_BAD_INPUT`,
:data:`EXIT_FAULT`, :data:`EXIT_INTERNAL`.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

__all__ = [
    "EXIT_OK",
    "EXIT_SOME_FAILED",
    "EXIT_BAD_INPUT",
    "EXIT_FAULT",
    "EXIT_INTERNAL",
    "HistoWSLError",
    "InputError",
    "FaultError",
    "DiskFullError",
    "is_disk_full",
]

#: everything done
EXIT_OK = 0
#: some items failed and were left out (``--skip-errors``); the others are done
EXIT_SOME_FAILED = 1
#: bad usage or bad input: nothing was done (or, per item, that item)
EXIT_BAD_INPUT = 2
#: the run stopped on a fault (NaN, disk full); what was saved before is intact
EXIT_FAULT = 3
#: an internal error (a bug): one line, the traceback saved to a file
EXIT_INTERNAL = 4


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


class FaultError(HistoWSLError):
    """The run stopped on a fault (a diverged training, a full disk); earlier outputs are kept."""

    exit_code = EXIT_FAULT


class DiskFullError(FaultError):
    """No space left where an output was being written; the partial file is removed.

    Args:
        path: the file that could not be written.
        needed: its size in bytes, when known.
    """

    def __init__(self, path: str | Path, needed: int | None = None) -> None:
        path = Path(path)
        folder = path.parent
        try:
            free = f"{shutil.disk_usage(folder).free / 1e6:.0f} MB free"
        except OSError:
            free = "free space unknown"
        need = f", it needs about {needed / 1e6:.0f} MB" if needed else ""
        self.path = str(folder)
        super().__init__(
            f"{folder}: the disk is full: {path.name} could not be written ({free}{need}); "
            "free space there or choose another --out (earlier files are intact), then run the "
            "command again (a training: with --resume)"
        )


def is_disk_full(exc: BaseException, path: str | Path | None = None, needed: int | None = None):
    """Whether ``exc`` means the disk (or quota) is full.

    An ``OSError`` says so by its errno; torch's checkpoint writer only raises a ``RuntimeError``
    (``unexpected pos``), so that counts when the folder of ``path`` has less free space than the
    ``needed`` bytes.
    """
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, RuntimeError) and path is not None and needed:
        if "No space left" in str(exc):
            return True
        try:
            return shutil.disk_usage(Path(path).parent).free < needed
        except OSError:
            return False
    return False
