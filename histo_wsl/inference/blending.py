"""Overlapping windows blended into one map (as MONAI's sliding-window inference does).

:func:`importance_map` weights a window's pixels (gaussian, linear or constant);
:class:`WindowBlender` accumulates weighted window maps into a band of output rows and
:class:`BandCanvas` holds those bands so that memory stays bounded by a band, not the slide.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["BLEND_MODES", "importance_map", "WindowBlender", "BandCanvas"]

#: Importance weightings of overlapping windows.
BLEND_MODES = ("gaussian", "linear", "constant")


# -- blending -----------------------------------------------------------------------------------
def importance_map(size: int, mode: str = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
    """Weights of a window's pixels when overlapping windows are blended (max 1, min > 0).

    ``gaussian``: exp(-d²/2σ²) around the window centre with σ = ``sigma_scale × size`` (MONAI's
    default), clipped below at its smallest positive value; ``linear``: a tent,
    ``(1 - |u|)(1 - |v|)`` with u, v in (-1, 1) at pixel centres; ``constant``: ones.
    """
    if mode not in BLEND_MODES:
        raise ValueError(f"blend mode must be one of {BLEND_MODES}, got {mode!r}")
    c = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0  # pixel centres in (-1, 1)
    if mode == "constant":
        w1 = np.ones(size)
    elif mode == "linear":
        w1 = 1.0 - np.abs(c)
    else:
        sigma = sigma_scale * 2.0  # in units of the half-window
        w1 = np.exp(-(c**2) / (2.0 * sigma**2))
    w = np.outer(w1, w1)
    w /= w.max()
    positive = w[w > 0]
    floor = positive.min() if positive.size else 1.0
    return np.maximum(w, max(floor, 1e-6)).astype(np.float32)


class WindowBlender:
    """Resample weighted window maps onto the output grid at their exact sub-pixel positions.

    A window of ``size`` px covers ``footprint`` output pixels (a float); its top-left corner is at
    output coordinate ``(ox, oy)`` (output pixel ``c`` spans ``[c, c+1)``). Each window gives two
    planes, weight × probability and weight; they are area-downsampled to the footprint, then
    sampled bilinearly at the centres of the output pixels inside the window (pixels whose centre
    falls outside it get 0). Dividing the summed planes gives the blended probability.

    Args:
        size: window side in pixels (the network input).
        footprint: window side in output pixels.
        mode: importance weighting (see :func:`importance_map`).
        sigma_scale: σ of the Gaussian as a fraction of the window.
        device: torch device of the maps.
    """

    def __init__(
        self, size: int, footprint: float, mode: str, sigma_scale: float, device: Any
    ) -> None:
        import torch

        self.size = size
        self.footprint = float(footprint)
        self.resample = max(1, round(self.footprint))
        self.n = math.ceil(self.footprint) + 1
        self.weight = torch.from_numpy(importance_map(size, mode, sigma_scale)).to(device)
        self.device = device

    def __call__(
        self,
        maps: torch.Tensor,
        ox: np.ndarray,
        oy: np.ndarray,
        limit: tuple[float, float] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Planes (B, 2, n, n) float32 for windows at ``(ox, oy)``, and their (row, col) origins.

        ``limit`` is the slide's (width, height) in output pixels: an output pixel straddling the
        slide's right or bottom edge (its centre outside the slide) takes the value at the edge.
        """
        import torch
        import torch.nn.functional as F  # noqa: N812

        b = maps.shape[0]
        w = self.weight.expand(b, -1, -1)
        planes = torch.stack([maps * w, w], dim=1)
        if self.resample < self.size:
            planes = F.interpolate(planes, size=(self.resample,) * 2, mode="area")
        c0 = np.ceil(ox - 0.5).astype(np.int64)
        r0 = np.ceil(oy - 0.5).astype(np.int64)
        j = np.arange(self.n, dtype=np.float64) + 0.5
        ux = c0[:, None] + j[None, :]  # output pixel centres (B, n)
        uy = r0[:, None] + j[None, :]
        if limit is not None:
            ux = np.minimum(ux, limit[0] - 1e-6)
            uy = np.minimum(uy, limit[1] - 1e-6)
        tx = (ux - ox[:, None]) / self.footprint  # in window units: the window is [0, 1)
        ty = (uy - oy[:, None]) / self.footprint
        gx = torch.from_numpy(2.0 * tx - 1.0).float().to(self.device)
        gy = torch.from_numpy(2.0 * ty - 1.0).float().to(self.device)
        grid = torch.stack(
            [gx[:, None, :].expand(b, self.n, self.n), gy[:, :, None].expand(b, self.n, self.n)],
            dim=-1,
        )
        out = F.grid_sample(
            planes, grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        vx = torch.from_numpy((tx >= 0) & (tx < 1)).to(self.device)
        vy = torch.from_numpy((ty >= 0) & (ty < 1)).to(self.device)
        out = out * (vy[:, :, None] & vx[:, None, :])[:, None].to(out.dtype)
        return out.cpu().numpy(), r0, c0


class BandCanvas:
    """Weighted sums of overlapping windows, held only for the output rows still being written.

    Windows must arrive in row order (their top rows never decrease). When a window starts at row
    ``r``, every row above ``r`` is final: it is divided (Σ weight·p / Σ weight; 0 where no window
    reached) and handed to ``sink(first_row, prob (rows, W) float32, covered (rows, W) bool)``.
    Memory is two float32 planes of ``band × width``, whatever the height.

    Args:
        height: output rows.
        width: output columns.
        band: rows kept (grown when a window is taller).
        sink: receives finished rows, in order, each row exactly once.
    """

    def __init__(
        self,
        height: int,
        width: int,
        band: int,
        sink: Callable[[int, np.ndarray, np.ndarray], None],
    ) -> None:
        self.height, self.width = int(height), int(width)
        self.band = max(1, int(band))
        self.acc = np.zeros((2, self.band, self.width), dtype=np.float32)
        self.top = 0
        self.sink = sink

    def add(self, r0: int, c0: int, planes: np.ndarray) -> None:
        """Add one window's planes (2, n, m) whose top-left output pixel is (r0, c0)."""
        n, m = planes.shape[1:]
        rr0, cc0 = max(r0, 0), max(c0, 0)
        rr1, cc1 = min(r0 + n, self.height), min(c0 + m, self.width)
        if rr1 <= rr0 or cc1 <= cc0:
            return
        if rr0 < self.top:
            raise RuntimeError(f"window at row {rr0} arrived after row {self.top} was written")
        self.flush(rr0)
        need = rr1 - self.top
        if need > self.band:
            grown = np.zeros((2, need, self.width), dtype=np.float32)
            grown[:, : self.band] = self.acc
            self.acc, self.band = grown, need
        self.acc[:, rr0 - self.top : rr1 - self.top, cc0:cc1] += planes[
            :, rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0
        ]

    def flush(self, upto: int) -> None:
        """Finish every row above ``upto``."""
        upto = min(int(upto), self.height)
        while self.top < upto:
            k = min(upto - self.top, self.band)
            num, den = self.acc[0, :k], self.acc[1, :k]
            covered = den > 0
            prob = np.divide(num, den, out=np.zeros_like(num), where=covered)
            np.clip(prob, 0.0, 1.0, out=prob)
            self.sink(self.top, prob, covered)
            self.acc[:, : self.band - k] = self.acc[:, k:].copy()
            self.acc[:, self.band - k :] = 0.0
            self.top += k

    def close(self) -> None:
        """Finish every remaining row."""
        self.flush(self.height)
