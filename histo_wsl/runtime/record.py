"""What every command records about its run: the time, the machine and versions, JSON-ready values.

``run.json`` of every command (training, the batch commands, evaluate) and the ``metrics.json`` of
evaluate take their timestamps from :func:`now`, the machine from :func:`environment` (and
:func:`versions`, which adds the packages the metrics and plots depend on), and pass their values
through :func:`json_ready` (NaN and infinities become null, numpy values plain Python).
"""

from __future__ import annotations

import math
import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from histo_wsl import __version__

__all__ = ["environment", "json_ready", "now", "number_or_none", "processor_name", "versions"]

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


def environment() -> dict:
    """Versions, platform, host, processor model and CPU count of this run's machine.

    Versions of Python, histo-wsl and its main dependencies are read from metadata, not imported.
    """
    versions = {"python": platform.python_version(), "histo-wsl": __version__}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
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
        try:
            env["versions"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env["versions"][name] = None
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
