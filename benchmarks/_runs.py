"""Helpers the recipe scripts share: resumable ``histo-wsl`` training runs and evaluations.

A run folder is *finished* when its ``run.json`` says ``status: done`` for at least the requested
epochs; it is *resumable* when it has a ``last.pt`` (then ``--resume --epochs N`` continues it, the
only options ``--resume`` accepts besides ``--workers``/``--device``); otherwise it starts afresh.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
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
    from histo_wsl.registry.checkpoint import load_checkpoint

    return dict(load_checkpoint(checkpoint).get("card", {}))


def resolve_data(data: str | None) -> Path:
    """``--data`` as given, or GlaS next to the repository (whatever the working directory)."""
    return Path(data).expanduser() if data else DEFAULT_GLAS


def run_evaluation(
    cmd: list[str],
    out: Path,
    checkpoints: list[Path],
    log: Path,
    dry_run: bool,
    ran: list[str],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``histo-wsl evaluate`` into ``out``, or reuse it when newer than every checkpoint.

    Returns:
        (the step's status, seconds and exit code; the metrics.json read back, {} when none).
    """
    metrics_path = out / "metrics.json"
    fresh = (
        not dry_run
        and metrics_path.is_file()
        and all(c.is_file() for c in checkpoints)
        and metrics_path.stat().st_mtime > max(c.stat().st_mtime for c in checkpoints)
    )
    if fresh:
        done = json.loads(metrics_path.read_text(encoding="utf-8"))
        step = {"status": "reused", "seconds": done.get("seconds"), "exit_code": 0}
    else:
        ran.append(shlex.join(cmd))
        print(f"[{out.name}] {shlex.join(cmd)}", file=sys.stderr)
        if dry_run:
            return {"status": "planned", "seconds": None, "exit_code": 0}, {}
        shutil.rmtree(out, ignore_errors=True)
        code, seconds = run_logged(cmd, log)
        step = {
            "status": "done" if code == 0 else f"failed (exit {code}; see {log})",
            "seconds": round(seconds, 1),
            "exit_code": code,
        }
        if code != 0:
            return step, {}
    return step, json.loads(metrics_path.read_text(encoding="utf-8"))


def run_training(
    command: str,
    data: str,
    out: Path,
    options: dict[str, Any],
    runtime: dict[str, Any],
    log: Path,
    dry_run: bool,
    ran: list[str],
) -> dict[str, Any]:
    """Run (or reuse, or resume) one ``histo-wsl`` training run; returns its status and seconds."""
    opts = dict(options)
    epochs = int(opts.pop("epochs"))
    state = run_state(out, epochs)
    if state == "done":
        return {"status": "reused", "seconds": best_of(out)["seconds"], "exit_code": 0}
    cmd = train_command(command, data, out, epochs, opts, runtime, state)
    ran.append(shlex.join(cmd))
    print(f"[{out.name}] {state}: {shlex.join(cmd)}", file=sys.stderr)
    if dry_run:
        return {"status": "planned", "seconds": None, "exit_code": 0}
    code, seconds = run_logged(cmd, log)
    status = "done" if code == 0 else f"failed (exit {code}; see {log})"
    return {"status": status, "seconds": round(seconds, 1), "exit_code": code}


def add_recipe_options(p: argparse.ArgumentParser, recipes: list[str], name: str) -> None:
    """The options every GlaS recipe script takes (``name``: the default run folder's stem)."""
    p.add_argument("--recipe", choices=recipes, default="cpu")
    p.add_argument("--data", help="GlaS folder (default: ../shared/data/glas next to the repo).")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument(
        "--out", help=f"Run folder (default: runs/{name}-<recipe>[-smoke] in the working dir)."
    )
    p.add_argument("--workers", type=int, default=2, help="Data-loader processes.")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps.")
    p.add_argument("--smoke", action="store_true", help="1 epoch of 1 step per stage.")
    p.add_argument("--overwrite", action="store_true", help="Start over in --out.")
    p.add_argument(
        "--skip-missing", action="store_true", help="Exit 0 with a message when GlaS is absent."
    )
    p.add_argument("--dry-run", action="store_true", help="Print the commands; run nothing.")


def missing_glas(data: Path, skip_missing: bool) -> int | None:
    """None when ``data`` is a GlaS folder; else says so and returns the exit status (2, or 0)."""
    if (data / "splits").is_dir() and (data / "train").is_dir():
        return None
    reason = f"GlaS not found: {data} (needs train/ and splits/; give --data)"
    if skip_missing:
        print(f"skipped: {reason}", file=sys.stderr)
        print(json.dumps({"status": "skipped", "reason": reason}))
        return 0
    print(f"error: {reason}", file=sys.stderr)
    return 2


def fresh_glas_run(
    data: str | None, skip_missing: bool, out: str | Path
) -> tuple[Path, Path] | int:
    """(GlaS folder, an emptied ``out``) for a benchmark that starts over.

    Returns the exit code instead when GlaS is missing (:func:`missing_glas`).
    """
    folder = resolve_data(data)
    code = missing_glas(folder, skip_missing)
    if code is not None:
        return code
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    return folder, out


def open_run_folder(
    out: Path, settings: dict[str, Any], subfolders: list[str], overwrite: bool, dry_run: bool
) -> bool:
    """Record ``settings`` in ``out/recipe.json``; False when ``out`` holds other settings.

    With ``overwrite`` the ``subfolders`` and the record are removed first (not in a dry run).
    """
    record = out / "recipe.json"
    if overwrite and not dry_run:
        for sub in subfolders:
            shutil.rmtree(out / sub, ignore_errors=True)
        record.unlink(missing_ok=True)
    if record.is_file():
        if json.loads(record.read_text(encoding="utf-8")) != settings:
            print(
                f"error: {out} holds a run with other settings ({record}); use --overwrite or "
                "another --out",
                file=sys.stderr,
            )
            return False
    elif not dry_run:
        out.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return True


def eval_numbers(model: dict[str, Any]) -> dict[str, Any]:
    """PxAP, F1+ / F1− (in %), accuracy and error of one model of an evaluate metrics.json."""
    loc = model.get("localization") or {}
    f1 = loc.get("f1") or {}
    cls = model.get("classification") or {}

    def pct(entry: dict | None) -> float | None:
        value = (entry or {}).get("value")
        return None if value is None else round(100.0 * value, 2)

    return {
        "pxap": round(loc["pxap"]["value"], 2) if loc.get("pxap") else None,
        "f1_pos": pct(f1.get("f1_pos")),
        "f1_neg": pct(f1.get("f1_neg")),
        "accuracy": (cls.get("accuracy") or {}).get("value"),
        "error": (cls.get("error") or {}).get("value"),
    }
