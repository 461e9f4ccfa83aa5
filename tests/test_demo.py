import json

from typer.testing import CliRunner

from histo_wsl.cli.app import app


def test_demo_runs_the_real_pipeline(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(
        app, ["demo", "--out", str(out), "--size", "2048", "--json", "--quiet"]
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["patches"] > 0
    assert (out / "patches" / "manifest.csv").read_text().count("\n") == summary["patches"] + 1
    assert "all the demo does" in result.stderr
    again = CliRunner().invoke(
        app, ["demo", "--out", str(out), "--size", "2048", "--json", "--quiet"]
    )
    assert again.exit_code == 0 and json.loads(again.stdout)["status"] == "skipped"
