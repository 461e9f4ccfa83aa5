"""How many CPU threads the model's forward gets: the cores other processes leave free.

PyTorch starts one compute thread per core, and every parallel region waits for its slowest
thread. When another process holds one of two cores, the thread that shares its core is
descheduled half the time and the whole forward waits for it: on a 2-core VM beside one busy
process, a 2-thread forward ran at two thirds of a 1-thread forward (docs/results.md, *Localize
speed*). :class:`ThreadGovernor` therefore sets ``torch.set_num_threads`` to the cores that are
not busy with other processes, measured from ``/proc/stat`` (all cores' busy time) minus this
process's own CPU time over the same interval, and measures again every :data:`RECHECK_SECONDS`
while a slide is processed, so a job that starts or ends beside a long slide is followed.
Where ``/proc/stat`` is missing (macOS, Windows) the 1-minute load average stands in for it.

A fixed ``--threads N`` (or ``OMP_NUM_THREADS`` in the environment, which PyTorch reads itself)
switches the governor off.

:func:`shorten_openmp_spin` is the other half: how long the forward's idle OpenMP threads keep a
core after a forward ends, before the windows of the next batch are read.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

__all__ = [
    "OPENMP_SPINCOUNT",
    "RECHECK_SECONDS",
    "ThreadGovernor",
    "openmp_spin_record",
    "shorten_openmp_spin",
    "usable_cores",
]

#: seconds between two measurements of the other processes' load
RECHECK_SECONDS = 5.0
#: seconds before the first measurement
FIRST_CHECK_SECONDS = 0.5


#: ``GOMP_SPINCOUNT`` set by :func:`shorten_openmp_spin`: busy-wait iterations of an idle OpenMP
#: thread before it sleeps (libgomp's default, 300,000, is several milliseconds on current CPUs)
OPENMP_SPINCOUNT = 10_000


def shorten_openmp_spin(spincount: int = OPENMP_SPINCOUNT) -> bool:
    """Let the forward's idle OpenMP threads sleep soon after a forward, before torch loads.

    PyTorch's CPU wheels run their parallel regions on GNU OpenMP, whose worker threads busy-wait
    about 300,000 iterations for the next region before they sleep: several milliseconds, long
    after the forward of a batch has ended. When ``localize`` reads the next batch's windows on
    every core between two forwards (:class:`histo_wsl.inference.windows.InlineReads`), a spinning
    worker holds one of those cores: on the 40,000 × 4,480 band at 2 threads of 2 cores a window
    read took 6.3-6.5 ms of wall time for 4.6 ms of CPU, and 4.9 ms with 10,000 iterations; the
    slide's reads waited 1.5 instead of 2.1 s while the forward kept its speed (docs/results.md,
    *The OpenMP threads' wait between forwards*). Sleeping right away (``OMP_WAIT_POLICY=PASSIVE``)
    slows the forward itself by 6-11 %.

    libgomp reads the setting once, when it is loaded, so this acts only before torch is
    imported, and never over a user's own ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``. Other
    OpenMP runtimes ignore the variable.

    Returns:
        Whether ``GOMP_SPINCOUNT`` was set.
    """
    if "torch" in sys.modules:
        return False
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = str(int(spincount))
    return True


def openmp_spin_record() -> str:
    """How the OpenMP threads wait between forwards, as a slide's JSON records it."""
    if "GOMP_SPINCOUNT" in os.environ:
        return f"GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']}"
    if "OMP_WAIT_POLICY" in os.environ:
        return f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    return "OpenMP default"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a cluster job's allocation)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _machine_busy_seconds() -> tuple[float, int] | None:
    """(busy CPU-seconds of all cores since boot, number of cores) from ``/proc/stat``."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return (sum(ticks[:8]) - idle) / hz, os.cpu_count() or 1


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class ThreadGovernor:
    """Sets the forward's thread count to the cores other processes leave free.

    Args:
        requested: a fixed thread count (``--threads``); None or 0: measured.
    """

    requested: int | None = None
    #: the thread count in use
    threads: int = 0
    #: how it was chosen (recorded in each slide's JSON)
    reason: str = ""
    _last: tuple[float, float, float] | None = field(default=None, repr=False)
    _checked: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        import torch

        cores = usable_cores()
        if self.requested:
            self._set(int(self.requested), f"--threads {int(self.requested)}")
        elif os.environ.get("OMP_NUM_THREADS"):
            self.threads = torch.get_num_threads()
            self.reason = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
        else:
            self._set(min(cores, torch.get_num_threads()), "measured: no other load yet")
            self._last = self._sample()
            # the first measurement comes after FIRST_CHECK_SECONDS (the model's load), then
            # every RECHECK_SECONDS
            self._checked = time.monotonic() - RECHECK_SECONDS + FIRST_CHECK_SECONDS
            busy = self._others_from_loadavg(cores) if self._last is None else None
            if busy is not None:
                self._apply(busy, cores, "1-minute load average")

    @property
    def adaptive(self) -> bool:
        """Whether the count follows the machine's load (no fixed ``--threads``)."""
        return not self.requested and not os.environ.get("OMP_NUM_THREADS")

    def _set(self, n: int, reason: str) -> None:
        import torch

        n = max(1, n)
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        self.threads, self.reason = n, reason

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        machine = _machine_busy_seconds()
        if machine is None:
            return None
        return time.monotonic(), machine[0], _own_seconds()

    @staticmethod
    def _others_from_loadavg(cores: int) -> float | None:
        try:
            return min(float(cores), os.getloadavg()[0])
        except (AttributeError, OSError):
            return None

    def _apply(self, others: float, cores: int, how: str) -> None:
        # a core counts as taken when another process kept it busy most of the interval
        free = cores - int(others + 0.4)
        self._set(max(1, free), f"{how}: other processes busy on {others:.1f} of {cores} cores")

    def update(self) -> None:
        """Measure the other processes' load again if :data:`RECHECK_SECONDS` have passed."""
        if not self.adaptive or self._last is None:
            return
        now = time.monotonic()
        if now - self._checked < RECHECK_SECONDS:
            return
        self._checked = now
        current = self._sample()
        if current is None:
            return
        (t0, busy0, own0), (t1, busy1, own1) = self._last, current
        self._last = current
        wall = t1 - t0
        if wall <= 0:
            return
        others = max(0.0, ((busy1 - busy0) - (own1 - own0)) / wall)
        self._apply(others, usable_cores(), "measured")
