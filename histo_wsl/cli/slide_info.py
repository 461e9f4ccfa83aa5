"""``histo-wsl slide-info``: what a slide file holds."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from histo_wsl.cli.common import print_json, reports_errors
from histo_wsl.cli.options import JsonOpt, SlideMppOpt
from histo_wsl.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_SOME_FAILED


@reports_errors
def slide_info(
    slides: Annotated[
        list[str],
        typer.Argument(
            help="Slide or image files, folders, glob patterns or CSV lists.", show_default=False
        ),
    ],
    slide_mpp: SlideMppOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show what slide files hold: format, size, levels, resolution (µm/px).

    Per slide: vendor format, level-0 dimensions, pyramid levels with their downsamples and µm/px,
    the resolution and where it comes from, objective power and associated images; one small tile
    at the centre of level 0 and of the smallest level is decoded, so damaged pixel data is found.
    A slide that cannot be read is reported on stderr; the exit code is 1 when some slides failed
    and 2 when all did.

    Example: histo-wsl slide-info slides/*.svs --json
    """
    from rich.console import Console
    from rich.table import Table

    from histo_wsl.errors import HistoWSLError
    from histo_wsl.runtime.inputs import collect_inputs
    from histo_wsl.slideio.slide import open_slide

    items = collect_inputs(slides)
    infos, failed = [], 0
    for item in items:
        try:
            mpp = item.slide_mpp if item.slide_mpp is not None else slide_mpp
            with open_slide(item.path, mpp=mpp) as slide:
                info = slide.info()
                info["pixels"] = slide.check_pixels()
                infos.append(info)
        except HistoWSLError as exc:
            failed += 1
            infos.append({"path": str(item.path), "name": item.name, "error": str(exc)})
            print(f"histo-wsl: error: {exc}", file=sys.stderr)
    if json_out:
        print_json({"items": infos, "failed": failed})
    else:
        console = Console(highlight=False)
        for info in infos:
            if "error" in info:
                continue
            mpp = (
                "unknown"
                if info["mpp"] is None
                else f"{info['mpp']:.4g} µm/px ({info['mpp_source']})"
            )
            console.print(
                f"[bold]{info['path']}[/bold]  {info['vendor']}  "
                f"{info['width']}x{info['height']} px  mpp {mpp}  objective "
                f"{info['objective_power'] or 'unknown'}x",
                soft_wrap=True,
            )
            table = Table("level", "width", "height", "downsample", "µm/px")
            for lv in info["levels"]:
                table.add_row(
                    str(lv["level"]),
                    str(lv["width"]),
                    str(lv["height"]),
                    f"{lv['downsample']:.4g}",
                    "-" if lv["mpp"] is None else f"{lv['mpp']:.4g}",
                )
            console.print(table)
            if info["associated_images"]:
                assoc = ", ".join(f"{k} {w}x{h}" for k, (w, h) in info["associated_images"].items())
                console.print(f"associated images: {assoc}")
            tiles = ", ".join(
                f"level {r['level']} at x={r['x']}, y={r['y']}" for r in info["pixels"]["read"]
            )
            console.print(
                f"pixels: a {info['pixels']['read'][0]['width']} px tile decoded at {tiles}"
                f"{_decoder_words(info['pixels'].get('decoded_by', {}))}"
            )
            for note in info["notes"]:
                console.print(f"[yellow]note:[/yellow] {note}", soft_wrap=True)
    if failed:
        raise typer.Exit(EXIT_BAD_INPUT if failed == len(infos) else EXIT_SOME_FAILED)
    raise typer.Exit(EXIT_OK)


def _decoder_words(record: dict) -> str:
    """`` by ...``: which reader decoded the levels read (:meth:`Slide.reader_record`)."""
    if not record or record.get("image"):
        return ""
    tiles = record.get("tiles") or []
    if not tiles:
        return " by OpenSlide"
    refused = record.get("openslide") or {}
    levels = "level" if len(tiles) == 1 else "levels"
    where = ", ".join(str(level) for level in tiles)
    words = f" by histo-wsl's TIFF tile reader ({levels} {where}; checked equal to OpenSlide)"
    if isinstance(refused, dict) and refused:
        words += ", by OpenSlide on level(s) " + ", ".join(refused)
    return words
