"""Triton sampler and counter: compiled on CUDA when there is a GPU, else on the CPU via TRITON_INTERPRET=1.

Statistical checks use fixed seeds and 5-sigma bounds (a false alarm below 1e-6 per check for a
correct generator); the KS test rejects at p < 1e-3.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from triton_setup import DEVICE, INTERPRET, tl, triton  # first: it skips the module without triton

from rrcm.errors import UserError
from rrcm.kernels import count_predictions, noisy_inputs
from rrcm.kernels.philox import philox4x32, philox_normal
from rrcm.schedule import c_in
from rrcm.kernels.triton_counting import count_predictions_triton
from rrcm.kernels.triton_sampling import noisy_inputs_triton, write_noisy_inputs

pytestmark = pytest.mark.cuda  # compiled on a CUDA GPU (`pytest -m cuda`); interpreted on the CPU elsewhere

SEED = 20250117
# The interpreter evaluates log and cos like torch; compiled kernels may use the GPU's approximate ones.
NOISE_ATOL = 1e-5 if INTERPRET else 1e-4


@triton.jit
def _philox_probe(words_ptr, normals_ptr, seed, counters_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    c = tl.load(counters_ptr + i)
    w0, w1, w2, w3 = tl.randint4x(seed, c)
    tl.store(words_ptr + 4 * i, w0.to(tl.int32, bitcast=True))
    tl.store(words_ptr + 4 * i + 1, w1.to(tl.int32, bitcast=True))
    tl.store(words_ptr + 4 * i + 2, w2.to(tl.int32, bitcast=True))
    tl.store(words_ptr + 4 * i + 3, w3.to(tl.int32, bitcast=True))
    tl.store(normals_ptr + i, tl.randn(seed, c))


def _images(k: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(k, c, h, w, generator=g).to(DEVICE)


def _noise(out: torch.Tensor, images: torch.Tensor, repeats: list[int], sigma=1.0, scale=1.0, shift=0.0):
    """z recovered from an output in float64: the inverse of the affine map both sampling paths share."""
    x = torch.repeat_interleave(images.cpu().double(), torch.tensor(repeats), dim=0)
    return (((out.cpu().double() - shift) / scale - x) / sigma).flatten()


def test_reference_stream_is_tritons_philox():
    counters = torch.tensor([0, 1, 2, 3, 5, 77, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**33 + 5,
                             2**40 + 3, 2**52 - 1, 2**60 + 12345, 2**62 - 7], device=DEVICE)
    words = torch.empty(16 * 4, dtype=torch.int32, device=DEVICE)
    normals = torch.empty(16, dtype=torch.float32, device=DEVICE)
    _philox_probe[(1,)](words, normals, SEED, counters, N=16)
    expected = torch.stack(philox4x32(SEED, counters.cpu()), dim=1).flatten()
    assert torch.equal(words.cpu().long() & 0xFFFFFFFF, expected)
    # tl.randn(seed, c) is lane 0 of counter c, i.e. draw 4c of the stream.
    lane0 = torch.stack([philox_normal(SEED, 4 * int(c), 1)[0] for c in counters.cpu()])
    torch.testing.assert_close(normals.cpu(), lane0, rtol=0, atol=NOISE_ATOL)


@pytest.mark.parametrize("offset", [0, 3, 2**34 - 5])
def test_noise_is_the_seed_offset_stream(offset):
    images, repeats = _images(3, 1, 5, 7), [2, 0, 3]  # 35 draws a row: rows start off the 4-draw grid
    out = noisy_inputs_triton(images, torch.tensor(repeats), 1.0, SEED, offset)
    z = _noise(out, images, repeats)
    torch.testing.assert_close(z, philox_normal(SEED, offset, z.numel()).double(), rtol=0, atol=NOISE_ATOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_affine_part_matches_the_torch_path(dtype):
    images, repeats = _images(3, 3, 6, 6, seed=1), [4, 1, 3]
    c = c_in(1.0)  # model space at t = 1 is c_in * (2 x - 1)
    scale, shift, sigma = 2 * c, -c, 0.5
    rep = torch.tensor(repeats, device=DEVICE)
    # No noise: the two paths compute the same affine map of x, row to image map and cast included.
    torch.testing.assert_close(
        noisy_inputs_triton(images, rep, 0.0, SEED, 0, scale, shift, dtype),
        noisy_inputs(images, rep, 0.0, None, scale, shift, dtype),
    )
    # With noise, the same inverse recovers each path's own draws.
    out = noisy_inputs_triton(images, rep, sigma, SEED, 17, scale, shift, dtype)
    assert out.dtype == dtype and out.shape == (8, 3, 6, 6) and out.is_contiguous()
    tol = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype] * 10 / (scale * sigma) + NOISE_ATOL
    z = philox_normal(SEED, 17, out.numel()).double()
    torch.testing.assert_close(_noise(out, images, repeats, sigma, scale, shift), z, rtol=0, atol=tol)
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    ref = noisy_inputs(images, rep, sigma, gen, scale, shift, dtype)
    z_torch = torch.randn(ref.shape, generator=torch.Generator(device=DEVICE).manual_seed(5), device=DEVICE)
    torch.testing.assert_close(_noise(ref, images, repeats, sigma, scale, shift), z_torch.cpu().double().flatten(), rtol=0, atol=tol)


def test_consecutive_calls_tile_the_stream_and_overlaps_reproduce():
    image = _images(1, 1, 5, 7, seed=2)
    o = 2**33 + 1
    full = noisy_inputs_triton(image, [6], 0.3, SEED, o)
    head = noisy_inputs_triton(image, [2], 0.3, SEED, o)
    tail = noisy_inputs_triton(image, [4], 0.3, SEED, o + head.numel())
    assert torch.equal(torch.cat([head, tail]), full)
    assert torch.equal(noisy_inputs_triton(image, [5], 0.3, SEED, o + 35), full[1:])
    # A device offset is read by the kernel and advanced by the draws used, ready for the next call.
    offset = torch.tensor([o], device=DEVICE)
    assert torch.equal(noisy_inputs_triton(image, [2], 0.3, SEED, offset), head)
    assert int(offset) == o + head.numel()
    assert torch.equal(noisy_inputs_triton(image, [4], 0.3, SEED, offset), tail)
    assert int(offset) == o + full.numel()
    other_seed = noisy_inputs_triton(image, [6], 0.3, SEED + 1, o)
    assert (other_seed == full).float().mean() < 0.01


def test_every_element_is_written_and_unknown_images_give_nan():
    images = _images(2, 3, 4, 4, seed=3)
    out = torch.full((5, 3, 4, 4), float("nan"), device=DEVICE)
    write_noisy_inputs(out, images, torch.tensor([1, 0, 1, 1, 0], device=DEVICE), 0.25, SEED, 0)
    assert not out.isnan().any()
    write_noisy_inputs(out, images, torch.tensor([1, 2, -1, 0, 1], device=DEVICE), 0.25, SEED, 0)
    assert out[[1, 2]].isnan().all() and not out[[0, 3, 4]].isnan().any()
    empty = noisy_inputs_triton(images, [0, 0], 0.25, SEED, 0, dtype=torch.bfloat16)
    assert empty.shape == (0, 3, 4, 4) and empty.dtype == torch.bfloat16


def _lag_corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_noise_is_standard_normal_and_uncorrelated():
    images, repeats = _images(2, 3, 64, 64, seed=4), [8, 8]
    out = noisy_inputs_triton(images, repeats, 1.0, SEED, 12345)
    z = _noise(out, images, repeats).numpy()
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.skew(z)) < 5 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(z, fisher=False) - 3) < 5 * math.sqrt(24 / n)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    rows = z.reshape(16, -1)
    for lag in (1, 2, 3, 4, 5):  # within a row: Box-Muller pairs, Philox lanes and neighbouring counters
        assert abs(_lag_corr(rows[:, :-lag], rows[:, lag:])) < 5 / math.sqrt(rows[:, lag:].size)
    assert abs(_lag_corr(rows[:-1], rows[1:])) < 5 / math.sqrt(rows[1:].size)  # the same pixel in neighbouring rows
    assert abs(_lag_corr(rows[7], rows[8])) < 5 / math.sqrt(rows.shape[1])  # across the two images
    other = _noise(noisy_inputs_triton(images, repeats, 1.0, SEED + 1, 12345), images, repeats).numpy()
    assert abs(_lag_corr(z, other)) < 5 / math.sqrt(n)  # another seed, same offsets


def test_bad_inputs_raise_user_error():
    images = _images(2, 1, 4, 4)
    good = dict(images=images, repeats=[1, 2], sigma=0.5, seed=1, offset=0)
    for bad in [
        dict(images=images[0]), dict(repeats=[1, 2, 3]), dict(repeats=[1, -1]), dict(repeats=torch.tensor([0.5, 1.0])),
        dict(sigma=float("nan")), dict(sigma=-0.1), dict(seed=-1), dict(seed=2**64), dict(offset=-3),
        dict(offset=torch.tensor([0.0], device=DEVICE)), dict(offset=torch.tensor([1, 2], device=DEVICE)),
        dict(scale=float("inf")), dict(dtype=torch.int8), dict(images=images.to(torch.int64)),
    ]:
        with pytest.raises(UserError):
            noisy_inputs_triton(**{**good, **bad})
    with pytest.raises(UserError):
        write_noisy_inputs(torch.empty(3, 1, 4, 5, device=DEVICE), images, torch.zeros(3, dtype=torch.long, device=DEVICE), 0.5, 1, 0)


@pytest.mark.parametrize("num_classes", [10, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_counts_match_torch_and_accumulate(num_classes, dtype):
    g = torch.Generator().manual_seed(num_classes)
    wide = torch.randn(96, num_classes + 5, generator=g).to(dtype)
    wide[3, :] = 1.0  # a tie: the lowest class wins
    wide[4, 7] = float("nan")
    logits = wide[:, :num_classes].to(DEVICE)  # rows further apart than their length
    ids = torch.randint(0, 3, (96,), generator=g).to(DEVICE)  # image 3 of 4 gets no rows
    counts = count_predictions_triton(logits, ids, 4)
    expected = count_predictions(logits, ids, 4)
    assert torch.equal(counts, expected) and counts[3].sum() == 0 and counts.sum() == 96
    count_predictions_triton(logits.flip(0), ids, 4, counts)
    assert torch.equal(counts, expected + count_predictions(logits.flip(0), ids, 4))
    with pytest.raises(UserError):
        count_predictions_triton(logits, ids, 4, torch.zeros(4, num_classes, dtype=torch.int32, device=DEVICE))


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs need a GPU")
def test_graph_replays_draw_fresh_noise_and_accumulate_counts():
    image = _images(1, 3, 8, 8, seed=6)
    rows = torch.zeros(4, dtype=torch.long, device=DEVICE)
    out = torch.empty(4, 3, 8, 8, device=DEVICE)
    offset = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    counts = torch.zeros(1, 192, dtype=torch.int64, device=DEVICE)

    def step():
        write_noisy_inputs(out, image, rows, 0.5, SEED, offset)
        count_predictions_triton(out.flatten(1), rows, 1, counts)

    step()  # compile and load the kernels before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    offset.zero_(), counts.zero_()
    graph.replay()
    first = out.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(first, noisy_inputs_triton(image, [4], 0.5, SEED, 0))
    assert torch.equal(out, noisy_inputs_triton(image, [4], 0.5, SEED, out.numel()))
    assert int(offset) == 2 * out.numel()
    expected = count_predictions(first.flatten(1), rows, 1) + count_predictions(out.flatten(1), rows, 1)
    assert torch.equal(counts, expected)
