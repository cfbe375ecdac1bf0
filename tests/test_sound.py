"""Sound sampling: the exact integer CDF table, the sampled law (chi-square), grid-valued model inputs, clipping."""
import mpmath
import numpy as np
import pytest
import torch
from scipy.special import ndtr
from scipy.stats import chisquare

from rrcm.errors import UserError
from rrcm.kernels.sound import (
    GRID, TABLE_BITS, TV_PER_PIXEL, cdf_table, grid_to_model, inverse_cdf, sample_offsets, sound_grid_values,
    sound_noisy_inputs, to_grid,
)

SIGMAS = (0.12, 0.25, 0.5, 1.0)


def discrete_gaussian(sigma: float) -> np.ndarray:
    """P(delta = i / 255), i = -255..255, with the tails folded into the end bins (independent of the module)."""
    edges = (2 * np.arange(-GRID, GRID) + 1) / (510 * sigma)
    return np.diff(np.concatenate([[0.0], ndtr(edges), [1.0]]))


def chi_square_pvalue(counts: np.ndarray, probs: np.ndarray, min_expected: float = 20.0) -> float:
    """Chi-square goodness of fit, with bins of small expected count merged into their central neighbours."""
    expected = probs * counts.sum()
    big = np.nonzero(expected >= min_expected)[0]
    lo, hi = big[0], big[-1]
    merge = lambda x: np.concatenate([[x[:lo + 1].sum()], x[lo + 1:hi], [x[hi:].sum()]])
    return chisquare(merge(counts), merge(expected)).pvalue


@pytest.mark.parametrize("sigma", SIGMAS + (1e-4, 37.0))
def test_table_is_the_cdf_rounded_to_62_bits(sigma):
    table = cdf_table(sigma)
    assert table.dtype == torch.int64 and table.shape == (2 * GRID + 1,)
    assert table[-1] == 2**TABLE_BITS and bool((table[1:] >= table[:-1]).all())
    with mpmath.workprec(256):  # an independent, more precise evaluation through erfc
        for i in range(-GRID, GRID):
            exact = mpmath.erfc(-(2 * i + 1) / (510 * mpmath.mpf(sigma)) / mpmath.sqrt(2)) / 2 * 2**TABLE_BITS
            assert abs(int(table[i + GRID]) - exact) <= 0.5 + 1e-9
    probs = np.diff(np.concatenate([[0], table.numpy()])) / 2.0**TABLE_BITS
    np.testing.assert_allclose(probs, discrete_gaussian(sigma), rtol=0, atol=1e-15)
    assert TV_PER_PIXEL == 510 * 2.0**-63


def test_inverse_cdf_hits_every_bin_exactly_on_its_integer_range():
    sigma = 0.25
    table = cdf_table(sigma)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), table[:-1]])
    nonempty = table > starts
    offsets = torch.arange(-GRID, GRID + 1, dtype=torch.int32)[nonempty]
    assert torch.equal(inverse_cdf(starts[nonempty], sigma), offsets)  # first u of each bin
    assert torch.equal(inverse_cdf(table[nonempty] - 1, sigma), offsets)  # last u of each bin
    assert int(inverse_cdf(torch.tensor([2**TABLE_BITS - 1]), sigma)) == GRID


@pytest.mark.parametrize("sigma", SIGMAS + (1e-4, 0.03, 37.0))
def test_guide_table_gives_the_binary_search_answer(sigma):
    table = cdf_table(sigma)
    u = torch.randint(0, 2**TABLE_BITS, (300_000,), generator=torch.Generator().manual_seed(2), dtype=torch.int64)
    edges = torch.cat([table[:-1] - 1, table[:-1], table[:-1] + 1, torch.tensor([0, 2**TABLE_BITS - 1])])
    u = torch.cat([u, edges.clamp(0, 2**TABLE_BITS - 1)]).view(-1, 2)  # any shape
    expected = torch.searchsorted(table, u.reshape(-1), right=True, out_int32=True).sub_(GRID).view(u.shape)
    assert torch.equal(inverse_cdf(u, sigma), expected)


