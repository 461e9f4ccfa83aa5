"""Window importance maps, the blender and the band canvas (histo_wsl.inference.blending)."""

import math

import numpy as np
import pytest

from histo_wsl.inference.blending import BandCanvas, WindowBlender, importance_map


@pytest.mark.parametrize("mode", ["gaussian", "linear", "constant"])
def test_importance_map_positive_centred_symmetric(mode):
    w = importance_map(64, mode)
    assert w.shape == (64, 64) and w.dtype == np.float32
    assert w.min() > 0 and w.max() == pytest.approx(1.0)
    np.testing.assert_allclose(w, w[::-1], rtol=1e-6)
    np.testing.assert_allclose(w, w.T, rtol=1e-6)
    if mode != "constant":
        assert w[32, 32] > w[32, 0] and w[0, 0] < 0.1


def _blend(size, footprint, stride_out, n_windows, value_fn, mode="gaussian"):
    """Blend a row-major grid of windows whose maps are value_fn(output x, output y)."""
    import torch

    blender = WindowBlender(size, footprint, mode, 0.125, torch.device("cpu"))
    extent = math.ceil(stride_out * (n_windows - 1) + footprint)
    out = np.zeros((extent, extent), np.float32)
    cov = np.zeros((extent, extent), bool)

    def sink(r0, prob, covered):
        out[r0 : r0 + len(prob)] = prob
        cov[r0 : r0 + len(prob)] = covered

    canvas = BandCanvas(extent, extent, blender.n + 2, sink)
    px = (np.arange(size) + 0.5) / size * footprint  # window pixel centres, output units
    for j in range(n_windows):
        for i in range(n_windows):
            ox, oy = i * stride_out, j * stride_out
            values = np.array(value_fn(ox + px[None, :], oy + px[:, None]), dtype=np.float32)
            maps = torch.from_numpy(values)[None]
            planes, r0, c0 = blender(maps, np.array([ox]), np.array([oy]))
            canvas.add(int(r0[0]), int(c0[0]), planes[0])
    canvas.close()
    return out, cov


@pytest.mark.parametrize("mode", ["gaussian", "linear", "constant"])
@pytest.mark.parametrize("footprint,stride", [(16.0, 12.0), (13.7, 9.3), (40.0, 40.0)])
def test_constant_windows_blend_to_a_constant_map_without_seams(mode, footprint, stride):
    out, cov = _blend(64, footprint, stride, 4, lambda x, y: np.full(np.broadcast(x, y).shape, 0.7))
    assert cov[1:-1, 1:-1].all()
    np.testing.assert_allclose(out[cov], 0.7, atol=1e-5)


def test_blending_places_windows_at_their_exact_position():
    # every window shows the same linear ramp of the output x coordinate: the blend is that ramp
    out, cov = _blend(
        64, 13.7, 9.3, 4, lambda x, y: np.broadcast_to(x / 50.0, np.broadcast(x, y).shape)
    )
    rows, cols = np.nonzero(cov)
    inner = (cols > 1) & (cols < out.shape[1] - 2)
    expected = (cols[inner] + 0.5) / 50.0
    np.testing.assert_allclose(out[rows[inner], cols[inner]], expected, atol=0.01)


def test_band_canvas_refuses_windows_out_of_row_order():
    canvas = BandCanvas(50, 50, 10, lambda *a: None)
    canvas.add(20, 0, np.ones((2, 5, 5), np.float32))
    with pytest.raises(RuntimeError):
        canvas.add(3, 0, np.ones((2, 5, 5), np.float32))
