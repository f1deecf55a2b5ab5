"""On-device augmentation: per-image random parameters, reproducible from a generator, identity at zero magnitude.

Slow references below rebuild an op pixel by pixel from the same random draws (a
generator with the same seed), so the batched tensor code is checked against the
formula it implements.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from toolkit.maths.augment import (
    augment,
    make_generator,
    random_affine_grid,
    random_blur,
    random_elastic_offsets,
    random_erase,
    two_views,
)
from toolkit.config import AugmentConfig

OFF = AugmentConfig(
    strength=1.0, rotate_deg=0.0, shear_deg=0.0, scale_min=1.0, scale_max=1.0, translate=0.0,
    elastic_alpha=0.0, elastic_prob=0.0, blur_prob=0.0, erase_prob=0.0, noise_std=0.0,
)


def only(**kw) -> AugmentConfig:
    """Every augmentation off but the ones given."""
    return dataclasses.replace(OFF, **kw)


def digits(n: int = 8, seed: int = 0) -> torch.Tensor:
    """A digit-like batch (n, 1, 28, 28) in [0, 1]: a random blob of strokes away from the border."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 7:21, 9:19] = torch.rand(n, 1, 14, 10, generator=g)
    return x


def same_digit(n: int = 16) -> torch.Tensor:
    return digits(1).expand(n, 1, 28, 28).contiguous()


def _pairwise_min_diff(y: torch.Tensor) -> float:
    flat = y.flatten(1)
    d = (flat[:, None] - flat[None]).abs().amax(-1)
    d.fill_diagonal_(float("inf"))
    return float(d.min())


# --- shapes, dtype, range ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_range(dtype):
    x = digits(8).to(dtype)
    y = augment(x, AugmentConfig(), make_generator(0, "cpu"))
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert torch.isfinite(y).all()


def test_input_is_not_modified():
    x = digits(4)
    before = x.clone()
    augment(x, AugmentConfig(strength=2.0), make_generator(0, "cpu"))
    assert torch.equal(x, before)


def test_strong_augmentation_stays_in_range():
    cfg = AugmentConfig(strength=3.0, noise_std=0.5, erase_prob=1.0, blur_prob=1.0, elastic_prob=1.0)
    y = augment(digits(8), cfg, make_generator(1, "cpu"))
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_batch_of_one_and_other_sizes():
    g = make_generator(0, "cpu")
    assert augment(digits(1), AugmentConfig(), g).shape == (1, 1, 28, 28)
    x = torch.rand(3, 1, 32, 32)
    assert augment(x, AugmentConfig(), g).shape == (3, 1, 32, 32)


# --- identity -------------------------------------------------------------------------------------


def test_strength_zero_is_identity():
    x = digits(4)
    g = make_generator(0, "cpu")
    state = g.get_state()
    assert torch.equal(augment(x, AugmentConfig(strength=0.0), g), x)
    assert torch.equal(g.get_state(), state)  # and draws nothing


def test_all_magnitudes_zero_is_identity_through_grid_sample():
    x = digits(8)
    y = augment(x, OFF, make_generator(0, "cpu"))
    assert y is not x
    # bilinear sampling at the pixel centres, up to float32 rounding of the grid (seen 1.2e-6);
    # a half-pixel misalignment (align_corners mixed up) changes stroke pixels by > 0.1
    torch.testing.assert_close(y, x, atol=1e-4, rtol=0)


def test_zero_alpha_elastic_is_no_offset():
    off = random_elastic_offsets(4, (28, 28), alpha_px=0.0, prob=1.0, g=make_generator(0, "cpu"), device="cpu")
    assert torch.equal(off, torch.zeros_like(off))


def test_identity_grid_is_the_pixel_centres():
    grid = random_affine_grid(2, (28, 28), OFF, make_generator(0, "cpu"), "cpu")
    centres = (torch.arange(28) + 0.5) / 28 * 2 - 1  # align_corners=False: pixel centres in [-1, 1]
    torch.testing.assert_close(grid[0, 5, :, 0], centres)  # x varies along the width
    torch.testing.assert_close(grid[1, :, 7, 1], centres)  # y along the height


# --- per-image randomness (torchvision v2 draws one set per batch) ------------------------------


def test_identical_images_get_different_transforms():
    y = augment(same_digit(16), AugmentConfig(), make_generator(0, "cpu"))
    assert _pairwise_min_diff(y) > 1e-3


