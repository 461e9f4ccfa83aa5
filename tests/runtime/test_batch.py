import json

import pytest

from histo_wsl.errors import InputError
from histo_wsl.runtime.batch import STAGING, BatchOptions, BatchRunner
from histo_wsl.runtime.inputs import InputItem


def _items(tmp_path, names):
    return [InputItem(tmp_path / f"{n}.svs", n) for n in names]


def _runner(out, **kw):
    return BatchRunner(
        out,
        command="test",
        params={"p": 1},
        marker=lambda n: f"{n}/item.json",
        options=BatchOptions(quiet=True, **kw),
        seed=7,
    )


def _writer(calls):
    def process(item, stage, progress):
        calls.append(item.name)
        if item.name.startswith("bad"):
            raise InputError("cannot be used; fix it", item.path)
        (stage / item.name).mkdir()
        (stage / item.name / "out.txt").write_text(f"output of {item.name}")
        return {"value": len(item.name)}

    return process


def test_runs_items_records_and_skips_finished(tmp_path):
    out, calls = tmp_path / "out", []
    s = _runner(out, argv=("x",)).run(_items(tmp_path, ["a", "bb"]), _writer(calls))
    assert s.exit_code == 0 and calls == ["a", "bb"]
    assert (out / "bb" / "out.txt").read_text() == "output of bb"
    record = json.loads((out / "a" / "item.json").read_text())
    assert record["status"] == "done" and record["value"] == 1 and record["seed"] == 7
    run = json.loads((out / "run.json").read_text())
    assert run["argv"] == ["x"] and run["params"] == {"p": 1} and run["seed"] == 7
    assert [i["status"] for i in run["items"]] == ["done", "done"] and run["ended"]
    assert "histo-wsl" in run["versions"]
    assert run["cpu_count"] >= 1 and "processor" in run
    assert not (out / STAGING).exists()
    s2 = _runner(out).run(_items(tmp_path, ["a", "bb"]), _writer(calls))
    assert calls == ["a", "bb"] and s2.counts == {"done": 0, "skipped": 2, "failed": 0}
    _runner(out, overwrite=True).run(_items(tmp_path, ["a"]), _writer(calls))
    assert calls[-1] == "a"


def test_failure_stops_with_exit_2_and_keeps_earlier_outputs(tmp_path):
    out, calls = tmp_path / "out", []
    s = _runner(out).run(_items(tmp_path, ["a", "bad", "c"]), _writer(calls))
    assert s.exit_code == 2 and calls == ["a", "bad"]
    assert (out / "a" / "out.txt").exists() and not (out / "bad").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["items"][1]["status"] == "failed" and "fix it" in run["items"][1]["error"]


def test_skip_errors_goes_on_with_exit_1(tmp_path):
    out, calls = tmp_path / "out", []
    s = _runner(out, skip_errors=True).run(_items(tmp_path, ["a", "bad", "c"]), _writer(calls))
    assert s.exit_code == 1 and calls == ["a", "bad", "c"]
    assert s.counts == {"done": 2, "skipped": 0, "failed": 1}
    # a rerun retries only the failed item
    calls.clear()
    _runner(out, skip_errors=True).run(_items(tmp_path, ["a", "bad", "c"]), _writer(calls))
    assert calls == ["bad"]


def test_unexpected_error_is_recorded_with_traceback(tmp_path):
    def boom(item, stage, progress):
        raise ZeroDivisionError("oops")

    s = _runner(tmp_path / "out", skip_errors=True).run(_items(tmp_path, ["a"]), boom)
    assert s.exit_code == 1 and "ZeroDivisionError" in s.items[0].error
    assert "traceback" in s.items[0].details


def test_killed_run_leaves_nothing_taken_as_finished(tmp_path):
    out, calls = tmp_path / "out", []
    # what a run killed mid-item leaves: a staging folder, and an item folder without its record
    (out / STAGING / "a" / "a").mkdir(parents=True)
    (out / STAGING / "a" / "a" / "half.txt").write_text("partial")
    (out / "a").mkdir()
    (out / "a" / "stale.txt").write_text("old")
    s = _runner(out).run(_items(tmp_path, ["a"]), _writer(calls))
    assert calls == ["a"] and s.exit_code == 0
    assert sorted(p.name for p in (out / "a").iterdir()) == ["item.json", "out.txt"]


def test_overwrite_keeps_old_outputs_when_the_new_run_fails(tmp_path):
    out, calls = tmp_path / "out", []
    _runner(out).run(_items(tmp_path, ["a"]), _writer(calls))

    def fails(item, stage, progress):
        (stage / "a").mkdir()
        (stage / "a" / "out.txt").write_text("half")
        raise InputError("broken")

    s = _runner(out, overwrite=True).run(_items(tmp_path, ["a"]), fails)
    assert s.exit_code == 2
    assert (out / "a" / "out.txt").read_text() == "output of a"
    assert json.loads((out / "a" / "item.json").read_text())["status"] == "done"


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(InputError, match="cannot be written") as err:
        _runner(blocker / "out").run(_items(tmp_path, ["a"]), _writer([]))
    assert str(blocker / "out") in str(err.value)


def test_shard_run_file_name(tmp_path):
    s = _runner(tmp_path / "out", shard=(2, 4)).run([], _writer([]))
    assert s.run_file.name == "run.shard-2-of-4.json" and s.run_file.exists()


def test_an_item_another_run_holds_is_skipped_and_a_dead_runs_lock_taken_over(tmp_path):
    """Issue 26, item 9: two runs into one --out must not destroy each other's item."""
    import subprocess
    import sys

    from histo_wsl.runtime.batch import LOCKS

    out, calls = tmp_path / "out", []
    (out / LOCKS).mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, filelock; lock = filelock.FileLock(sys.argv[1]); lock.acquire(); "
            "print('held', flush=True); sys.stdin.read()",
            str(out / LOCKS / "a.lock"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        s = _runner(out).run(_items(tmp_path, ["a", "b"]), _writer(calls))
        assert s.exit_code == 0 and calls == ["b"]
        assert s.items[0].status == "skipped" and "another run" in s.items[0].details["reason"]
        assert not (out / "a").exists()
    finally:
        holder.kill()  # dies holding the lock: the operating system releases it
        holder.wait()
    s = _runner(out).run(_items(tmp_path, ["a", "b"]), _writer(calls))
    assert calls == ["b", "a"] and [i.status for i in s.items] == ["done", "skipped"]
    assert (out / "a" / "out.txt").is_file()
