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
