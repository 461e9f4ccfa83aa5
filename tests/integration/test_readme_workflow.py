"""The README's lab path and examples/lab_workflow.sh run, literally, on labels-only slides.

A folder of synthetic pyramidal slides with slide labels and no masks (the weakly-supervised case
histo-wsl exists for) goes through the README's own commands — extract-patches, train-classifier,
train-decoder, localize, evaluate — as a user would type them, with only the sizes shrunk by
options appended to each command (the last value of a repeated option wins). A README command
that does not run fails here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: options appended to each subcommand: tiny sizes, nothing else
TINY = {
    "extract-patches": [],
    "train-classifier": [
        "--epochs", "2", "--batch-size", "4", "--resize-size", "72", "--crop-size", "64",
        "--max-steps-per-epoch", "2", "--workers", "0", "--device", "cpu", "--quiet",
    ],
    "train-decoder": [
        "--epochs", "2", "--batch-size", "4", "--resize-size", "72", "--crop-size", "64",
        "--max-steps-per-epoch", "2", "--workers", "0", "--device", "cpu",
    ],
    "localize": ["--device", "cpu", "--workers", "0"],
    "evaluate": ["--bootstrap", "0"],
}  # fmt: skip


def lab_path_commands(readme: Path) -> list[list[str]]:
    """The commands of the README's ``<!-- lab-path -->`` block, as argument lists."""
    text = readme.read_text(encoding="utf-8")
    m = re.search(r"<!-- lab-path -->\s*```bash\n(.*?)```", text, re.S)
    assert m, "README.md has no <!-- lab-path --> bash block"
    block = re.sub(r"\\\n\s*", " ", m.group(1))
    lines = [ln.strip() for ln in block.splitlines()]
    return [shlex.split(ln) for ln in lines if ln and not ln.startswith("#")]


def _cli() -> list[str]:
    exe = shutil.which("histo-wsl", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "histo_wsl"]


def _env(torch_home: Path) -> dict[str, str]:
    return {**os.environ, "TORCH_HOME": str(torch_home), "COLUMNS": "200"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A lab's folder: slides.csv (path,label), 3 slides, QuPath annotations, ImageNet weights.

    Two ``tumour`` slides with glands and two ``normal`` slides without (one of each class is
    drawn for validation); the glands are written as
    QuPath GeoJSON in ``annotations/``. No patch has a mask. The MobileNetV2 weight file is a
    randomly initialised one under the name torchvision gives the real file (the default backbone
    loads it from ``$TORCH_HOME`` and never downloads).
    """
    import torch
    from torchvision.models import mobilenet_v2

    from histo_wsl.networks.backbones import weights_path
    from histo_wsl.slideio.geojson import GeoJSONStyle, mask_to_geojson
    from histo_wsl.synthetic.slides import gland_mask_region, make_layout, write_pyramid_tiff

    root = tmp_path_factory.mktemp("lab")
    (root / "slides").mkdir()
    (root / "annotations").mkdir()
    rows = ["path,label"]
    cases = [("tumour", 10), ("normal", 0), ("tumour", 10), ("normal", 0)]
    for i, (label, glands) in enumerate(cases):
        lay = make_layout(1600, 1600, mpp=0.5, n_sections=1, glands_per_section=glands, seed=i)
        path = write_pyramid_tiff(root / "slides" / f"case-{i}.tif", lay)
        rows.append(f"slides/{path.name},{label}")
        mask = gland_mask_region(lay, 0, 0, 400, 400, 4.0)
        geo = mask_to_geojson(mask, 4.0, style=GeoJSONStyle("Gland", (200, 0, 0)), mpp=0.5)
        (root / "annotations" / f"case-{i}.geojson").write_text(json.dumps(geo))
    (root / "slides.csv").write_text("\n".join(rows) + "\n")
    torch_home = root / "torch-home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(torch_home))
        target = weights_path("mobilenetv2")
    target.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(mobilenet_v2().state_dict(), target)
    return root, torch_home


def _run(cmd: list[str], cwd: Path, torch_home: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=cwd, env=_env(torch_home), capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_readme_lab_path_runs_on_labels_only_slides(lab):
    root, torch_home = lab
    commands = lab_path_commands(ROOT / "README.md")
    assert [c[:2] for c in commands] == [
        ["histo-wsl", "extract-patches"],
        ["histo-wsl", "train-classifier"],
        ["histo-wsl", "train-decoder"],
        ["histo-wsl", "localize"],
        ["histo-wsl", "evaluate"],
    ]
    for cmd in commands:
        sub = cmd[1]
        r = _run([*_cli(), *cmd[1:], *TINY[sub]], root, torch_home)
        assert r.returncode == 0, (shlex.join(cmd), r.stderr[-3000:])
        if sub == "train-decoder":
            # the closing summary names the checkpoint the next command takes, and why
            assert "Use next:" in r.stderr and "best-loc.pt" in r.stderr, r.stderr[-2000:]
            assert "last epoch of the fixed schedule" in r.stderr
    # no patch had a mask: both stages still wrote best-loc.pt, selected without masks
    cam = _card(root / "runs" / "cam" / "best-loc.pt")
    assert cam["selection"]["criterion"] == "val_acc" and not cam["selection"]["needs_masks"]
    negev = _card(root / "runs" / "negev" / "best-loc.pt")
    assert negev["selection"]["criterion"] == "epoch" and negev["epoch"] == 2
    run = json.loads((root / "runs" / "negev" / "run.json").read_text())
    assert run["summary"]["use_next"].endswith("best-loc.pt")
    for i in range(4):
        assert (root / "maps" / f"case-{i}" / f"case-{i}.geojson").is_file()
    # the localize process shortened the OpenMP threads' spin before torch loaded (a user's own
    # GOMP_SPINCOUNT or OMP_WAIT_POLICY would have been kept)
    slide = json.loads((root / "maps" / "case-0" / "case-0.json").read_text())
    if not {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(os.environ):
        assert slide["threads"]["openmp_wait"] == "GOMP_SPINCOUNT=10000"
    metrics = json.loads((root / "slide-eval" / "metrics.json").read_text())
    assert metrics["models"][0]["localization"]["pxap"]["value"] >= 0


def _card(path: Path) -> dict:
    """The model card of a checkpoint."""
    from histo_wsl.registry.checkpoint import load_checkpoint

    return load_checkpoint(path)["card"]


@pytest.mark.slow
def test_lab_workflow_script_runs_on_labels_only_slides(lab):
    root, torch_home = lab
    script = ROOT / "examples" / "lab_workflow.sh"
    env = {
        **_env(torch_home),
        "PATH": f"{Path(_cli()[0]).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "TRAIN_OPTS": " ".join(TINY["train-classifier"]),
        "LOCALIZE_OPTS": " ".join(TINY["localize"]),
    }
    r = subprocess.run(
        ["bash", str(script), "slides.csv", "runs/script", "annotations"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = root / "runs" / "script"
    for name in ("cam/best-loc.pt", "negev/best-loc.pt", "eval/metrics.json"):
        assert (out / name).is_file(), name
    assert (out / "maps" / "case-0" / "case-0.prob.tif").is_file()
