"""The demo: every step histo-wsl has, run for real on an embedded synthetic default."""

from __future__ import annotations

import time
from pathlib import Path

from histo_wsl.console import stderr_console
from histo_wsl.extract import ExtractParams, extract_patches
from histo_wsl.inputs import InputItem


def run_demo(
    out: Path, *, size: int = 6000, seed: int = 0, overwrite: bool = False, quiet: bool = False
) -> dict:
    """Write a synthetic slide and extract patches from it; returns a JSON-ready summary.

    Args:
        out: demo folder (``slides/`` and ``patches/`` are written inside it).
        size: side of the synthetic slide in level-0 pixels (at 0.5 µm/px).
        seed: seed of the synthetic layout and of patch sampling.
        overwrite: redo the steps whose outputs exist.
        quiet: no progress bars.
    """
    from histo_wsl.synthetic import make_layout, write_pyramid_tiff

    console = stderr_console()
    t0 = time.perf_counter()
    slide_path = out / "slides" / f"synthetic-{size}px-seed{seed}.tif"
    layout = make_layout(size, size, mpp=0.5, n_sections=2, faint_sections=1, seed=seed)
    if overwrite or not slide_path.is_file():
        console.print(
            f"[bold]1/2[/bold] writing a synthetic {size}x{size} px pyramidal slide "
            f"(0.5 µm/px, {len(layout.sections)} tissue sections, one faint) to {slide_path}"
        )
        write_pyramid_tiff(slide_path, layout)
    else:
        console.print(f"[bold]1/2[/bold] synthetic slide already written: {slide_path}")
    console.print("[bold]2/2[/bold] extract-patches at 0.5 µm/px, 224 px patches, tissue ≥ 50 %")
    params = ExtractParams(patch_size=224, mpp=0.5, min_tissue=0.5, seed=seed)
    summary = extract_patches(
        [InputItem(slide_path, slide_path.stem)],
        out / "patches",
        params,
        overwrite=overwrite,
        quiet=quiet,
    )
    item = summary.items[0]
    result = {
        "slide": str(slide_path),
        "patches_folder": str(out / "patches"),
        "manifest": str(out / "patches" / "manifest.csv"),
        "tissue_geojson": str(out / "patches" / item.name / "tissue.geojson"),
        "tissue_qc": str(out / "patches" / item.name / "tissue.png"),
        "patches": item.details.get("patches"),
        "status": item.status,
        "exit_code": summary.exit_code,
        "seconds": round(time.perf_counter() - t0, 2),
        "steps_not_in_demo_yet": ["train-classifier", "train-decoder", "localize", "evaluate"],
    }
    if item.status == "skipped":
        console.print("patches already extracted (use --overwrite to redo)")
    console.print(
        f"\n[green]Done[/green] in {result['seconds']} s. Patches: {result['patches_folder']} "
        f"(manifest.csv); tissue QC image: {result['tissue_qc']}; QuPath tissue annotations: "
        f"{result['tissue_geojson']}.\n"
        "That is all the demo does in this version: the commands train-classifier, train-decoder, "
        "localize and evaluate exist (see README) but the demo does not run them yet.",
        soft_wrap=True,
    )
    return result
