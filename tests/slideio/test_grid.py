import numpy as np
import pytest

from histo_wsl.errors import InputError
from histo_wsl.slideio.grid import make_grid
from histo_wsl.slideio.slide import open_slide, plan_read


def test_grid_counts_and_coordinates_exact(synthetic_slide):
    with open_slide(synthetic_slide) as s:
        g = make_grid(s, plan_read(s, mpp=0.5), 224, 224)
        assert len(g) == 13 * 8
        assert sorted(set(g.xs.tolist())) == [224 * i for i in range(13)]
        assert sorted(set(g.ys.tolist())) == [224 * i for i in range(8)]
        g2 = make_grid(s, plan_read(s, mpp=1.0), 224, 224)  # 448 level-0 px per patch
        assert len(g2) == 6 * 4 and g2.size_level0 == 448
        assert sorted(set(g2.xs.tolist())) == [448 * i for i in range(6)]
        g3 = make_grid(s, plan_read(s, mpp=0.5), 224, 112)  # 50 % overlap
        assert len(g3) == 25 * 16
        assert (g3.xs + 224 <= 3000).all() and (g3.ys + 224 <= 2000).all()


def test_grid_with_resize_rounds_to_level0_pixels(synthetic_slide):
    with open_slide(synthetic_slide) as s:
        g = make_grid(s, plan_read(s, mpp=0.75), 100, 100)  # 150 level-0 px per patch
    assert g.xs.dtype == np.int64
    assert sorted(set(g.xs.tolist()))[:3] == [0, 150, 300]
    assert (g.xs + 150 <= 3000).all()


def test_patch_larger_than_slide(synthetic_slide):
    with open_slide(synthetic_slide) as s, pytest.raises(InputError, match="more than the slide"):
        make_grid(s, plan_read(s, mpp=4.0), 1024, 1024)


def test_cover_grid_reaches_the_right_and_bottom_edges():
    from pathlib import Path

    from histo_wsl.slideio.grid import cover_grid
    from histo_wsl.slideio.slide import Slide, plan_read

    slide = Slide(Path("s.tif"), "s", "generic-tiff", ((1000, 700),), (1.0,), 0.5, "metadata")
    grid = cover_grid(slide, plan_read(slide, mpp=1.0), 100, 75)  # 200 level-0 px, step 150
    xs, ys = np.unique(grid.xs), np.unique(grid.ys)
    assert xs.tolist() == [0, 150, 300, 450, 600, 750, 800]
    assert ys.tolist() == [0, 150, 300, 450, 500]
    assert len(grid) == len(xs) * len(ys) and (grid.ys[:-1] <= grid.ys[1:]).all()  # row-major
    tiny = Slide(Path("t.png"), "t", "image", ((120, 90),), (1.0,), 0.5, "override")
    one = cover_grid(tiny, plan_read(tiny, mpp=1.0), 100, 75)
    assert one.xs.tolist() == [0] and one.ys.tolist() == [0]
