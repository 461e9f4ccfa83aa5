"""The batch runner every slide command shares.

It owns the behaviour users rely on in long runs: finished items are skipped on a rerun (unless
``--overwrite``), each item's outputs are written in a staging folder and moved into place only when
complete (a killed run never leaves a partial item that looks finished), ``--skip-errors`` records a
failing item and goes on, ``--shard K/N`` is applied by the caller through
:mod:`histo_wsl.runtime.inputs`, one
progress bar shows the run with its ETA, and ``run.json`` records the command, parameters, versions,
seed and each item's status and timings.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histo_wsl.errors import (
    EXIT_INTERNAL,
    EXIT_SOME_FAILED,
    DiskFullError,
    FaultError,
    HistoWSLError,
    is_disk_full,
)
from histo_wsl.runtime import atomic
from histo_wsl.runtime.inputs import InputItem
from histo_wsl.runtime.record import environment, now

#: Folder (inside the output folder) where items are assembled before they are moved into place.
STAGING = ".histo-wsl-partial"
#: folder (in the output folder) of the per-item lock files that keep concurrent runs apart
LOCKS = ".histo-wsl-locks"


class Progress:
    """Progress of the item being processed; the runner draws it (or nothing when quiet)."""

    def __init__(self, bar: object | None, task: object | None) -> None:
        self._bar = bar
        self._task = task

    def start(self, total: int, description: str) -> None:
        """Announce ``total`` units of work for the current item."""
        if self._bar is not None:
            self._bar.update(
                self._task, total=total, completed=0, description=description, visible=True
            )

    def advance(self, n: int = 1) -> None:
        """Mark ``n`` more units of the current item done."""
        if self._bar is not None:
            self._bar.update(self._task, advance=n)


@dataclass
class ItemResult:
    """What happened to one input item."""

    name: str
    path: str
    status: str  # done | skipped | failed
    seconds: float = 0.0
    error: str | None = None
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-ready record (as stored in run.json)."""
        out = {
            "name": self.name,
            "path": self.path,
            "status": self.status,
            "seconds": round(self.seconds, 3),
        }
        if self.error:
            out["error"] = self.error
        out.update(self.details)
        return out


@dataclass
class RunSummary:
    """The outcome of a batch run."""

    out_dir: Path
    run_file: Path
    items: list[ItemResult]
    exit_code: int
    seconds: float

    @property
    def counts(self) -> dict[str, int]:
        """Number of items per status."""
        counts = {"done": 0, "skipped": 0, "failed": 0}
        for item in self.items:
            counts[item.status] = counts.get(item.status, 0) + 1
        return counts

    def skipped_phrase(self) -> str:
        """``N skipped (...)``: how many items were skipped and why, for the closing line."""
        held = sum(
            1
            for it in self.items
            if it.status == "skipped" and "another run" in str(it.details.get("reason", ""))
        )
        n = self.counts["skipped"]
        if not held:
            return f"{n} skipped (finished earlier)"
        return f"{n} skipped ({n - held} finished earlier, {held} held by another run)"

    def as_dict(self) -> dict:
        """JSON-ready summary (what ``--json`` prints)."""
        return {
            "out": str(self.out_dir),
            "run_file": str(self.run_file),
            "exit_code": self.exit_code,
            "seconds": round(self.seconds, 3),
            "counts": self.counts,
            "items": [it.as_dict() for it in self.items],
        }


#: process(item, staging folder, progress) -> details recorded for the item.
ProcessFn = Callable[[InputItem, Path, Progress], dict]


