"""The engine's samplers: batch plans, per-image Philox streams, fixed-size (padded) steps and the choice of
sampler. Triton runs through its interpreter on the CPU (tests/conftest.py), compiled on a GPU."""
from __future__ import annotations

import pytest
import torch
from scipy.special import ndtr
from scipy.stats import binom

from triton_setup import DEVICE, INTERPRET  # first: it skips the module without triton

from halfspace import HalfSpace, point_at_distance
from rrcm.engine import Certifier
from rrcm.engine.backends import TorchBackend
from rrcm.engine.sampler import PhiloxStream, TritonSampler, make_sampler
from rrcm.errors import UserError
from rrcm.kernels.philox import philox_normal
from rrcm.kernels.triton_counting import count_predictions_triton
from rrcm.kernels.triton_sampling import write_noisy_rows

SHAPE = (1, 3, 5)  # 15 draws a row: rows start off the 4-draw grid
# Interpreted, log and cos are torch's; compiled kernels may use the GPU's approximate ones.
NOISE_ATOL = 1e-5 if INTERPRET else 1e-4

pytestmark = pytest.mark.cuda  # compiled on a GPU (`pytest -m cuda`), interpreted on the CPU


def test_each_row_takes_its_own_stream():
    images = torch.rand(2, *SHAPE).to(DEVICE)
    image_of_row = torch.tensor([1, 0, -1, 1], device=DEVICE)
    starts = torch.tensor([0, 7, 0, 2**33 + 3], device=DEVICE)
    seeds = torch.tensor([11, 12, 0, 2**62 + 5], device=DEVICE)
    out = torch.empty(4, *SHAPE, device=DEVICE)
    write_noisy_rows(out, images, image_of_row, starts, seeds, 0.5, 2.0, -1.0)
    assert out[2].isnan().all()  # a row of no image: padding
    for r in (0, 1, 3):
        z = philox_normal(int(seeds[r]), int(starts[r]), 15).view(SHAPE)
        want = (images[int(image_of_row[r])].cpu() + 0.5 * z) * 2.0 - 1.0
        torch.testing.assert_close(out[r].cpu(), want, rtol=0, atol=NOISE_ATOL)


def test_padding_rows_are_not_counted():
    logits = torch.randn(6, 3, device=DEVICE)
    ids = torch.tensor([0, 1, -1, 1, 2, 0], device=DEVICE)  # -1 and 2 (>= num_images) name no image
    counts = count_predictions_triton(logits, ids, 2)
    want = torch.zeros(2, 3, dtype=torch.int64)
    for i, c in zip([0, 1, 1, 0], logits[[0, 1, 3, 5]].argmax(1).cpu()):
        want[i, c] += 1
    assert torch.equal(counts.cpu(), want)


def _triton_sampler(batch_size: int, static: bool, shape=SHAPE) -> TritonSampler:
    model = HalfSpace(shape, seed=0, centred=True)
    return TritonSampler(TorchBackend(model, DEVICE), 2, 0.5, batch_size, static_batches=static)


def test_plans_pack_streams_and_pad_fixed_size_batches():
    sampler = _triton_sampler(4, static=True)
    streams = [PhiloxStream(7, drawn=3), PhiloxStream(8), PhiloxStream(9)]
    plans = list(sampler.plans([3, 0, 6], streams, chw=15, max_images=2))
    assert [(p.rows, p.images) for p in plans] == [(4, 2), (4, 1), (4, 1)]  # static: every batch full size
    first, second, third = (p.table for p in plans)
    assert first[0].tolist() == [0, 0, 0, 1] and first[3, :2].tolist() == [0, 2]
    assert first[1].tolist() == [45, 60, 75, 0] and first[2].tolist() == [7, 7, 7, 9]
    assert second[0].tolist() == [0, 0, 0, 0] and second[1].tolist() == [15, 30, 45, 60]
    assert third[0].tolist() == [0, -1, -1, -1] and third[1, 0] == 75  # the last one padded
    unpadded = list(_triton_sampler(4, static=False).plans([3, 0, 6], streams, chw=15, max_images=2))
    assert [p.rows for p in unpadded] == [4, 4, 1]


def test_fixed_size_steps_count_what_variable_ones_count():
    """The padded, fixed-size step a CUDA graph replays gives the counts of the plain one: padding is never
    counted, and streams continue where they stopped."""
    images = torch.stack([point_at_distance(HalfSpace(SHAPE, seed=0, centred=True), d) for d in (0.1, -0.2, 0.3)]).to(DEVICE)
    results = []
    for static in (False, True):
        sampler = _triton_sampler(64, static)
        streams = sampler.streams([101, 202, 303])
        first = sampler.counts(images, [100, 7, 50], streams)
        second = sampler.counts(images, [30, 0, 1], streams)
        assert [s.drawn for s in streams] == [130, 7, 51]
        results.append((first.cpu(), second.cpu()))
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert results[0][0].sum(1).tolist() == [100, 7, 50] and results[0][1].sum(1).tolist() == [30, 0, 1]


def test_samplers_draw_the_law_of_the_smoothed_classifier():
    """On a half-space at distance 0.2 with sigma 0.5, each sampler's 100,000 estimation counts of class 1 are
    Binomial(100,000, Phi(0.4)): inside the two-sided 1e-6 quantiles of that law (+-0.72 points), which a noise
    scale 10% off (Phi(0.4 / 1.1), 1.35 points lower) leaves with probability 0.99999."""
    model = HalfSpace(SHAPE, seed=4, centred=True)
    x = point_at_distance(model, 0.2)
    p, n = float(ndtr(0.4)), 100_000
    for name in ("torch", "triton"):
        certifier = Certifier(model, 2, 0.5, batch_size=4000, device=DEVICE, sampler=name)
        counts = certifier.certify(x, 10, n, 0.001, seed=1).counts
        assert binom.ppf(1e-6, n, p) <= counts[1] <= binom.isf(1e-6, n, p), (name, counts[1] / n, p)


def test_choice_of_sampler():
    backend = TorchBackend(HalfSpace(SHAPE), "cpu")
    assert make_sampler(None, backend, 2, 0.5, 10).name == "torch"  # the default off CUDA
    assert make_sampler("torch", backend, 2, 0.5, 10, sound=True).name == "torch"
    for kwargs, message in [({"name": "numpy"}, "unknown sampler"), ({"name": "triton", "sound": True}, "sound"),
                            ({"name": "torch", "cuda_graphs": True}, "CUDA graphs need the triton sampler"),
                            ({"name": "triton", "cuda_graphs": True}, "CUDA graphs need a CUDA device")]:
        name = kwargs.pop("name")
        with pytest.raises(UserError, match=message):
            make_sampler(name, backend, 2, 0.5, 10, **kwargs)
