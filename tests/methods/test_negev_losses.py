import pytest
import torch

from histo_wsl.methods.negev_losses import (
    IGNORE,
    SeedSampler,
    crf_loss,
    crf_window,
    negative_loss,
    otsu_thresholds,
    seed_loss,
    size_loss,
    size_t_at,
)


def _cams(b=4, h=32, w=32):
    cams = torch.zeros(b, h, w)
    cams[:, 8:16, 8:16] = 1.0  # the top of the CAM: a square of ones
    cams[:, 16:24, :] = 0.3
    return cams


def test_counts_without_dilation():
    seeds = SeedSampler(n_fg=5, n_bg=7, ksize=1)(_cams(), torch.Generator().manual_seed(0))
    assert ((seeds == 1).sum((1, 2)) <= 5).all() and ((seeds == 0).sum((1, 2)) <= 7).all()
    # overlap is only possible on the same pixel: counts are exact unless fg and bg coincide
    assert (seeds == 1).sum() + (seeds == 0).sum() >= 4 * 12 - 8


def test_dilation_makes_k_by_k_squares():
    cams = torch.zeros(1, 31, 31)
    cams[0, 15, 15] = 1.0  # almost all fg weight on one pixel
    seeds = SeedSampler(n_fg=1, n_bg=1, ksize=5, bg_sampler="proportional")(
        cams, torch.Generator().manual_seed(1)
    )
    fg = (seeds[0] == 1).nonzero()
    assert len(fg) == 25 and fg[:, 0].min() == 13 and fg[:, 0].max() == 17
    assert (seeds[0] == 0).sum() in (25, 15, 20, 10, 9, 12, 16)  # a 5x5 square, cut at the border


def test_fg_bg_overlap_is_dropped():
    cams = torch.full((1, 3, 3), 0.5)
    seeds = SeedSampler(n_fg=9, n_bg=9, ksize=1, bg_sampler="uniform")(
        cams, torch.Generator().manual_seed(0)
    )
    assert (seeds == IGNORE).all()  # every pixel drawn by both: none kept


def test_proportional_sampler_never_draws_background_from_the_top():
    cams = _cams(b=64)
    for s in range(5):
        seeds = SeedSampler(n_fg=1, n_bg=20, ksize=1, bg_sampler="proportional")(
            cams, torch.Generator().manual_seed(s)
        )
        assert not (seeds[:, 8:16, 8:16] == 0).any()
    lowest = SeedSampler(n_fg=1, n_bg=20, ksize=1, bg_sampler="lowest", low_fraction=0.2)(
        cams, torch.Generator().manual_seed(0)
    )
    assert (cams[lowest == 0] == 0).all()  # only zero-CAM pixels are among the lowest 20 %
    uniform = SeedSampler(n_fg=1, n_bg=200, ksize=1, bg_sampler="uniform")(
        cams, torch.Generator().manual_seed(0)
    )
    assert (uniform[:, 8:16, 8:16] == 0).any()  # the original code's effective sampler does


def test_foreground_follows_the_cam():
    cams = _cams(b=256)
    seeds = SeedSampler(n_fg=1, n_bg=1, ksize=1)(cams, torch.Generator().manual_seed(3))
    inside = (seeds[:, 8:16, 8:16] == 1).sum().item()
    # weights: 64 px at 1.0, 256 px at 0.3, the rest ~0 -> P(top square) = 64 / (64 + 76.8)
    assert inside / 256 == pytest.approx(64 / 140.8, abs=0.1)