class BatchRunner:
    """Run one command over many items with resume, staging, error policy and run.json.

    Args:
        out_dir: the output folder (created if needed).
        command: the subcommand name, e.g. ``extract-patches``.
        params: the resolved parameters, recorded in run.json.
        marker: maps an item name to the path (relative to ``out_dir``) of its completion record;
            an item is finished when that JSON file exists with ``"status": "done"``.
        overwrite: redo finished items (their old outputs stay until the new ones are complete).
        skip_errors: record failures and go on (exit code 1) instead of stopping (exit code 2, a
            fault such as a full disk 3 and stopping even so, an internal error 4).
        shard: (K, N) when this process runs one shard; recorded, and names the run file.
        seed: the run's random seed, recorded.
        quiet: no progress bar.
        device: the compute device, recorded (``cpu``, ``cuda``...).
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        command: str,
        params: dict,
        marker: Callable[[str], str],
        overwrite: bool = False,
        skip_errors: bool = False,
        shard: tuple[int, int] | None = None,
        seed: int | None = None,
        quiet: bool = False,
        device: str = "cpu",
    ) -> None:
        self.out_dir = Path(out_dir)
        self.command = command
        self.params = params
        self.marker = marker
        self.overwrite = overwrite
        self.skip_errors = skip_errors
        self.shard = shard
        self.seed = seed
        self.quiet = quiet
        self.device = device
        name = "run.json" if shard is None else f"run.shard-{shard[0]}-of-{shard[1]}.json"
        self.run_file = self.out_dir / name

    # -- output folder -----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the output folder and check that it is writable.

        Raises:
            InputError: the folder cannot be created or written.
        """
        atomic.ensure_writable_dir(self.out_dir)

    def is_done(self, name: str) -> bool:
        """Whether ``name`` finished in an earlier run."""
        record = self.out_dir / self.marker(name)
        try:
            return json.loads(record.read_text(encoding="utf-8")).get("status") == "done"
        except (OSError, ValueError, AttributeError):
            return False

    def _lock(self, name: str) -> Any:
        """The item's lock (``filelock``), held; None when another live process holds it.

        The lock is the operating system's (``flock``): a run that dies releases it, so a lock
        file left by a killed run is simply taken over.
        """
        from filelock import FileLock, Timeout

        folder = self.out_dir / LOCKS
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(folder / f"{name}.lock", timeout=0)
        try:
            lock.acquire()
        except Timeout:
            return None
        return lock

    def _stage(self, name: str) -> Path:
        stage = self.out_dir / STAGING / name
        if stage.exists():  # left by a killed run
            shutil.rmtree(stage)
        stage.mkdir(parents=True)
        return stage

    def _commit(self, name: str, stage: Path, record: dict) -> None:
        """Move staged outputs into place, then write the completion record last."""
        marker = self.out_dir / self.marker(name)
        trash = self.out_dir / STAGING / f"{name}.old"
        if trash.exists():
            shutil.rmtree(trash)
        trash.mkdir(parents=True)
        if marker.exists():  # an overwrite: the old item stops counting as done first
            marker.unlink()
        for entry in sorted(stage.iterdir()):
            target = self.out_dir / entry.name
            if target.exists() or target.is_symlink():
                os.replace(target, trash / entry.name)
            os.replace(entry, target)
        atomic.write_json(marker, record)
        shutil.rmtree(trash, ignore_errors=True)
        shutil.rmtree(stage, ignore_errors=True)

    # -- running ----------------------------------------------------------------------------------
    def run(
        self, items: Sequence[InputItem], process: ProcessFn, argv: Sequence[str] | None = None
    ) -> RunSummary:
        """Process ``items`` in order; returns the summary (its exit code is the command's)."""
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        from histo_wsl.runtime.console import stderr_console

        self.prepare()
        started, t0 = now(), time.perf_counter()
        results: list[ItemResult] = []
        header = {
            "tool": "histo-wsl",
            "command": self.command,
            "argv": list(argv if argv is not None else sys.argv),
            "cwd": os.getcwd(),
            "params": self.params,
            "seed": self.seed,
            "shard": None if self.shard is None else f"{self.shard[0]}/{self.shard[1]}",
            "device": self.device,
            "started": started,
            **environment(),
        }
        exit_code = 0

        def save(ended: str | None) -> None:
            record = dict(
                header,
                ended=ended,
                seconds=round(time.perf_counter() - t0, 3),
                items=[r.as_dict() for r in results],
                exit_code=exit_code,
            )
            atomic.write_json(self.run_file, record)

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        bar = (
            None
            if self.quiet
            else RichProgress(*columns, console=stderr_console(), transient=False)
        )
        overall = bar.add_task(f"{self.command}", total=len(items)) if bar else None
        current = bar.add_task("", total=None, visible=False) if bar else None
        progress = Progress(bar, current)
        if bar:
            bar.start()
        try:
            for item in items:

                def skip(reason: str, item: InputItem = item) -> None:
                    results.append(
                        ItemResult(item.name, str(item.path), "skipped", details={"reason": reason})
                    )
                    if bar:
                        bar.advance(overall)

                if not self.overwrite and self.is_done(item.name):
                    skip("finished in an earlier run")
                    continue
                lock = self._lock(item.name)
                if lock is None:  # another live run is on it: leave it to that run
                    held = self.out_dir / LOCKS / f"{item.name}.lock"
                    reason = f"another run is processing it (lock {held}); rerun when it ends"
                    stderr_console().print(
                        f"skipped: {item.path}: {reason}",
                        markup=False,
                        highlight=False,
                        soft_wrap=True,
                    )
                    skip(reason)
                    continue
                if not self.overwrite and self.is_done(item.name):  # finished while we waited
                    lock.release()
                    skip("finished by another run")
                    continue
                t_item = time.perf_counter()
                try:
                    stage = self._stage(item.name)
                    details = process(item, stage, progress)
                    result = ItemResult(
                        item.name,
                        str(item.path),
                        "done",
                        time.perf_counter() - t_item,
                        details=details,
                    )
                    self._commit(
                        item.name,
                        stage,
                        dict(
                            result.as_dict(), command=self.command, seed=self.seed, finished=now()
                        ),
                    )
                except Exception as exc:  # one item's failure is recorded, never silent
                    shutil.rmtree(self.out_dir / STAGING / item.name, ignore_errors=True)
                    if not isinstance(exc, HistoWSLError) and is_disk_full(exc):
                        exc = DiskFullError(Path(getattr(exc, "filename", None) or self.out_dir))
                    expected = isinstance(exc, HistoWSLError)
                    message = (
                        str(exc)
                        if expected
                        else f"{item.path}: internal error {type(exc).__name__}: {exc} (a bug: "
                        f"the traceback is in {self.run_file}; please report it)"
                    )
                    details = {} if expected else {"traceback": traceback.format_exc()}
                    results.append(
                        ItemResult(
                            item.name,
                            str(item.path),
                            "failed",
                            time.perf_counter() - t_item,
                            message,
                            details,
                        )
                    )
                    if bar:
                        bar.console.print(
                            f"[red]error:[/red] {message}",
                            markup=True,
                            highlight=False,
                            soft_wrap=True,
                        )
                    else:
                        stderr_console().print(
                            f"error: {message}", markup=False, highlight=False, soft_wrap=True
                        )
                    fault = isinstance(exc, FaultError)  # a full disk fails every item after
                    if not self.skip_errors or fault:
                        exit_code = exc.exit_code if expected else EXIT_INTERNAL
                        save(now())
                        break
                    exit_code = EXIT_SOME_FAILED
                else:
                    results.append(result)
                finally:
                    lock.release()
                save(None)
                if bar:
                    bar.update(current, visible=False)
                    bar.advance(overall)
            else:
                save(now())
        finally:
            if bar:
                bar.stop()
            staging = self.out_dir / STAGING
            if staging.exists() and not any(staging.iterdir()):
                with contextlib.suppress(OSError):  # another run may have staged an item since
                    staging.rmdir()
        return RunSummary(self.out_dir, self.run_file, results, exit_code, time.perf_counter() - t0)
