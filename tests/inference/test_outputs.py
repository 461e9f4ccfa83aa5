"""Resolution checks before a slide is read (histo_wsl.inference.outputs)."""


def test_resolution_warnings():
    from pathlib import Path

    from histo_wsl.inference.outputs import mpp_notes
    from histo_wsl.slideio.slide import Slide, plan_read

    def slide(mpp, downsamples=(1.0,)):
        dims = tuple((int(4000 / d), int(3000 / d)) for d in downsamples)
        return Slide(Path("s.tif"), "s", "generic-tiff", dims, downsamples, mpp, "metadata")

    flat = slide(0.25)
    assert "reduced 8.0×" in mpp_notes(flat, 2.0, plan_read(flat, mpp=2.0))[0]
    pyramid = slide(0.25, (1.0, 2.0, 4.0, 8.0))
    assert mpp_notes(pyramid, 2.0, plan_read(pyramid, mpp=2.0)) == []  # a level fits: no warning
    coarse = slide(1.0)
    assert "coarser" in mpp_notes(coarse, 0.5, plan_read(coarse, mpp=0.5))[0]


def test_overlap_spans_cover_every_source_pixel_an_output_pixel_touches():
    import numpy as np

    from histo_wsl.inference.outputs import overlap_spans

    lo, hi = overlap_spans(4, 2.0, 8, 1.0)  # 2 source pixels per output pixel, aligned
    assert lo.tolist() == [0, 2, 4, 6] and hi.tolist() == [2, 4, 6, 8]
    lo, hi = overlap_spans(3, 1.5, 5, 1.0)  # straddling: [0, 1.5), [1.5, 3), [3, 4.5)
    assert lo.tolist() == [0, 1, 3] and hi.tolist() == [2, 3, 5]
    lo, hi = overlap_spans(4, 0.5, 2, 1.0)  # output finer than the source
    assert lo.tolist() == [0, 0, 1, 1] and hi.tolist() == [1, 1, 2, 2]
    lo, hi = overlap_spans(5, 2.0, 6, 1.0)  # the last output pixel lies past the source's end
    assert lo[-1] == hi[-1] == 6 and np.all(hi >= lo)


def test_output_tissue_keeps_every_output_pixel_that_overlaps_tissue_band_by_band():
    import numpy as np

    from histo_wsl.inference.outputs import OutputTissue

    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) < 0.02  # scattered single tissue pixels
    down, s_out = 3.0, 7.5  # 2.5 mask pixels per output pixel
    shape = (15, 22)
    tissue = OutputTissue(mask, down, shape, s_out)
    whole = tissue.rows(0, shape[0])
    k = s_out / down
    expected = np.zeros(shape, bool)
    for y, x in zip(*np.nonzero(mask), strict=True):  # each tissue pixel's square [x, x+1) * down
        r = np.arange(shape[0])
        c = np.arange(shape[1])
        rows = (r * k < y + 1) & ((r + 1) * k > y)
        cols = (c * k < x + 1) & ((c + 1) * k > x)
        expected |= rows[:, None] & cols[None, :]
    assert (whole == expected).all() and whole.sum() > mask.sum()
    bands = np.concatenate([tissue.rows(r0, 4) for r0 in range(0, shape[0], 4)])
    assert (bands == whole).all()
    assert tissue.rows(shape[0], 4).shape == (0, shape[1])