@pytest.mark.parametrize("cfg", [
    only(rotate_deg=15.0),
    only(shear_deg=10.0),
    only(scale_min=0.8, scale_max=1.2),
    only(translate=0.1),
    only(elastic_alpha=2.0, elastic_prob=1.0),
    only(noise_std=0.05),
    only(blur_prob=1.0),
    only(erase_prob=1.0),
], ids=["rotate", "shear", "zoom", "translate", "elastic", "noise", "blur", "erase"])
def test_each_op_draws_per_image(cfg):
    # a grey background, so that an erased rectangle or a zoomed-out border always shows
    x = 0.2 + 0.8 * same_digit(8)
    y = augment(x, cfg, make_generator(3, "cpu"))
    flat = y.flatten(1)
    distinct = len({tuple(row.tolist()) for row in flat})
    assert distinct == 8, f"only {distinct} distinct outputs of 8 identical images"


def test_two_views_differ_for_every_image():
    x = digits(16)
    a, b = two_views(x, AugmentConfig(), make_generator(0, "cpu"))
    assert a.shape == b.shape == x.shape
    per_image = (a - b).flatten(1).abs().amax(1)
    assert bool((per_image > 1e-3).all())


def test_same_seed_same_output_other_seed_differs():
    x = digits(8)
    cfg = AugmentConfig()
    a = augment(x, cfg, make_generator(7, "cpu"))
    b = augment(x, cfg, make_generator(7, "cpu"))
    c = augment(x, cfg, make_generator(8, "cpu"))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    va, vb = two_views(x, cfg, make_generator(7, "cpu"))
    assert torch.equal(va, a) and not torch.equal(vb, a)


def test_global_rng_is_not_used():
    x = digits(4)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        a = augment(x, AugmentConfig(), make_generator(1, "cpu"))
        torch.manual_seed(99)
        b = augment(x, AugmentConfig(), make_generator(1, "cpu"))
    assert torch.equal(a, b)


# --- affine ---------------------------------------------------------------------------------------


def _centre_of_mass(x: torch.Tensor) -> torch.Tensor:
    """(n, 1, H, W) -> (n, 2) as (x, y) in pixels."""
    n, _, h, w = x.shape
    ys = torch.arange(h, dtype=x.dtype).view(1, h, 1)
    xs = torch.arange(w, dtype=x.dtype).view(1, 1, w)
    m = x[:, 0].sum((1, 2))
    return torch.stack([(x[:, 0] * xs).sum((1, 2)) / m, (x[:, 0] * ys).sum((1, 2)) / m], 1)


def test_pure_translation_moves_the_centre_of_mass():
    cfg = only(translate=0.1)
    x = digits(16, seed=1).double()
    grid = random_affine_grid(16, (28, 28), cfg, make_generator(5, "cpu"), "cpu")
    identity = random_affine_grid(16, (28, 28), OFF, make_generator(0, "cpu"), "cpu")
    # a pure translation: the grid is the identity plus one constant offset (x, y) per image
    shift = grid[:, 0, 0] - identity[:, 0, 0]
    torch.testing.assert_close(grid - identity, shift.view(16, 1, 1, 2).expand_as(grid))
    # at most translate * side pixels, and different per image, in both directions
    shift_px = shift.double() * 28 / 2
    assert float(shift_px.abs().max()) <= 0.1 * 28 + 1e-6
    assert (shift_px > 0).any() and (shift_px < 0).any()
    # output(p) = input(p + shift): the content moves by -shift
    y = augment(x, cfg, make_generator(5, "cpu"))
    moved = _centre_of_mass(y) - _centre_of_mass(x)
    clear = shift_px.abs() > 0.1
    assert torch.equal(torch.sign(moved)[clear], -torch.sign(shift_px)[clear])
    torch.testing.assert_close(moved, -shift_px, atol=0.02, rtol=0)


def test_translation_of_a_single_pixel_by_whole_pixels():
    # a slow reference: a dot at (row 10, col 12) shifted by exactly (+2, -3) pixels lands at (8, 15)
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 10, 12] = 1.0
    theta = torch.tensor([[[1.0, 0.0, -3 * 2 / 28], [0.0, 1.0, 2 * 2 / 28]]])
    grid = F.affine_grid(theta, (1, 1, 28, 28), align_corners=False)
    y = F.grid_sample(x, grid, align_corners=False)
    assert y[0, 0].nonzero().tolist() == [[8, 15]]