def test_uniform_integers_use_all_62_bits():
    u = torch.randint(0, 2**TABLE_BITS, (200_000,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    for bits in (u >> (TABLE_BITS - 4), u & 15, (u >> 30) & 15):
        assert chisquare(torch.bincount(bits, minlength=16).numpy()).pvalue > 1e-4


@pytest.mark.parametrize("sigma", SIGMAS)
def test_sampled_offsets_follow_the_discrete_gaussian(sigma):
    offsets = sample_offsets((2_000_000,), sigma, torch.Generator().manual_seed(1), "cpu")
    assert offsets.dtype == torch.int32 and int(offsets.abs().max()) <= GRID
    counts = torch.bincount(offsets + GRID, minlength=2 * GRID + 1).numpy()
    assert chi_square_pvalue(counts, discrete_gaussian(sigma)) > 1e-4
    # the same test rejects a 2% error in sigma: it has the power to catch a wrong table
    assert chi_square_pvalue(counts, discrete_gaussian(sigma * 1.02)) < 1e-8


def test_model_receives_exactly_grid_values():
    images = torch.randint(0, 256, (3, 1, 6, 6), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    repeats = torch.tensor([4, 0, 5])
    scale, shift = 2 / 1.118, -1 / 1.118  # like c_in(t) / std, -c_in(t) * mean / std
    out = sound_noisy_inputs(images, repeats, 0.5, torch.Generator().manual_seed(3), scale, shift)
    values = sound_grid_values(images, repeats, 0.5, torch.Generator().manual_seed(3))
    assert out.dtype == torch.float32 and out.shape == (9, 1, 6, 6) and values.dtype == torch.uint8
    assert torch.equal(out, grid_to_model(values, scale, shift, torch.float32))  # a fixed function of the grid values
    recovered = (out.double() - shift) / scale * 255
    assert (recovered - recovered.round()).abs().max() < 1e-4
    assert torch.equal(recovered.round().to(torch.uint8), values)
    # with a tiny sigma every copy is its own image, so repeats line up
    still = sound_grid_values(images, repeats, 1e-4, torch.Generator().manual_seed(4))
    assert torch.equal(still, torch.repeat_interleave(images, repeats, dim=0))


def test_float_grid_images_are_accepted_and_set_the_dtype():
    images = torch.randint(0, 256, (2, 3, 4, 4), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    for dtype in (torch.float32, torch.float64):
        as_float = images.to(dtype) / 255
        assert torch.equal(to_grid(as_float), images)
        out = sound_noisy_inputs(as_float, torch.tensor([2, 2]), 0.25, torch.Generator().manual_seed(6))
        assert out.dtype == dtype
        assert torch.equal(out, sound_noisy_inputs(images, torch.tensor([2, 2]), 0.25, torch.Generator().manual_seed(6), dtype=dtype))


def test_clipping_at_black_and_white():
    sigma, n = 0.5, 200_000
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1)
    values = sound_grid_values(images, torch.tensor([n, n]), sigma, torch.Generator().manual_seed(7)).flatten().long()
    black, white = values[:n], values[n:]
    at_edge = float(ndtr(1 / (510 * sigma)))  # P(delta <= 0)
    se = (at_edge * (1 - at_edge) / n) ** 0.5
    assert abs((black == 0).float().mean() - at_edge) < 4 * se
    assert abs((white == 255).float().mean() - at_edge) < 4 * se
    above = discrete_gaussian(sigma)[GRID + 1:]  # P(delta = i), i = 1..255: the values above black
    assert chi_square_pvalue(torch.bincount(black, minlength=256).numpy()[1:], above / above.sum()) > 1e-4


def test_same_seed_same_noise():
    images = torch.full((1, 1, 8, 8), 100, dtype=torch.uint8)
    a = sound_noisy_inputs(images, torch.tensor([16]), 0.25, torch.Generator().manual_seed(8))
    b = sound_noisy_inputs(images, torch.tensor([16]), 0.25, torch.Generator().manual_seed(8))
    c = sound_noisy_inputs(images, torch.tensor([16]), 0.25, torch.Generator().manual_seed(9))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("images", [
    torch.full((1, 1, 2, 2), 0.5),  # 127.5: between two grid points
    torch.full((1, 1, 2, 2), float("nan")),
    torch.full((1, 1, 2, 2), 256 / 255),
    torch.full((1, 1, 2, 2), -1 / 255),
    torch.zeros((1, 1, 2, 2), dtype=torch.float16),
    torch.zeros((1, 1, 2, 2), dtype=torch.int32),
])
def test_images_off_the_grid_are_user_errors(images):
    with pytest.raises(UserError):
        sound_noisy_inputs(images, torch.tensor([1]), 0.25, None)


def test_bad_sigma_is_a_user_error():
    for sigma in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(UserError):
            cdf_table(sigma)
