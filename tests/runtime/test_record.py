"""The run record's pieces: the processor's name, the environment, JSON-ready values, the time."""

import json
import math

import numpy as np

from histo_wsl.runtime.record import RunRecord, environment, json_ready, now, processor_name


def test_processor_name_from_cpuinfo_and_fallback(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Example CPU 9000 @ 3.0GHz\n")
    assert processor_name(info) == "Example CPU 9000 @ 3.0GHz"
    monkeypatch.setattr("platform.processor", lambda: "")
    assert processor_name(tmp_path / "missing") is None
    info.write_text("processor\t: 0\n")  # no model name (some ARM kernels)
    assert processor_name(info) is None
    env = environment()
    assert set(env) == {"versions", "platform", "host", "processor", "cpu_count"}


def test_json_ready_turns_numpy_and_non_finite_values_into_plain_json(tmp_path):
    data = {"a": np.float32(0.5), "b": np.int64(3), "c": [math.nan, np.inf], "d": np.bool_(True)}
    data["e"] = np.arange(2)
    data["f"] = tmp_path
    out = json_ready(data)
    assert out == {"a": 0.5, "b": 3, "c": [None, None], "d": True, "e": [0, 1], "f": str(tmp_path)}
    assert type(out["b"]) is int and type(out["d"]) is bool
    assert now().endswith("+00:00") and len(now()) == 25


def test_run_record_header_then_what_the_command_reports(tmp_path):
    record = RunRecord(
        tmp_path / "run.json", "localize", params={"p": 1}, argv=["histo-wsl", "x"], seed=3
    )
    record.note(device="cpu")
    record.write(ended=False, items=[{"name": "a"}], exit_code=0)
    running = json.loads((tmp_path / "run.json").read_text())
    assert running["ended"] is None and running["items"] == [{"name": "a"}]
    record.write(ended=True, items=[], exit_code=1, outputs={"x": "y"})
    run = json.loads((tmp_path / "run.json").read_text())
    head = ["tool", "command", "argv", "cwd", "params", "seed", "device", "started"]
    assert list(run)[: len(head)] == head
    assert run["command"] == "localize" and run["argv"] == ["histo-wsl", "x"] and run["seed"] == 3
    assert run["device"] == "cpu" and run["exit_code"] == 1 and run["outputs"] == {"x": "y"}
    assert set(environment()) <= set(run) and run["ended"] and run["seconds"] >= 0