def test_rotation_preserves_distances_and_zoom_scales_them():
    n = 8
    centre_dist = lambda grid: grid.norm(dim=-1)  # noqa: E731 - distance of each sampled point from the centre
    ident = centre_dist(random_affine_grid(n, (28, 28), OFF, make_generator(0, "cpu"), "cpu"))
    rot = random_affine_grid(n, (28, 28), only(rotate_deg=30.0), make_generator(0, "cpu"), "cpu")
    torch.testing.assert_close(centre_dist(rot), ident, atol=1e-5, rtol=0)
    assert (rot - random_affine_grid(n, (28, 28), OFF, make_generator(0, "cpu"), "cpu")).abs().amax() > 0.01
    zoom = random_affine_grid(n, (28, 28), only(scale_min=1.25, scale_max=1.25), make_generator(0, "cpu"), "cpu")
    # zoom 1.25 magnifies: each output pixel samples the input 1/1.25 as far from the centre
    torch.testing.assert_close(centre_dist(zoom), ident / 1.25, atol=1e-5, rtol=0)


def test_zoom_is_log_uniform_within_bounds():
    cfg = only(scale_min=0.8, scale_max=1.25)
    grid = random_affine_grid(4000, (4, 4), cfg, make_generator(0, "cpu"), "cpu")
    ident = random_affine_grid(1, (4, 4), OFF, make_generator(0, "cpu"), "cpu")
    zoom = ident[0, 0, 0, 0] / grid[:, 0, 0, 0]
    assert float(zoom.min()) >= 0.8 - 1e-5 and float(zoom.max()) <= 1.25 + 1e-5
    # log-uniform on [log 0.8, log 1.25], symmetric about 0: half the draws magnify
    assert abs(float((zoom > 1).float().mean()) - 0.5) < 0.04


def test_strength_scales_the_magnitudes():
    g = lambda: make_generator(0, "cpu")  # noqa: E731
    ident = random_affine_grid(4, (28, 28), OFF, g(), "cpu")
    half = random_affine_grid(4, (28, 28), dataclasses.replace(only(translate=0.1), strength=0.5), g(), "cpu") - ident
    full = random_affine_grid(4, (28, 28), only(translate=0.1), g(), "cpu") - ident
    # offsets up to 0.19 (grid units) that differ by float32 rounding of the grid (seen 1.2e-7);
    # ignoring strength would leave them 2x apart (differences ~0.1)
    torch.testing.assert_close(half * 2, full, atol=1e-5, rtol=0)


# --- elastic --------------------------------------------------------------------------------------


def test_elastic_offsets_zero_where_not_drawn():
    off = random_elastic_offsets(64, (28, 28), alpha_px=2.0, prob=0.5, g=make_generator(0, "cpu"), device="cpu")
    assert off.shape == (64, 28, 28, 2)
    drawn = off.flatten(1).abs().amax(1) > 0
    assert 10 < int(drawn.sum()) < 54
    assert torch.equal(off[~drawn], torch.zeros_like(off[~drawn]))
    assert not torch.allclose(off[drawn][0], off[drawn][1])
    none = random_elastic_offsets(4, (28, 28), 2.0, 0.0, make_generator(0, "cpu"), "cpu")
    assert torch.equal(none, torch.zeros_like(none))


def test_elastic_offsets_are_smooth_and_scaled_in_pixels():
    off = random_elastic_offsets(32, (28, 28), alpha_px=3.0, prob=1.0, g=make_generator(0, "cpu"), device="cpu")
    px = off * 28 / 2  # grid units -> pixels
    # neighbouring pixels move together: a coherent warp, not per-pixel noise
    step = (px[:, 1:] - px[:, :-1]).abs().mean()
    assert float(step) < 0.3 * float(px.abs().mean())  # ~0.2; per-pixel noise gives ~1.1
    # magnitude ~ alpha pixels (randn coarse field times alpha)
    assert 0.5 * 3.0 < float(px.std()) < 1.5 * 3.0


# --- blur and erase against slow references -------------------------------------------------------


def _blur_reference(x: torch.Tensor, seed: int, prob: float) -> torch.Tensor:
    """Per image, per pixel: draw sigma and on/off exactly as documented, then a zero-padded 3x3 Gaussian."""
    n, _, h, w = x.shape
    g = torch.Generator().manual_seed(seed)
    sigma = torch.rand(n, generator=g) * 0.5 + 0.5
    on = torch.rand(n, generator=g) < prob
    out = x.clone()
    for i in range(n):
        if not on[i]:
            continue
        k = [math.exp(-(d * d) / (2 * float(sigma[i]) ** 2)) for d in (-1, 0, 1)]
        k = [v / sum(k) for v in k]
        for r in range(h):
            for c in range(w):
                acc = 0.0
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        rr, cc = r + dr, c + dc
                        if 0 <= rr < h and 0 <= cc < w:
                            acc += k[dr + 1] * k[dc + 1] * float(x[i, 0, rr, cc])
                out[i, 0, r, c] = acc
    return out


