import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from histo_wsl import __version__
from histo_wsl.cli.app import app

runner = CliRunner()
COMMANDS = [
    "demo",
    "extract-patches",
    "slide-info",
    "train-classifier",
    "train-decoder",
    "localize",
    "evaluate",
    "models",
]


def test_help_lists_every_subcommand_without_heavy_imports():
    code = (
        "import sys\n"
        "sys.argv = ['histo-wsl', '--help']\n"
        "from histo_wsl.cli.app import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'torchvision', 'openslide', 'numpy', 'cv2', 'tifffile', 'PIL'))\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "HEAVY=\n" in out.stdout
    for name in COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", COMMANDS)
def test_each_subcommand_has_help(name):
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_extract_help_shows_units_defaults_and_example():
    text = runner.invoke(app, ["extract-patches", "--help"], terminal_width=200).output
    for needle in (
        "--patch-size",
        "--mpp",
        "µm/px",
        "--level",
        "--stride",
        "--overlap",
        "--min-tissue",
        "--format",
        "--coords-only",
        "--label",
        "--max-patches",
        "--workers",
        "--shard",
        "--skip-errors",
        "--overwrite",
        "--json",
        "--slide-mpp",
        "--tissue-geojson",
        "default: 224",
        "Examples",
    ):
        assert needle in text, needle


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"histo-wsl {__version__}"


def test_extract_cli_json_summary(tmp_path, synthetic_slide):
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "extract-patches",
            str(synthetic_slide),
            "--out",
            str(out),
            "--max-patches",
            "3",
            "--json",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["counts"] == {"done": 1, "skipped": 0, "failed": 0}
    assert summary["items"][0]["patches"] == 3
    assert (out / "manifest.csv").exists() and (out / "run.json").exists()


def test_extract_cli_bad_input_is_one_line_and_exit_2(tmp_path, not_a_slide):
    result = runner.invoke(
        app, ["extract-patches", str(not_a_slide), "--out", str(tmp_path / "o"), "--quiet"]
    )
    assert result.exit_code == 2
    lines = [ln for ln in result.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and str(not_a_slide) in lines[0]


def test_extract_cli_skip_errors_exit_1(tmp_path, synthetic_slide, not_a_slide):
    result = runner.invoke(
        app,
        [
            "extract-patches",
            str(synthetic_slide),
            str(not_a_slide),
            "--out",
            str(tmp_path / "o"),
            "--skip-errors",
            "--max-patches",
            "2",
            "--quiet",
        ],
    )
    assert result.exit_code == 1


def test_extract_cli_missing_input_and_unwritable_out(tmp_path, synthetic_slide):
    result = runner.invoke(
        app, ["extract-patches", str(tmp_path / "nope.svs"), "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "no such file" in result.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = runner.invoke(
        app, ["extract-patches", str(synthetic_slide), "--out", str(blocker / "o")]
    )
    assert result.exit_code == 2 and "cannot be written" in result.stderr


def test_extract_cli_csv_input_with_mpp_column(tmp_path, synthetic_slide_no_mpp):
    csv = tmp_path / "slides.csv"
    csv.write_text(f"path,slide_mpp,label\n{synthetic_slide_no_mpp},0.5,normal\n")
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["extract-patches", str(csv), "--out", str(out), "--quiet", "--max-patches", "2"]
    )
    assert result.exit_code == 0, result.stderr
    assert "normal" in (out / "manifest.csv").read_text()


def test_slide_info_json(synthetic_slide, not_a_slide):
    result = runner.invoke(app, ["slide-info", str(synthetic_slide), "--json"])
    assert result.exit_code == 0
    info = json.loads(result.stdout)["items"][0]  # one shape whatever the number of inputs
    assert info["width"] == 3000 and info["mpp"] == pytest.approx(0.5) and len(info["levels"]) >= 3
    result = runner.invoke(app, ["slide-info", str(synthetic_slide), str(not_a_slide), "--json"])
    listed = json.loads(result.stdout)
    assert result.exit_code == 1 and len(listed["items"]) == 2 and listed["failed"] == 1
    human = runner.invoke(app, ["slide-info", str(synthetic_slide)])
    assert human.exit_code == 0 and "generic-tiff" in human.stdout


def test_slide_info_real(wsi_dir):
    result = runner.invoke(app, ["slide-info", str(wsi_dir / "cmu-1-small-region.svs"), "--json"])
    info = json.loads(result.stdout)["items"][0]
    assert info["vendor"] == "aperio" and info["objective_power"] == 20
    assert set(info["associated_images"]) == {"label", "macro", "thumbnail"}


def test_slide_info_decodes_a_tile_so_damaged_pixels_are_found(tmp_path, synthetic_slide):
    """Issue 26: slide-info called a slide fine without reading a pixel."""
    import shutil

    import tifffile

    ok = runner.invoke(app, ["slide-info", str(synthetic_slide), "--json"])
    assert ok.exit_code == 0
    pixels = json.loads(ok.stdout)["items"][0]["pixels"]
    assert pixels["status"] == "ok" and pixels["read"][0]["level"] == 0
    assert 0 in pixels["decoded_by"]["tiles"]  # decoded from its tiles, checked against OpenSlide
    assert (
        "pixels: a 256 px tile decoded"
        in runner.invoke(app, ["slide-info", str(synthetic_slide)]).stdout
    )
    damaged = tmp_path / "damaged.tif"
    shutil.copy(synthetic_slide, damaged)
    with tifffile.TiffFile(damaged) as tif:
        page = tif.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts, strict=True))
    with open(damaged, "r+b") as fh:  # every level-0 tile's data overwritten, the header intact
        for offset, count in spans:
            fh.seek(offset)
            fh.write(b"\xff\x00" * (count // 2))
    r = runner.invoke(app, ["slide-info", str(damaged)])
    assert r.exit_code == 2
    assert "damaged.tif" in r.stderr and "reading pixels failed" in r.stderr
