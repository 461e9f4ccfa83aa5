"""The example scripts are valid shell and use only options the CLI has."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from histo_wsl.cli.app import app

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.sh"))


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid_and_uses_real_options(script):
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(script)], check=True)
    code = "\n".join(
        ln for ln in script.read_text().splitlines() if not ln.lstrip().startswith("#")
    )
    text = re.sub(r"\\\n\s*", " ", code)
    calls = re.findall(r"(?:histo-wsl|-m histo_wsl) ([a-z-]+)([^\n|>]*)", text)
    assert calls, script
    helps: dict[str, str] = {}
    for command, rest in calls:
        if command not in helps:
            result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
            assert result.exit_code == 0, (script.name, command)
            helps[command] = result.stdout
        for option in re.findall(r"(--[a-z][a-z0-9-]*)", rest):
            assert option in helps[command], (script.name, command, option)
    # options kept in variables (S1="--epochs 20 ...") must exist in one of the commands called
    launcher = {"--standalone", "--nproc_per_node", "--array"}
    for option in set(re.findall(r"(--[a-z][a-z0-9_-]*)", text)) - launcher:
        assert any(option in h for h in helps.values()), (script.name, option)
