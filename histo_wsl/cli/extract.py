"""``histo-wsl extract-patches``: tile slides into a patch folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from histo_wsl.cli.common import (
    batch_options,
    reports_errors,
    run_batch_command,
)
from histo_wsl.cli.options import (
    InputsArg,
    JsonOpt,
    OutOpt,
    OverwriteOpt,
    QuietOpt,
    SeedOpt,
    ShardOpt,
    SkipErrorsOpt,
    SlideMppOpt,
    WorkersOpt,
)

EPILOG = """Examples:

  histo-wsl extract-patches slides/ --out patches --mpp 0.5 --patch-size 224

  histo-wsl extract-patches slides.csv --out patches --max-patches 500 --workers 4 --json
"""


@reports_errors
def extract_patches(
    inputs: InputsArg,
    out: OutOpt = Path("patches"),
    patch_size: Annotated[
        int,
        typer.Option(
            "--patch-size",
            min=8,
            metavar="PX",
            help="Patch side in pixels at the target resolution.",
        ),
    ] = 224,
    mpp: Annotated[
        float | None,
        typer.Option(
            "--mpp",
            min=0.0,
            metavar="µm/px",
            help="Target resolution (default 0.5 unless --level).",
            show_default=False,
        ),
    ] = None,
    level: Annotated[
        int | None,
        typer.Option(
            "--level",
            min=0,
            help="Read this pyramid level as it is instead of a target mpp (works without mpp).",
        ),
    ] = None,
    stride: Annotated[
        int | None,
        typer.Option(
            "--stride",
            min=1,
            metavar="PX",
            help="Step between patches in pixels at the target "
            "resolution (default patch size, less --overlap).",
            show_default=False,
        ),
    ] = None,
    overlap: Annotated[
        float,
        typer.Option(
            "--overlap",
            min=0.0,
            max=0.95,
            help="Overlap of neighbouring patches as a fraction of the patch.",
        ),
    ] = 0.0,
    min_tissue: Annotated[
        float,
        typer.Option(
            "--min-tissue",
            min=0.0,
            max=1.0,
            help="Keep patches whose tissue fraction is at least this (0-1).",
        ),
    ] = 0.5,
    image_format: Annotated[
        str, typer.Option("--format", help="Patch image format: png or jpg.")
    ] = "png",
    jpeg_quality: Annotated[
        int, typer.Option("--jpeg-quality", min=1, max=100, help="JPEG quality when --format jpg.")
    ] = 90,
    coords_only: Annotated[
        bool,
        typer.Option(
            "--coords-only",
            help="Write the manifest (coordinates) and QC images only, no patch images.",
        ),
    ] = False,
    label: Annotated[
        str | None,
        typer.Option(
            "--label", help="Label of every patch (a CSV label column sets it per slide)."
        ),
    ] = None,
    max_patches: Annotated[
        int | None,
        typer.Option(
            "--max-patches",
            min=1,
            help="At most this many patches per slide, chosen at random with --seed.",
        ),
    ] = None,
    tissue_geojson: Annotated[
        Path | None,
        typer.Option(
            "--tissue-geojson",
            help="Tissue regions "
            "instead of detection: a GeoJSON file (e.g. "
            "tissue.geojson edited in QuPath) or a folder "
            "of <slide>.geojson or <slide>/tissue.geojson.",
        ),
    ] = None,
    thumbnail_mpp: Annotated[
        float,
        typer.Option(
            "--thumbnail-mpp",
            min=0.5,
            metavar="µm/px",
            help="Resolution of the thumbnail tissue detection works on.",
        ),
    ] = 8.0,
    min_object_um2: Annotated[
        float | None,
        typer.Option(
            "--tissue-min-object-um2",
            min=0.0,
            help="Drop tissue pieces smaller than this (µm²) (default detection default).",
            show_default=False,
        ),
    ] = None,
    min_hole_um2: Annotated[
        float | None,
        typer.Option(
            "--tissue-min-hole-um2",
            min=0.0,
            help="Fill holes in tissue smaller than this (µm²) (default detection default).",
            show_default=False,
        ),
    ] = None,
    slide_mpp: SlideMppOpt = None,
    workers: WorkersOpt = 1,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    skip_errors: SkipErrorsOpt = False,
    shard: ShardOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Tile slides into patches at a target resolution, where there is tissue.

    Writes <out>/<slide>/patches/<slide>_x<X>_y<Y>.png (X, Y: level-0 top-left), <out>/manifest.csv
    (slide,path,x,y,level,mpp,size,tissue_fraction,label,...), per-slide thumbnail.png, tissue.png,
    patches.png and tissue.geojson (QuPath, level-0), and <out>/run.json. Finished slides are skipped
    on a rerun. Exit code: 0 all done, 1 some slides failed (--skip-errors), 2 bad input.
    """
    import dataclasses

    from histo_wsl.data.extract import ExtractParams
    from histo_wsl.data.extract import extract_patches as run
    from histo_wsl.tissue.detect import TissueParams

    tissue_params = TissueParams()
    if min_object_um2 is not None:
        tissue_params = dataclasses.replace(tissue_params, min_object_um2=min_object_um2)
    if min_hole_um2 is not None:
        tissue_params = dataclasses.replace(tissue_params, min_hole_um2=min_hole_um2)
    params = ExtractParams(
        patch_size=patch_size,
        mpp=(0.5 if mpp is None and level is None else mpp),
        level=level,
        stride=stride,
        overlap=overlap,
        min_tissue=min_tissue,
        image_format=image_format.lower(),
        jpeg_quality=jpeg_quality,
        coords_only=coords_only,
        label=label,
        max_patches=max_patches,
        seed=seed,
        workers=workers,
        slide_mpp=slide_mpp,
        tissue_geojson=tissue_geojson,
        thumbnail_mpp=thumbnail_mpp,
        tissue=tissue_params,
    )
    if level is not None and mpp is not None:
        print("histo-wsl: warning: --level given, --mpp ignored", file=sys.stderr)
        params.mpp = None
    params.validate()

    def describe(summary) -> str:
        c = summary.counts
        total = sum(it.details.get("patches", 0) for it in summary.items)
        return (
            f"{c['done']} slide(s) done, {summary.skipped_phrase()}, {c['failed']} "
            f"failed; {total} patches written; manifest: {out / 'manifest.csv'}; run record: "
            f"{summary.run_file}"
        )

    raise run_batch_command(
        run,
        inputs,
        out,
        params,
        batch_options(shard, overwrite, skip_errors, quiet),
        json_out=json_out,
        describe=describe,
    )
