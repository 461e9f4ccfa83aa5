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
from histo_wsl.runtime.console import print_line
from histo_wsl.runtime.inputs import InputItem
from histo_wsl.runtime.record import RunRecord, now

__all__ = [
    "STAGING",
    "LOCKS",
    "BatchOptions",
    "BatchRunner",
    "ItemResult",
    "Progress",
    "RunSummary",
]

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

    @property
    def records(self) -> dict[str, dict]:
        """Each finished item's record by name (what the command wrote in its JSON)."""
        return {it.name: it.as_dict() for it in self.items if it.status == "done"}

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


@dataclass(frozen=True)
class BatchOptions:
    """How a batch command treats its items: the options every batch command shares.

    Attributes:
        overwrite: redo finished items (their old outputs stay until the new ones are complete).
        skip_errors: record failures and go on (exit code 1) instead of stopping (exit code 2, a
            fault such as a full disk 3 and stopping even so, an internal error 4).
        shard: (K, N) when this process runs one shard; recorded, and names the run file.
        quiet: no progress bar.
        argv: the command line recorded in run.json (default: ``sys.argv``).
    """

    overwrite: bool = False
    skip_errors: bool = False
    shard: tuple[int, int] | None = None
    quiet: bool = False
    argv: tuple[str, ...] | None = None

    @property
    def run_file_name(self) -> str:
        """``run.json``, or ``run.shard-K-of-N.json`` for one shard of a run."""
        if self.shard is None:
            return "run.json"
        return f"run.shard-{self.shard[0]}-of-{self.shard[1]}.json"


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
        options: overwrite, skip errors, shard, quiet, the command line (:class:`BatchOptions`).
        seed: the run's random seed, recorded.
        device: the compute device, recorded (``cpu``, ``cuda``...).
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        command: str,
        params: dict,
        marker: Callable[[str], str],
        options: BatchOptions | None = None,
        seed: int | None = None,
        device: str = "cpu",
    ) -> None:
        self.out_dir = Path(out_dir)
        self.command = command
        self.params = params
        self.marker = marker
        self.options = options or BatchOptions()
        self.seed = seed
        self.device = device
        self.run_file = self.out_dir / self.options.run_file_name

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
    def run(self, items: Sequence[InputItem], process: ProcessFn) -> RunSummary:
        """Process ``items`` in order; returns the summary (its exit code is the command's).

        ``run.json`` is rewritten after every item, so a killed run leaves a record of what it did.
        """
        self.prepare()
        t0 = time.perf_counter()
        log = _RunLog(self._record())
        bar = _Bar(self.command, len(items), self.options.quiet)
        try:
            for item in items:
                lock, reason = self._claim(item)
                if lock is None:
                    log.results.append(
                        ItemResult(item.name, str(item.path), "skipped", details={"reason": reason})
                    )
                    bar.advance()
                    continue
                try:
                    result, stop_code = self._process_one(item, process, bar)
                finally:
                    lock.release()
                log.results.append(result)
                if stop_code is not None:
                    log.exit_code = stop_code
                    log.save(ended=True)
                    break
                if result.status == "failed":
                    log.exit_code = EXIT_SOME_FAILED
                log.save(ended=False)
                bar.item_done()
            else:
                log.save(ended=True)
        finally:
            bar.stop()
            staging = self.out_dir / STAGING
            if staging.exists() and not any(staging.iterdir()):
                with contextlib.suppress(OSError):  # another run may have staged an item since
                    staging.rmdir()
        seconds = time.perf_counter() - t0
        return RunSummary(self.out_dir, self.run_file, log.results, log.exit_code, seconds)

    def _record(self) -> RunRecord:
        """The run's run.json (the shard's own file when this process runs one shard)."""
        opts = self.options
        return RunRecord(
            self.run_file,
            self.command,
            params=self.params,
            argv=opts.argv,
            seed=self.seed,
            device=self.device,
            shard=None if opts.shard is None else f"{opts.shard[0]}/{opts.shard[1]}",
        )

    def _claim(self, item: InputItem) -> tuple[Any, str]:
        """The item's lock, held; or None and why the item is skipped."""
        overwrite = self.options.overwrite
        if not overwrite and self.is_done(item.name):
            return None, "finished in an earlier run"
        lock = self._lock(item.name)
        if lock is None:  # another live run is on it: leave it to that run
            held = self.out_dir / LOCKS / f"{item.name}.lock"
            reason = f"another run is processing it (lock {held}); rerun when it ends"
            print_line(f"skipped: {item.path}: {reason}")
            return None, reason
        if not overwrite and self.is_done(item.name):  # finished while we waited
            lock.release()
            return None, "finished by another run"
        return lock, ""

    def _process_one(
        self, item: InputItem, process: ProcessFn, bar: _Bar
    ) -> tuple[ItemResult, int | None]:
        """Process and commit one item; returns its result and, when the run must stop, the code.

        A failure is recorded, never silent: an expected error (a bad input, a fault) by its one
        line, anything else as an internal error with its traceback in run.json.
        """
        t_item = time.perf_counter()
        try:
            stage = self._stage(item.name)
            details = process(item, stage, bar.progress)
            result = ItemResult(
                item.name, str(item.path), "done", time.perf_counter() - t_item, details=details
            )
            record = dict(result.as_dict(), command=self.command, seed=self.seed, finished=now())
            self._commit(item.name, stage, record)
            return result, None
        except Exception as exc:
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
            seconds = time.perf_counter() - t_item
            result = ItemResult(item.name, str(item.path), "failed", seconds, message, details)
            bar.error(message)
            fault = isinstance(exc, FaultError)  # a full disk fails every item after
            if not self.options.skip_errors or fault:
                return result, exc.exit_code if expected else EXIT_INTERNAL
            return result, None


class _RunLog:
    """The items' results and the exit code so far, saved in run.json after each item."""

    def __init__(self, record: RunRecord) -> None:
        self.record = record
        self.results: list[ItemResult] = []
        self.exit_code = 0

    def save(self, *, ended: bool) -> None:
        """Write run.json (``ended``: the run is over)."""
        self.record.write(
            ended=ended,
            items=[r.as_dict() for r in self.results],
            exit_code=self.exit_code,
        )


class _Bar:
    """The run's progress bar on stderr (the run, and the current item's own progress)."""

    def __init__(self, command: str, total: int, quiet: bool) -> None:
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

        self.rich = None
        if quiet:
            self.progress = Progress(None, None)
            return
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self.rich = RichProgress(*columns, console=stderr_console(), transient=False)
        self.overall = self.rich.add_task(command, total=total)
        self.current = self.rich.add_task("", total=None, visible=False)
        self.progress = Progress(self.rich, self.current)
        self.rich.start()

    def advance(self) -> None:
        """One more item accounted for (skipped)."""
        if self.rich is not None:
            self.rich.advance(self.overall)

    def item_done(self) -> None:
        """The current item is finished (done or failed): hide its own bar, advance the run's."""
        if self.rich is not None:
            self.rich.update(self.current, visible=False)
            self.rich.advance(self.overall)

    def error(self, message: str) -> None:
        """An item's error, one line on stderr (above the bar when there is one)."""
        if self.rich is not None:
            self.rich.console.print(
                f"[red]error:[/red] {message}", markup=True, highlight=False, soft_wrap=True
            )
        else:
            print_line(f"error: {message}")

    def stop(self) -> None:
        """Leave the bar as it ends."""
        if self.rich is not None:
            self.rich.stop()