@pytest.mark.parametrize("prob", [1.0, 0.5])
def test_blur_matches_reference(prob):
    x = torch.rand(6, 1, 9, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = random_blur(x, prob, torch.Generator().manual_seed(4))
    torch.testing.assert_close(y, _blur_reference(x, 4, prob))


def test_blur_keeps_the_mass_of_an_interior_digit():
    x = digits(8)
    y = random_blur(x, 1.0, make_generator(0, "cpu"))
    torch.testing.assert_close(y.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=1e-5, atol=1e-4)
    assert not torch.allclose(y, x)


def _erase_reference(x: torch.Tensor, seed: int, prob: float, max_frac: float = 0.4) -> torch.Tensor:
    n, _, h, w = x.shape
    g = torch.Generator().manual_seed(seed)
    u = [torch.rand(n, generator=g) for _ in range(4)]
    on = torch.rand(n, generator=g) < prob
    out = x.clone()
    for i in range(n):
        # the same float32 arithmetic as the batched code: ceil/floor of u * (high - low) + low
        eh = int(torch.ceil((u[0][i] * (max_frac - 0.1) + 0.1) * h))
        ew = int(torch.ceil((u[1][i] * (max_frac - 0.1) + 0.1) * w))
        top = int(torch.floor(u[2][i] * (h - eh + 1)))
        left = int(torch.floor(u[3][i] * (w - ew + 1)))
        if on[i]:
            for r in range(top, top + eh):
                for c in range(left, left + ew):
                    out[i, :, r, c] = 0.0
    return out


@pytest.mark.parametrize("prob", [1.0, 0.5, 0.0])
def test_erase_matches_reference(prob):
    x = torch.rand(16, 1, 20, 20, generator=torch.Generator().manual_seed(0)) + 0.1
    y = random_erase(x, prob, torch.Generator().manual_seed(2))
    torch.testing.assert_close(y, _erase_reference(x, 2, prob), atol=0, rtol=0)


def test_erase_zeroes_one_rectangle_only_where_drawn():
    x = torch.full((64, 1, 28, 28), 0.7)
    y = random_erase(x, 0.5, make_generator(1, "cpu"))
    zero = y[:, 0] == 0
    erased = zero.flatten(1).any(1)
    assert 16 < int(erased.sum()) < 48  # about half the images
    assert torch.equal(y[~erased], x[~erased])  # the others untouched
    for m in zero[erased]:
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        h, w = len(rows), len(cols)
        # one solid rectangle: its bounding box is all zero, and it fits in the image
        assert int(m.sum()) == h * w
        assert int(rows[-1] - rows[0]) + 1 == h and int(cols[-1] - cols[0]) + 1 == w
        assert math.ceil(0.1 * 28) <= h <= math.ceil(0.4 * 28) and math.ceil(0.1 * 28) <= w <= math.ceil(0.4 * 28)
    # untouched pixels keep their value
    assert torch.equal(y[:, 0][~zero], x[:, 0][~zero])


def test_erase_probability_is_scaled_by_strength_below_one():
    x = torch.full((200, 1, 28, 28), 0.7)
    cfg = only(erase_prob=1.0)
    weak = augment(x, dataclasses.replace(cfg, strength=0.25), make_generator(0, "cpu"))
    frac = float((weak[:, 0] == 0).flatten(1).any(1).float().mean())
    assert 0.1 < frac < 0.4


def test_noise_std_scales():
    x = torch.full((4, 1, 28, 28), 0.5)
    y = augment(x, only(noise_std=0.05), make_generator(0, "cpu"))
    assert abs(float((y - x).std()) - 0.05) < 0.005
    assert abs(float((y - x).mean())) < 0.005


# --- speed and devices -----------------------------------------------------------------------------


def test_a_batch_is_fast_on_cpu():
    import time

    x = torch.rand(512, 1, 28, 28)
    g = make_generator(0, "cpu")
    augment(x, AugmentConfig(), g)
    t0 = time.perf_counter()
    augment(x, AugmentConfig(), g)
    assert time.perf_counter() - t0 < 1.0  # no per-image Python: ~10 ms on one core


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_shapes_and_is_reproducible():
    x = digits(16).cuda()
    a = augment(x, AugmentConfig(), make_generator(0, "cuda"))
    b = augment(x, AugmentConfig(), make_generator(0, "cuda"))
    assert a.is_cuda and a.shape == x.shape
    assert torch.equal(a, b)
    assert _pairwise_min_diff(augment(same_digit(8).cuda(), AugmentConfig(), make_generator(1, "cuda"))) > 1e-3
