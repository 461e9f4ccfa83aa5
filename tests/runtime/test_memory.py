import os
import subprocess
import sys

import pytest

from histo_wsl.runtime import memory


def test_reuse_sets_the_mmap_threshold_before_the_trim_threshold(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "_libc", lambda name: lambda p, v: calls.append((p, v)) or 1)
    for var in memory._USER_SETTINGS:
        monkeypatch.delenv(var, raising=False)
    assert memory.reuse_freed_memory() is True
    assert calls == [
        (memory._M_MMAP_THRESHOLD, memory.MMAP_THRESHOLD),
        (memory._M_TRIM_THRESHOLD, memory.TRIM_THRESHOLD),
    ]


@pytest.mark.parametrize("var", ["MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"])
def test_a_user_configured_allocator_is_left_alone(monkeypatch, var):
    calls = []
    monkeypatch.setattr(memory, "_libc", lambda name: lambda p, v: calls.append((p, v)) or 1)
    monkeypatch.setenv(var, "glibc.malloc.trim_threshold=1" if var == "GLIBC_TUNABLES" else "1")
    assert memory.reuse_freed_memory() is False
    assert calls == []


def test_nothing_happens_without_glibc(monkeypatch):
    monkeypatch.setattr(memory, "_libc", lambda name: None)
    assert memory.reuse_freed_memory() is False
    memory.release_freed_memory()  # no error either


@pytest.mark.skipif(memory._libc("mallopt") is None, reason="not glibc")
def test_glibc_takes_the_thresholds():
    env = {k: v for k, v in os.environ.items() if k not in memory._USER_SETTINGS}
    code = "from histo_wsl.runtime.memory import reuse_freed_memory as r; print(r())"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "True"
