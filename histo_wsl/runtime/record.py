"""What every command records about its run: run.json, the time, the machine, JSON-ready values.

Every command writes its ``run.json`` through one :class:`RunRecord` (training, the batch commands,
evaluate on images and on slides), so they share one shape. Its timestamps come from :func:`now`,
the machine from :func:`environment` (evaluate's from :func:`versions`, which adds the packages the
metrics and plots depend on); ``metrics.json`` of evaluate takes the same header, and its values
pass through :func:`json_ready` (NaN and infinities become null, numpy values plain Python).
"""

from __future__ import annotations

import functools
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from histo_wsl import __version__
from histo_wsl.runtime.atomic import write_json

__all__ = [
    "RunRecord",
    "environment",
    "json_ready",
    "now",
    "number_or_none",
    "processor_name",
    "versions",
]

_PACKAGES = (
    "numpy",
    "pillow",
    "openslide-python",
    "openslide-bin",
    "tifffile",
    "opencv-python-headless",
    "torch",
    "torchvision",
    "typer",
    "rich",
)


def processor_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """The CPU's model name (Linux ``/proc/cpuinfo``; else :func:`platform.processor`, or None).

    Recorded because the same seeded CPU training gave other numbers on another machine with the
    same torch: a later run can then tell whether it ran on the same kind of processor.
    """
    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or None


@functools.lru_cache(maxsize=64)
def package_version(name: str) -> str | None:
    """An installed package's version from its metadata (None when absent); read once per process.

    A lookup scans the installed distributions: the ten of a run record took 13 ms here, and a
    run writes its record more than once.
    """
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Versions, platform, host, processor model and CPU count of this run's machine.

    Versions of Python, histo-wsl and its main dependencies are read from metadata, not imported.
    """
    versions = {"python": platform.python_version(), "histo-wsl": __version__}
    for name in _PACKAGES:
        versions[name] = package_version(name)
    return {
        "versions": versions,
        "platform": platform.platform(),
        "host": platform.node(),
        "processor": processor_name(),
        "cpu_count": os.cpu_count(),
    }


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def number_or_none(v: Any) -> float | None:
    """``v`` as a float, or None when it is NaN or infinite (JSON has no such numbers)."""
    v = float(v)
    return None if not math.isfinite(v) else v


def versions() -> dict:
    """Versions of Python, histo-wsl and the packages the numbers and plots depend on."""
    env = environment()
    for name in ("matplotlib", "defusedxml", "scikit-learn"):
        env["versions"][name] = package_version(name)
    return env


def json_ready(obj: Any) -> Any:
    """JSON-ready: NaN/inf -> null, numpy scalars/arrays -> Python, paths -> str."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return number_or_none(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


class RunRecord:
    """A command's ``run.json``, in the one shape every command writes.

    First what ran and where: ``tool``, ``command``, ``argv``, ``cwd``, ``params``, ``seed``,
    ``device``, what the command adds to that (``shard``, ``world_size``), ``started`` and the
    machine (``versions``, ``platform``, ``host``, ``processor``, ``cpu_count``); then, at each
    :meth:`write`, what the command reports (``items``, ``outputs``, ``summary``, ``status``...),
    ``ended`` (null while the run goes on), ``seconds`` and ``exit_code``. Written atomically.

    Args:
        path: the run.json file.
        command: the subcommand (``extract-patches``, ``train-decoder``...).
        params: the resolved parameters.
        argv: the command line (default: ``sys.argv``).
        seed: the run's random seed.
        device: the compute device, when known (``note(device=...)`` sets it later).
        machine: the machine's record (default :func:`environment`).
        **extra: more fields of the header.
    """

    def __init__(
        self,
        path: Path,
        command: str,
        *,
        params: Any,
        argv: list[str] | tuple[str, ...] | None = None,
        seed: int | None = None,
        device: str | None = None,
        machine: dict | None = None,
        **extra: Any,
    ) -> None:
        self.path = Path(path)
        self.t0 = time.perf_counter()
        self.header: dict[str, Any] = {
            "tool": "histo-wsl",
            "command": command,
            "argv": list(argv if argv is not None else sys.argv),
            "cwd": os.getcwd(),
            "params": params,
            "seed": seed,
            "device": device,
            **extra,
            "started": now(),
            **(machine if machine is not None else environment()),
        }

    def note(self, **fields: Any) -> None:
        """Set header fields learnt after the start (e.g. the device once the model is loaded)."""
        self.header.update(fields)

    def seconds(self) -> float:
        """Seconds since the run started."""
        return round(time.perf_counter() - self.t0, 3)

    def write(self, *, ended: bool, exit_code: int = 0, **fields: Any) -> dict:
        """Write run.json: the header, ``fields``, then the end (None while the run goes on)."""
        record = {
            **self.header,
            **fields,
            "ended": now() if ended else None,
            "seconds": self.seconds(),
            "exit_code": exit_code,
        }
        write_json(self.path, record)
        return record
