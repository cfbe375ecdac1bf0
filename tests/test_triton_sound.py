"""Triton sound sampler: bit-exact against an independent oracle and the torch path, the (seed, offset) stream,
the sampled law (unclipped).

Compiled on CUDA when there is a GPU, else run on the CPU via TRITON_INTERPRET=1 (tests/conftest.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from triton_setup import DEVICE, INTERPRET, tl, triton  # first: it skips the module without triton

from rrcm.errors import UserError
from rrcm.kernels.philox import philox4x32, philox_uniform62
from rrcm.kernels.sound import GRID, MAX_SIGMA, TABLE_BITS, grid_to_model, inverse_cdf, support
from rrcm.kernels.triton_sound import _search, padded_table, sound_noisy_inputs_triton, write_sound_inputs
from rrcm.schedule import c_in
from test_sound import exact_table, offset_pvalue

pytestmark = pytest.mark.cuda  # compiled on a CUDA GPU (`pytest -m cuda`); interpreted on the CPU elsewhere

SEED = 20250117
SCALE, SHIFT = 2 * c_in(1.0), -c_in(1.0)  # model space at t = 1: c_in * (2 x - 1)


@triton.jit
def _search_probe(out_ptr, u_ptr, cdf_ptr, N: tl.constexpr, STEPS: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out_ptr + i, _search(tl.load(u_ptr + i), cdf_ptr, STEPS))


def _grid_images(k: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, GRID + 1, (k, c, h, w), generator=g, dtype=torch.uint8).to(DEVICE)


def _grid_values(images, repeats, sigma, seed, offset) -> torch.Tensor:
    """The oracle: x + i, unclipped, i the inverse CDF of draws offset.. of the seed's integer stream against
    the table of test_sound.exact_table (256-bit erfc, not the module's); checked against the torch path too."""
    x = torch.repeat_interleave(images.cpu(), torch.tensor(repeats), dim=0).to(torch.int32)
    u = philox_uniform62(seed, offset, x.numel()).view(x.shape)
    i = torch.searchsorted(exact_table(sigma), u.flatten(), right=True, out_int32=True).view(x.shape) - support(sigma)
    assert torch.equal(inverse_cdf(u, sigma), i)  # the torch path draws the same offsets from the same stream
    return x + i


def test_integer_stream_is_two_philox_words_per_draw():
    u = philox_uniform62(SEED, 0, 200_000)
    assert u.dtype == torch.int64 and int(u.min()) >= 0 and int(u.max()) < 2**TABLE_BITS
    for bits in (u >> (TABLE_BITS - 4), u & 15, (u >> 29) & 15, (u >> 31) & 15):  # top, bottom, across the words
        assert chisquare(torch.bincount(bits, minlength=16).numpy()).pvalue > 1e-4
    w = philox4x32(SEED, torch.tensor([5]))
    assert int(philox_uniform62(SEED, 10, 1)) == ((int(w[0]) << 32) | int(w[1])) >> 2
    assert int(philox_uniform62(SEED, 11, 1)) == ((int(w[2]) << 32) | int(w[3])) >> 2
    assert torch.equal(philox_uniform62(SEED, 3, 8), u[3:11])


@pytest.mark.parametrize("sigma", [1e-4, 0.25, 1.0])  # tables of 3, 1277 and 5101 entries
def test_search_is_searchsorted_at_every_bin_edge(sigma):
    table = exact_table(sigma)
    padded, steps = padded_table(sigma, torch.device(DEVICE))
    assert len(padded) == 2**steps - 1 >= len(table) > 2 ** (steps - 1) - 1
    u = torch.cat([table[:-1] - 1, table[:-1], table[:-1] + 1, torch.tensor([0, 1, 2**TABLE_BITS - 1])])
    size = triton.next_power_of_2(len(u))
    u = torch.cat([u.clamp(0, 2**TABLE_BITS - 1), torch.zeros(size - len(u), dtype=torch.int64)])
    out = torch.empty(size, dtype=torch.int32, device=DEVICE)
    _search_probe[(1,)](out, u.to(DEVICE), padded, N=size, STEPS=steps)
    assert torch.equal(out.cpu(), torch.searchsorted(table, u, right=True, out_int32=True))


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("offset", [0, 3, 2**34 - 5])
def test_matches_an_independent_oracle_and_the_torch_path(sigma, offset):
    images, repeats = _grid_images(3, 3, 5, 7), [2, 0, 3]  # 105 draws a row: rows start at odd draws
    out = sound_noisy_inputs_triton(images, torch.tensor(repeats), sigma, SEED, offset, SCALE, SHIFT)
    assert out.dtype == torch.float32 and out.shape == (5, 3, 5, 7) and out.device.type == DEVICE
    expected = grid_to_model(_grid_values(images, repeats, sigma, SEED, offset), SCALE, SHIFT, torch.float32)
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_outputs_round_once_like_torch(dtype):
    images, repeats = _grid_images(2, 3, 8, 8, seed=1), [3, 2]
    out = sound_noisy_inputs_triton(images, repeats, 1.0, SEED, 7, SCALE, SHIFT, dtype)
    values = _grid_values(images, repeats, 1.0, SEED, 7)
    assert int(values.abs().max()) > 256  # beyond the integers bf16 holds: rounding the values first would differ
    # numpy's float32 product and sum, then one rounding to dtype
    in_float32 = values.numpy().astype(np.float32) * np.float32(SCALE / GRID) + np.float32(SHIFT)
    assert out.dtype == dtype and torch.equal(out.cpu(), torch.from_numpy(in_float32).to(dtype))
    assert torch.equal(out.cpu(), grid_to_model(values, SCALE, SHIFT, dtype))  # the torch path on the CPU
    if not INTERPRET:
        assert torch.equal(out, grid_to_model(values.to(DEVICE), SCALE, SHIFT, dtype))


def test_consecutive_calls_never_reuse_a_draw():
    images, repeats = _grid_images(2, 1, 5, 7, seed=2), [3, 3]
    o = 2**33 + 1
    full = sound_noisy_inputs_triton(images, [6, 6], 0.25, SEED, o)
    offset = torch.tensor([o], device=DEVICE)
    first = sound_noisy_inputs_triton(images, repeats, 0.25, SEED, offset)
    assert int(offset) == o + first.numel()
    second = sound_noisy_inputs_triton(images, repeats, 0.25, SEED, offset)
    assert int(offset) == o + 2 * first.numel()
    # two calls of 6 rows are one call of 12 rows, row by row: the draws tile the stream
    rows = torch.repeat_interleave(torch.arange(2), torch.tensor(repeats))
    tiled = torch.empty_like(full)
    write_sound_inputs(tiled, images, torch.cat([rows, rows]).to(DEVICE), 0.25, SEED, o)
    assert torch.equal(torch.cat([first, second]), tiled)
    assert torch.equal(full[:3], first[:3])
    assert torch.equal(sound_noisy_inputs_triton(images, [5, 0], 0.25, SEED, o + 35), full[1:6])
    assert (first != second).float().mean() > 0.5
    assert (sound_noisy_inputs_triton(images, [6, 6], 0.25, SEED + 1, o) != full).float().mean() > 0.5


def test_model_receives_exactly_grid_values():
    images = _grid_images(2, 3, 6, 6, seed=3)
    out = sound_noisy_inputs_triton(images, [4, 4], 0.25, SEED, 11)
    assert out.dtype == torch.float32
    grid = out.double() * GRID
    assert bool((grid - grid.round()).abs().max() < 1e-4) and int(grid.min()) < 0 and int(grid.max()) > GRID
    assert torch.equal(grid.round().cpu().to(torch.int32), _grid_values(images, [4, 4], 0.25, SEED, 11))
    # float images on the grid are the same images; with a tiny sigma each copy is its own image
    assert torch.equal(sound_noisy_inputs_triton(images.float() / GRID, [4, 4], 0.25, SEED, 11), out)
    still = sound_noisy_inputs_triton(images, [2, 1], 1e-4, SEED, 0, dtype=torch.float32)
    copies = torch.repeat_interleave(images, torch.tensor([2, 1], device=DEVICE), dim=0)
    assert torch.equal(still, grid_to_model(copies, dtype=torch.float32))


def test_unknown_images_give_nan_and_empty_batches_work():
    images = _grid_images(2, 3, 4, 4, seed=4)
    out = torch.full((5, 3, 4, 4), float("nan"), device=DEVICE)
    write_sound_inputs(out, images, torch.tensor([1, 2, -1, 0, 1], device=DEVICE), 0.25, SEED, 0)
    assert out[[1, 2]].isnan().all() and not out[[0, 3, 4]].isnan().any()
    empty = sound_noisy_inputs_triton(images, [0, 0], 0.25, SEED, 0, dtype=torch.bfloat16)
    assert empty.shape == (0, 3, 4, 4) and empty.dtype == torch.bfloat16


@pytest.mark.parametrize("sigma, x", [(0.12, 128), (0.5, 40), (1.0, 255)])
def test_sampled_values_follow_the_rounded_gaussian_unclipped(sigma, x):
    image = torch.full((1, 1, 500, 500), x, dtype=torch.uint8, device=DEVICE)
    out = sound_noisy_inputs_triton(image, [4], sigma, SEED, 12345)
    offsets = (out.double() * GRID).round().long().flatten().cpu() - x
    assert offset_pvalue(offsets, sigma) > 1e-4  # values clipped to [0, 255] would fail at (0.5, 40) and (1.0, 255)
    # the same test rejects a 3% error in sigma: it has the power to catch a wrong table
    assert offset_pvalue(offsets, sigma * 1.03) < 1e-8


def test_bad_inputs_raise_user_error():
    images = _grid_images(2, 1, 4, 4)
    good = dict(images=images, repeats=[1, 2], sigma=0.5, seed=1, offset=0)
    for bad in [
        dict(images=images[0]), dict(images=images.float() / GRID + 0.5 / GRID), dict(images=images.float()),
        dict(images=images.to(torch.int32)), dict(images=(images.float() / GRID).half()),
        dict(repeats=[1, 2, 3]), dict(repeats=[1, -1]), dict(sigma=0.0), dict(sigma=-0.1), dict(sigma=float("nan")),
        dict(sigma=float("inf")), dict(sigma=MAX_SIGMA * 1.01), dict(sigma="0.5"), dict(seed=-1), dict(seed=2**64), dict(offset=-3),
        dict(offset=2**62),
        dict(offset=torch.tensor([0.0], device=DEVICE)), dict(scale=float("nan")), dict(dtype=torch.float64),
        dict(dtype=torch.uint8),
    ]:
        with pytest.raises(UserError):
            sound_noisy_inputs_triton(**{**good, **bad})
    rows = torch.zeros(3, dtype=torch.long, device=DEVICE)
    for out, grid_images in [
        (torch.empty(3, 1, 4, 5, device=DEVICE), images),  # shape mismatch
        (torch.empty(3, 1, 4, 4, device=DEVICE), images.float()),  # not grid values
        (torch.empty(3, 1, 4, 4, dtype=torch.float64, device=DEVICE), images),
    ]:
        with pytest.raises(UserError):
            write_sound_inputs(out, grid_images, rows, 0.5, 1, 0)
