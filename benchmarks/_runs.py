"""Helpers the NEGEV recipe scripts share: resumable ``histo-wsl`` training runs in child processes.

A run folder is *finished* when its ``run.json`` says ``status: done`` for at least the requested
epochs; it is *resumable* when it has a ``last.pt`` (then ``--resume --epochs N`` continues it, the
only options ``--resume`` accepts besides ``--workers``/``--device``); otherwise it starts afresh.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: the repository root (``../shared`` is next to it)
ROOT = Path(__file__).resolve().parents[1]
#: GlaS as the project's machines hold it
DEFAULT_GLAS = ROOT.parent / "shared" / "data" / "glas"


def flags(options: dict[str, Any]) -> list[str]:
    """``{"batch-size": 16, "amp": True}`` -> ``["--batch-size", "16", "--amp"]``.

    ``True`` gives ``--name``, ``False`` gives ``--no-name``, ``None`` is left out; keys may use
    ``_`` or ``-``.
    """
    out: list[str] = []
    for key, value in options.items():
        name = "--" + key.replace("_", "-")
        if value is None:
            continue
        if value is True:
            out.append(name)
        elif value is False:
            out.append("--no-" + name[2:])
        else:
            out += [name, str(value)]
    return out


def run_state(out: Path, epochs: int) -> str:
    """``done`` (finished with >= ``epochs``), ``resume`` (has last.pt) or ``new``."""
    record = out / "run.json"
    if record.is_file():
        try:
            run = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            run = {}
        if run.get("status") == "done" and int(run.get("summary", {}).get("epochs", 0)) >= epochs:
            return "done"
    return "resume" if (out / "last.pt").is_file() else "new"


def histo_wsl(*args: str) -> list[str]:
    """The command line of ``histo-wsl ARGS`` with this interpreter (no PATH lookup)."""
    return [sys.executable, "-m", "histo_wsl", *args]


def train_command(
    command: str,
    data: str,
    out: Path,
    epochs: int,
    options: dict[str, Any],
    runtime: dict[str, Any],
    state: str,
) -> list[str]:
    """The ``train-classifier``/``train-decoder`` command for a run folder in ``state``.

    Args:
        command: ``train-classifier`` or ``train-decoder``.
        data: the data argument.
        out: the run folder.
        epochs: the epochs wanted.
        options: training settings (a fresh run only; ``--resume`` keeps the run's own).
        runtime: ``workers``/``device``, given to fresh and resumed runs alike.
        state: from :func:`run_state` (``new`` or ``resume``).
    """
    base = [command, data, "--out", str(out), "--epochs", str(epochs), "--quiet"]
    if state == "resume":
        return histo_wsl(*base, "--resume", *flags(runtime))
    return histo_wsl(*base, *flags(options), *flags(runtime))


def run_logged(cmd: list[str], log: Path) -> tuple[int, float]:
    """Run ``cmd`` with stdout+stderr appended to ``log``; returns (exit code, seconds)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    return code, time.perf_counter() - t0


def best_of(out: Path, key: str = "valpx_pxap") -> dict[str, Any]:
    """Best ``key`` of a run folder's summary.csv (ties: the later epoch) and its total seconds."""
    path = out / "summary.csv"
    best: float | None = None
    epoch: int | None = None
    seconds = 0.0
    epochs = 0
    if not path.is_file():
        return {"value": None, "epoch": None, "seconds": None, "epochs": None}
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            seconds += float(row.get("seconds") or 0.0)
            epochs = max(epochs, int(row["epoch"]))
            try:
                value = float(row.get(key) or "nan")
            except ValueError:
                continue
            if value == value and (best is None or value >= best):
                best, epoch = value, int(row["epoch"])
    return {"value": best, "epoch": epoch, "seconds": round(seconds, 1), "epochs": epochs}


def card_of(checkpoint: Path) -> dict[str, Any]:
    """The model card of a histo-wsl checkpoint (weights-only load)."""
    from histo_wsl.checkpoint import load_checkpoint

    return dict(load_checkpoint(checkpoint).get("card", {}))


def resolve_data(data: str | None) -> Path:
    """``--data`` as given, or GlaS next to the repository (whatever the working directory)."""
    return Path(data).expanduser() if data else DEFAULT_GLAS
