"""``histo-wsl localize``: whole-slide inference with QuPath-ready outputs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from histo_wsl.cli.common import (
    batch_options,
    fail,
    reports_errors,
    run_batch_command,
)
from histo_wsl.cli.options import (
    InputsArg,
    JsonOpt,
    OverwriteOpt,
    QuietOpt,
    SeedOpt,
    ShardOpt,
    SkipErrorsOpt,
    SlideMppOpt,
)

EPILOG = """Examples:

  histo-wsl localize slide.svs --out maps   (the default installed model)

  histo-wsl localize slides/ --model runs/negev/best-loc.pt --out maps

  histo-wsl localize slide.svs --model runs/cam/best-loc.pt --cam gradcampp --output-mpp 4 --json

  histo-wsl localize glas/test/*.bmp --model runs/negev/best-loc.pt --whole-image --out glas-maps
"""


@reports_errors
def localize(
    inputs: InputsArg,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            metavar="NAME|PATH",
            help="An installed model's name (see `histo-wsl models`), or a checkpoint (.pt) from "
            "train-classifier or train-decoder. Default: the default installed model (the "
            "shipped GlaS NEGEV model when present).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (created if needed).")
    ] = Path("localize"),
    cam: Annotated[
        str | None,
        typer.Option(
            "--cam",
            help="CAM method for stage-1 checkpoints, overriding the card's: cam, gradcam, "
            "gradcampp, smoothgradcampp, xgradcam, layercam.",
            show_default=False,
        ),
    ] = None,
    tta: Annotated[
        str | None,
        typer.Option(
            "--tta",
            help="Test-time augmentation, overriding the card's: none, or flips (mean of the "
            "image and its left-right, up-down and both flips; 4x the compute).",
            show_default=False,
        ),
    ] = None,
    class_name: Annotated[
        str | None,
        typer.Option(
            "--class",
            help="Class whose map is made and named in the GeoJSON (default: the card's one "
            "non-negative class, else each window's predicted class, named ROI).",
            show_default=False,
        ),
    ] = None,
    mpp: Annotated[
        float | None,
        typer.Option(
            "--mpp",
            min=0.0,
            metavar="µm/px",
            help="Resolution the slides are read at (default: the model card's, the one the "
            "network saw in training).",
            show_default=False,
        ),
    ] = None,
    output_mpp: Annotated[
        float | None,
        typer.Option(
            "--output-mpp",
            min=0.0,
            metavar="µm/px",
            help="Resolution of the output map (default: 4 × the model's).",
            show_default=False,
        ),
    ] = None,
    overlap: Annotated[
        float,
        typer.Option(
            "--overlap",
            min=0.0,
            max=0.9,
            help="Overlap of neighbouring windows as a fraction of the window.",
        ),
    ] = 0.25,
    blend: Annotated[
        str,
        typer.Option(
            "--blend", help="Weighting of overlapping windows: gaussian, linear or constant."
        ),
    ] = "gaussian",
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            min=0.0,
            max=1.0,
            help="Mask threshold on the probability (default: the card's threshold).",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            "-b",
            min=1,
            help="Windows per forward pass (default: 4 on a CPU, 16 on a GPU).",
            show_default=False,
        ),
    ] = None,
    device: Annotated[
        str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")
    ] = "auto",
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision on CUDA.")] = True,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            "-j",
            min=0,
            help="Reader processes, each opening the slide (0: one reader thread; default 0 on "
            "CPU, 4 on CUDA).",
            show_default=False,
        ),
    ] = None,
    threads: Annotated[
        int,
        typer.Option(
            "--threads",
            min=0,
            help="CPU threads of the forward (0: the cores other processes leave free, "
            "measured again every few seconds).",
        ),
    ] = 0,
    whole_image: Annotated[
        bool,
        typer.Option(
            "--whole-image",
            help="Plain images only: resize the whole image to the network input, predict once "
            "and resize the map back (the papers' protocol, e.g. GlaS).",
        ),
    ] = False,
    prob_bits: Annotated[
        int,
        typer.Option("--prob-bits", min=8, max=16, help="Bit depth of <image>.prob.png: 8 or 16."),
    ] = 8,
    tissue_geojson: Annotated[
        Path | None,
        typer.Option(
            "--tissue-geojson",
            help="Tissue regions instead of detection: a GeoJSON file (e.g. tissue.geojson "
            "edited in QuPath) or a folder of <slide>.geojson or <slide>/tissue.geojson.",
        ),
    ] = None,
    tissue_detection: Annotated[
        bool,
        typer.Option(
            "--tissue-detection/--no-tissue-detection",
            help="Infer only where tissue is detected; --no-tissue-detection infers everywhere.",
        ),
    ] = True,
    thumbnail_mpp: Annotated[
        float,
        typer.Option(
            "--thumbnail-mpp",
            min=0.5,
            metavar="µm/px",
            help="Resolution of the thumbnail tissue detection works on.",
        ),
    ] = 8.0,
    canvas_max_mb: Annotated[
        float,
        typer.Option(
            "--canvas-max-mb",
            min=0.0,
            metavar="MB",
            help="Output maps larger than this are kept on disk (memmap in the staging folder).",
        ),
    ] = 256.0,
    slide_mpp: SlideMppOpt = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Map slides that do not look like the model's training domain (e.g. a "
            "fluorescence slide for a brightfield model) instead of refusing them.",
        ),
    ] = False,
    geojson_tiles: Annotated[
        bool,
        typer.Option(
            "--geojson-tiles",
            help="Also write <slide>.tiles.geojson: each window as a QuPath detection with its "
            "mean probability (a heatmap QuPath can colour and filter).",
        ),
    ] = False,
    mil: Annotated[
        Path | None,
        typer.Option(
            "--mil",
            metavar="MIL.PT",
            help="A train-mil model: each slide's JSON also gets its slide-level score (mil), "
            "from patches cut as its training patches were.",
            show_default=False,
        ),
    ] = None,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    skip_errors: SkipErrorsOpt = False,
    shard: ShardOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Map where the model's class is on slides and images, for QuPath and OpenSlide viewers.

    Per slide in <out>/<slide>/: <slide>.prob.tif (probability 0-255, pyramidal tiled TIFF at
    --output-mpp covering the slide), <slide>.mask.png (probability >= threshold), <slide>.geojson
    (QuPath annotations in level-0 px with area µm² and mean probability), <slide>.overlay.png and
    <slide>.json (slide class and score, ROI area µm², resolutions, timings). Plain images also get
    <image>.prob.png and <image>.mask.png at their own size. Windows are read at the model's µm/px
    where there is tissue and blended with importance weights (no seams). Finished slides are
    skipped on a rerun. Exit code: 0 all done, 1 some inputs failed (--skip-errors), 2 bad input.
    """
    from histo_wsl.runtime.threads import shorten_openmp_spin

    shorten_openmp_spin()  # before torch loads: idle forward threads free the cores for reading
    from histo_wsl.inference.localize import localize as run
    from histo_wsl.inference.params import LocalizeParams

    if prob_bits not in (8, 16):
        raise fail(f"--prob-bits must be 8 or 16, got {prob_bits}")
    from histo_wsl.api import model_checkpoint

    model_path, default = model_checkpoint(model)
    if default is not None:
        print(f"histo-wsl: using the default model {default} ({model_path})", file=sys.stderr)

    from histo_wsl.tissue.detect import TissueParams

    params = LocalizeParams(
        model=model_path,
        cam=cam,
        tta=tta,
        class_name=class_name,
        mpp=mpp,
        output_mpp=output_mpp,
        overlap=overlap,
        blend=blend.lower(),
        threshold=threshold,
        batch_size=batch_size,
        device=device,
        amp=amp,
        workers=workers,
        threads=threads or None,
        slide_mpp=slide_mpp,
        tissue_geojson=tissue_geojson,
        tissue_detection=tissue_detection,
        thumbnail_mpp=thumbnail_mpp,
        tissue=TissueParams(),
        whole_image=whole_image,
        prob_bits=prob_bits,
        canvas_max_mb=canvas_max_mb,
        seed=seed,
        force=force,
        geojson_tiles=geojson_tiles,
        mil=mil,
    )
    params.validate()

    def describe(summary) -> str:
        c = summary.counts
        return (
            f"{c['done']} input(s) done, {summary.skipped_phrase()}, {c['failed']} "
            f"failed; outputs in {out}/<name>/; run record: {summary.run_file}"
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
