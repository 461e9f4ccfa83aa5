"""The forward's thread count follows the cores other processes leave free."""

from __future__ import annotations

import pytest
import torch

from histo_wsl.runtime import threads as threads_mod
from histo_wsl.runtime.threads import RECHECK_SECONDS, ThreadGovernor


@pytest.fixture()
def machine(monkeypatch):
    """A 2-core machine whose busy seconds, own seconds and clock the test drives."""
    state = {"now": 100.0, "busy": 0.0, "own": 0.0}
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads_mod, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads_mod, "_machine_busy_seconds", lambda: (state["busy"], 2))
    monkeypatch.setattr(threads_mod, "_own_seconds", lambda: state["own"])
    monkeypatch.setattr(threads_mod.time, "monotonic", lambda: state["now"])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield state
    torch.set_num_threads(before)


def _advance(state, seconds, others, own):
    state["now"] += seconds
    state["own"] += own * seconds
    state["busy"] += (others + own) * seconds


def test_a_busy_core_leaves_one_thread_and_a_quiet_machine_two(machine):
    gov = ThreadGovernor()
    assert gov.adaptive and gov.threads == 2
    _advance(machine, 1.0, others=1.0, own=1.0)  # another process holds a core
    gov.update()
    assert gov.threads == 1 == torch.get_num_threads()
    assert "busy on 1.0 of 2 cores" in gov.reason
    _advance(machine, 1.0, others=0.0, own=1.0)
    gov.update()  # too soon: measured every RECHECK_SECONDS
    assert gov.threads == 1
    _advance(machine, RECHECK_SECONDS, others=0.1, own=2.0)  # it ended
    gov.update()
    assert gov.threads == 2 == torch.get_num_threads()


def test_a_fixed_count_or_omp_num_threads_switch_it_off(machine, monkeypatch):
    gov = ThreadGovernor(1)
    assert not gov.adaptive and gov.threads == 1 and gov.reason == "--threads 1"
    _advance(machine, 10.0, others=0.0, own=1.0)
    gov.update()
    assert torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    gov = ThreadGovernor()
    assert not gov.adaptive and gov.reason == "OMP_NUM_THREADS=2"


def test_without_proc_stat_the_load_average_decides(machine, monkeypatch):
    monkeypatch.setattr(threads_mod, "_machine_busy_seconds", lambda: None)
    monkeypatch.setattr(threads_mod.os, "getloadavg", lambda: (1.2, 1.0, 1.0))
    gov = ThreadGovernor()
    assert gov.threads == 1 and "load average" in gov.reason


_SPIN_PROBE = (
    "import os, sys\n"
    "from histo_wsl.runtime.threads import shorten_openmp_spin\n"
    "before = 'torch' in sys.modules\n"
    "if sys.argv[1] == 'torch-first':\n"
    "    import torch\n"
    "print(shorten_openmp_spin(), os.environ.get('GOMP_SPINCOUNT'), before)\n"
)


def _spin_probe(env_extra: dict, mode: str = "fresh") -> list[str]:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(env_extra)
    out = subprocess.run(
        [sys.executable, "-c", _SPIN_PROBE, mode],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def test_the_openmp_spin_is_shortened_only_before_torch_and_never_over_the_user():
    assert _spin_probe({}) == ["True", str(threads_mod.OPENMP_SPINCOUNT), "False"]
    # the user's own setting wins, whichever of the two variables
    assert _spin_probe({"GOMP_SPINCOUNT": "5"})[:2] == ["False", "5"]
    assert _spin_probe({"OMP_WAIT_POLICY": "ACTIVE"})[:2] == ["False", "None"]
    # libgomp has read its environment once torch is loaded: nothing is set then
    assert _spin_probe({}, "torch-first")[:2] == ["False", "None"]


def test_the_openmp_wait_is_recorded(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")
    assert threads_mod.openmp_spin_record() == "GOMP_SPINCOUNT=10000"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert threads_mod.openmp_spin_record() == "OMP_WAIT_POLICY=PASSIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert threads_mod.openmp_spin_record() == "OpenMP default"
