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
