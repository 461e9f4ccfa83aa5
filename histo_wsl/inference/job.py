"""One slide being localized: what the per-slide steps share, and the grid its map is made on.

:class:`SlideJob` holds the input, its open slide, where its files go, the engine and the settings,
so the steps of ``localize`` take one argument instead of nine; :class:`SlideGrid` is where the
slide is read (the model's resolution) and where its map is written (the output grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from histo_wsl.inference.engine import Engine
from histo_wsl.inference.params import LocalizeParams
from histo_wsl.runtime.inputs import InputItem
from histo_wsl.slideio.slide import ReadPlan, Slide

__all__ = ["SlideGrid", "SlideJob"]


@dataclass
class SlideJob:
    """One slide of a ``localize`` run.

    Attributes:
        item: the input (its path, name and per-slide overrides).
        slide: the open slide.
        slide_dir: the staging folder its outputs are written in.
        scratch: a folder for memory-mapped arrays (removed after the slide).
        engine: the model and how it runs.
        params: the run's settings.
        slide_mpp: the level-0 µm/px override, if any (the item's, else the run's).
        t_start: when the slide started (``time.perf_counter``).
    """

    item: InputItem
    slide: Slide
    slide_dir: Path
    scratch: Path
    engine: Engine
    params: LocalizeParams
    slide_mpp: float | None
    t_start: float

    @property
    def max_bytes(self) -> int:
        """Arrays larger than this go to memory-mapped files in ``scratch`` (``--canvas-max-mb``)."""
        return int(self.params.canvas_max_mb * 2**20)


@dataclass
class SlideGrid:
    """Where a slide is read and where its map is written: resolutions, the output grid, notes."""

    model_mpp: float
    plan: ReadPlan
    output_mpp: float
    s_out: float  # level-0 px per output px
    out_w: int
    out_h: int
    notes: list[str]