def test_seeded_draws_are_reproducible():
    a = SeedSampler(n_fg=3, n_bg=3, ksize=3)(_cams(), torch.Generator().manual_seed(7))
    b = SeedSampler(n_fg=3, n_bg=3, ksize=3)(_cams(), torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_losses():
    logits = torch.zeros(2, 2, 4, 4, requires_grad=True)
    seeds = torch.full((2, 4, 4), IGNORE, dtype=torch.long)
    assert seed_loss(logits, seeds).item() == 0.0
    seeds[0, 0, 0] = 1
    assert seed_loss(logits, seeds).item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert negative_loss(logits).item() == pytest.approx(0.6931, abs=1e-4)
    confident = torch.zeros(1, 2, 4, 4)
    confident[:, 0] = 10.0
    assert negative_loss(confident).item() < 1e-3
    with pytest.raises(ValueError):
        SeedSampler(ksize=2)(_cams())


def test_static_seeds_are_the_cam_extremes_and_ignore_the_rng():
    cams = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    cams[1] = 0.5  # a flat CAM: ties go to the lowest row-major index
    runs = [
        SeedSampler(n_fg=1, n_bg=1, ksize=1, mode="static")(cams, torch.Generator().manual_seed(s))
        for s in (0, 1)
    ]
    torch.manual_seed(123)
    runs.append(SeedSampler(n_fg=1, n_bg=1, ksize=1, mode="static")(cams))
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    seeds = runs[0]
    for i in (0, 2):
        flat = cams[i].flatten()
        assert (seeds[i].flatten() == 1).nonzero().flatten().tolist() == [int(flat.argmax())]
        assert (seeds[i].flatten() == 0).nonzero().flatten().tolist() == [int(flat.argmin())]
    assert (seeds[1] == IGNORE).all()  # fg and bg both pick pixel 0 of the flat CAM: dropped
    top = SeedSampler(n_fg=5, n_bg=0, ksize=1, mode="static")(cams[:1])
    assert set((top[0].flatten() == 1).nonzero().flatten().tolist()) == set(
        cams[0].flatten().topk(5).indices.tolist()
    )
    assert not (top == 0).any()  # n_bg = 0: no background seed (C+ only)
    dilated = SeedSampler(n_fg=1, n_bg=1, ksize=3, mode="static")(cams[:1])
    assert (dilated == 1).sum() in (4, 6, 9) and (dilated == 0).sum() in (4, 6, 9)


def test_size_term_keeps_both_regions_non_empty():
    def logits(fg_fraction: float) -> torch.Tensor:
        p = torch.full((2, 1, 8, 8), fg_fraction).clamp(1e-6, 1 - 1e-6)
        return torch.cat([torch.zeros_like(p), torch.log(p / (1 - p))], 1)

    t = 5.0
    empty, small, half = (size_loss(logits(f), t).item() for f in (0.0, 0.1, 0.5))
    assert empty > small > half > 0
    assert size_loss(logits(1.0), t).item() == pytest.approx(empty, rel=1e-3)  # symmetric
    # at t = 1 (the paper's t0) both linear branches sum to a constant: no push at all
    assert size_loss(logits(0.0), 1.0).item() == pytest.approx(size_loss(logits(0.5), 1.0).item())
    # an almost foreground-free map (0.5 %, on the barrier's linear branch) gets a finite
    # non-zero gradient, and descent makes the foreground grow
    x = logits(0.005).clone().requires_grad_(True)
    opt = torch.optim.SGD([x], lr=50.0)
    first = size_loss(x, t)
    first.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for _ in range(10):
        opt.zero_grad()
        loss = size_loss(x, t)
        loss.backward()
        opt.step()
    assert loss.item() < first.item() and torch.softmax(x, 1)[:, 1].mean() > 0.0055
    assert size_loss(torch.zeros(0, 2, 4, 4), t).item() == 0.0
    assert [size_t_at(1.0, 10.0, 1.01, e) for e in (1, 2)] == [1.0, 1.01]
    assert size_t_at(1.0, 10.0, 1.01, 1000) == 10.0


def test_otsu_thresholds_split_a_two_level_cam():
    flat = torch.zeros(2, 100)
    flat[0, :30] = 0.8
    flat[1, :60] = 0.4
    t = otsu_thresholds(flat)
    assert t.shape == (2, 1)
    # levels 204 and 102 against 0: the high level is foreground
    assert 0 <= t[0, 0] < 204 and 0 <= t[1, 0] < 102


def test_otsu_sampler_draws_foreground_only_inside_the_eroded_region():
    cams = torch.zeros(4, 40, 40)
    cams[:, 5:30, 5:30] = 0.9  # Otsu region: the 25×25 square; eroded by 11: rows/cols 10..24
    cams[:, 12:14, 12:14] = 1.0
    for s in range(3):
        seeds = SeedSampler(
            n_fg=30, n_bg=30, ksize=1, fg_sampler="otsu", fg_erode=11, bg_sampler="lowest"
        )(cams, torch.Generator().manual_seed(s))
        fg = (seeds == 1).nonzero()
        assert len(fg) == 4 * 30
        assert fg[:, 1:].min() >= 10 and fg[:, 1:].max() <= 24
        assert (cams[seeds == 0] == 0).all()


def test_otsu_sampler_falls_back_when_erosion_empties_the_region():
    cams = torch.zeros(1, 20, 20)
    cams[0, 3:6, 3:6] = 1.0  # a 3×3 region that an 11×11 erosion removes
    seeds = SeedSampler(n_fg=5, n_bg=0, ksize=1, fg_sampler="otsu", fg_erode=11)(cams)
    fg = (seeds[0] == 1).nonzero()
    assert len(fg) == 5 and fg.min() >= 3 and fg.max() <= 5
    with pytest.raises(ValueError):
        SeedSampler(fg_sampler="top")(cams)
    with pytest.raises(ValueError):
        SeedSampler(fg_sampler="otsu", fg_erode=4)(cams)


def _two_colour_image(size=32):
    img = torch.zeros(1, 3, size, size)
    img[:, :, :, size // 2 :] = 255.0  # left half black, right half white
    return img


def _split_logits(column, size=32, strength=20.0):
    """Logits whose foreground is every pixel right of ``column`` (a sharp split)."""
    fg = torch.zeros(1, size, size)
    fg[:, :, column:] = 1.0
    return torch.stack([(1 - fg) * strength, fg * strength], dim=1)


def test_crf_loss_prefers_a_cut_along_the_colour_edge():
    img = _two_colour_image()
    uniform = crf_loss(_split_logits(32), img, sigma_xy=2.0, scale=1.0)  # one label everywhere
    along_edge = crf_loss(_split_logits(16), img, sigma_xy=2.0, scale=1.0)
    across_colour = crf_loss(_split_logits(8), img, sigma_xy=2.0, scale=1.0)
    assert uniform.item() == pytest.approx(0.0, abs=1e-6)
    assert along_edge.item() < 1e-6  # neighbours across the edge differ in colour: weight ≈ 0
    assert across_colour.item() > 1e-3  # cutting a uniform region costs
    assert 0.0 <= across_colour.item() <= 1.0


def test_crf_loss_gradient_pulls_neighbours_together():
    img = torch.full((1, 3, 16, 16), 128.0)  # one colour: every neighbour pair counts
    logits = torch.zeros(1, 2, 16, 16)
    logits[:, 1, :, :8] = 3.0  # left half leans foreground, right half background
    logits.requires_grad_(True)
    before = crf_loss(logits, img, sigma_xy=2.0, scale=0.5)
    before.backward()
    with torch.no_grad():
        after = crf_loss(logits - 10.0 * logits.grad, img, sigma_xy=2.0, scale=0.5)
    assert logits.grad.abs().sum() > 0 and after < before
    assert crf_loss(torch.zeros(0, 2, 8, 8), torch.zeros(0, 3, 8, 8)).item() == 0.0


def test_crf_window_spans_two_sigmas():
    assert crf_window(8.0, 0.25) == 9 and crf_window(2.0, 1.0) == 9 and crf_window(0.1, 0.25) == 3
