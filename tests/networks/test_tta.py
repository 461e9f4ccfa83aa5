"""networks/tta.py: flipped views, flipped back and averaged."""

import torch

from histo_wsl.networks.tta import TTA_MODES, flip, flips_mean_map, unflipped_mean


def test_a_map_that_follows_the_image_is_unchanged_by_its_flips():
    x = torch.rand(2, 3, 5, 7)
    torch.testing.assert_close(flips_mean_map(lambda v: v[:, 0], x), x[:, 0])


def test_a_map_fixed_to_the_view_is_averaged_over_the_four_orientations():
    ramp = torch.arange(7.0).expand(2, 5, 7)  # left to right, whatever the view shows
    mean = flips_mean_map(lambda v: ramp, torch.rand(2, 3, 5, 7))
    torch.testing.assert_close(mean, torch.full((2, 5, 7), 3.0))  # (x + 6 - x) / 2
    views = TTA_MODES["flips"]
    assert len(views) == 4 and TTA_MODES["none"] == ((),)
    maps = [flip(ramp, d) for d in views]
    torch.testing.assert_close(unflipped_mean(maps, views), ramp)
    assert unflipped_mean([ramp], ((),)) is ramp
