"""Faults a lab hits, each one line with its own exit code: disk full (3), internal error (4)."""

from __future__ import annotations

import errno
import shutil
from collections import namedtuple

import pytest
import torch
from typer.testing import CliRunner

from histo_wsl.cli.app import app
from histo_wsl.errors import (
    EXIT_FAULT,
    EXIT_INTERNAL,
    EXIT_SOME_FAILED,
    DiskFullError,
    is_disk_full,
)
from histo_wsl.registry.checkpoint import load_checkpoint, save_checkpoint
from histo_wsl.runtime import atomic
from histo_wsl.runtime.batch import BatchOptions, BatchRunner
from histo_wsl.runtime.inputs import InputItem
from histo_wsl.synthetic.patches import write_patch_dataset

runner = CliRunner()
Usage = namedtuple("Usage", "total used free")


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_under_a_checkpoint_is_one_line_and_leaves_the_earlier_one(
    tmp_path, monkeypatch
):
    good = save_checkpoint(tmp_path / "best.pt", {"epoch": 1}, {"w": torch.ones(3)})
    real_save = torch.save

    def torch_save_on_a_full_disk(obj, f, *a, **k):  # what torch's writer does: part, then raise
        real_save({"part": torch.zeros(10)}, f)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", torch_save_on_a_full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 5000, 5000))
    with pytest.raises(DiskFullError) as err:
        save_checkpoint(tmp_path / "best.pt", {"epoch": 2}, {"w": torch.zeros(10**6)})
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path}: the disk is full: best.pt could not be written")
    assert "0 MB free, it needs about 4 MB" in msg and "--resume" in msg
    assert err.value.exit_code == EXIT_FAULT and "\n" not in msg
    assert load_checkpoint(good)["card"]["epoch"] == 1  # the earlier file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]  # no partial file
    # a RuntimeError with room to spare is not a full disk
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 0, 10**12))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        save_checkpoint(tmp_path / "best.pt", {"epoch": 2}, {"w": torch.zeros(10**6)})


def test_enospc_from_any_atomic_writer_is_a_disk_full_error(tmp_path, monkeypatch):
    with pytest.raises(DiskFullError, match="report.json could not be written"):
        with atomic.atomic_path(tmp_path / "report.json") as tmp:
            tmp.write_text("{")
            _enospc()
    assert list(tmp_path.iterdir()) == []
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


@pytest.fixture(scope="module")
def patches(tmp_path_factory):
    return write_patch_dataset(tmp_path_factory.mktemp("d") / "data", n_per_class=4, size=48)


def _train(data, out, *more):
    args = ["train-classifier", str(data), "--out", str(out), "--backbone", "mobilenetv2"]
    args += ["--no-pretrained", "--batch-size", "4", "--workers", "0", "--device", "cpu"]
    args += ["--crop-size", "32", "--resize-size", "40", "--max-steps-per-epoch", "1", "--quiet"]
    return runner.invoke(app, [*args, *more])


def test_training_on_a_full_disk_exits_3_with_one_line(tmp_path, patches, monkeypatch):
    real_save, calls = torch.save, []

    def fills_up(obj, f, *a, **k):
        calls.append(f)
        if len(calls) > 3:  # epoch 0's best-loc/best-cls and epoch 1's first file fit
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", fills_up)
    out = tmp_path / "run"
    r = _train(patches, out, "--epochs", "2")
    assert r.exit_code == EXIT_FAULT, r.output
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "the disk is full" in err and str(out) in err
    assert "Traceback" not in r.output
    kept = sorted(p.name for p in out.glob("*.pt"))
    assert kept and all(load_checkpoint(out / k) for k in kept)
    assert not list(out.glob(".*partial*"))


def test_an_internal_error_is_one_line_with_the_saved_traceback(tmp_path, patches, monkeypatch):
    import histo_wsl.training.engine as training

    def bug(*a, **k):
        raise ZeroDivisionError("division by zero in a helper")

    monkeypatch.setattr(training, "_epoch_seed", bug)
    monkeypatch.setenv("HISTO_WSL_CRASH_DIR", str(tmp_path / "crashes"))
    r = _train(patches, tmp_path / "run", "--epochs", "1")
    assert r.exit_code == EXIT_INTERNAL
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("histo-wsl: error: internal error")
    assert "ZeroDivisionError: division by zero in a helper" in err and "please report" in err
    (saved,) = (tmp_path / "crashes").iterdir()
    assert str(saved) in err
    text = saved.read_text()
    assert "Traceback" in text and "_epoch_seed" not in err and "bug" in text
    assert "train-classifier" in text or "command:" in text


def test_a_full_disk_stops_a_batch_even_with_skip_errors(tmp_path):
    def fills_up(item, stage, progress):
        if item.name == "b":
            raise OSError(errno.ENOSPC, "No space left on device", str(stage / "b.png"))
        (stage / item.name).mkdir()
        return {}

    items = [InputItem(tmp_path / f"{n}.svs", n) for n in "abc"]
    out = tmp_path / "out"
    options = BatchOptions(skip_errors=True, quiet=True)
    r = BatchRunner(out, command="t", params={}, marker=lambda n: f"{n}/x", options=options)
    s = r.run(items, fills_up)
    assert s.exit_code == EXIT_FAULT and s.exit_code != EXIT_SOME_FAILED
    assert [i.status for i in s.items] == ["done", "failed"]  # c never started
    assert "the disk is full" in s.items[1].error
