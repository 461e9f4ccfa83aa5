"""Atomic file writes: nothing is ever left half-written under its final name."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from histo_wsl.errors import DiskFullError, InputError, is_disk_full

__all__ = ["shared_mode", "atomic_path", "write_text", "write_json", "ensure_writable_dir"]


def shared_mode(path: str | Path) -> None:
    """Give ``path`` the mode a new file (or folder) gets under the umask.

    Temporary files are created owner-only (0600); an output moved into place keeps that mode, so
    colleagues and viewer services on a shared lab disk could not read it. Under ``umask 022`` files
    become 0644 and folders 0755, as any other tool writes them.
    """
    path = Path(path)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~_umask())


def _umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux).

    Setting it to 0 and back, the only portable way, would for that instant let another thread
    create world-writable files.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def atomic_path(path: str | Path, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``.

    The temporary name keeps the suffix, so writers that choose a format by suffix still work.
    On an exception the temporary file is removed and ``path`` is left as it was; a full disk is
    raised as :class:`~histo_wsl.errors.DiskFullError` (one line: the folder, the free space and,
    given ``needed`` bytes, what the file needs).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        shared_mode(tmp_path)
        os.replace(tmp_path, path)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if is_disk_full(exc, path, needed):
            raise DiskFullError(path, needed) from None
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: object) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def ensure_writable_dir(path: str | Path, option: str = "--out") -> Path:
    """Create the output folder ``path`` and check that a file can be written in it.

    Called before any work, so that a read-only disk or a file where a folder is expected stops a
    command at once instead of after a training or an evaluation.

    Raises:
        InputError: the folder cannot be created or written (names ``option``, the fix).
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(
            f"the output folder cannot be written ({exc.strerror or exc}); choose another "
            f"{option} or fix its permissions",
            path,
        ) from exc
    return path
