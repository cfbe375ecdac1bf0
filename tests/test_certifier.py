"""Certifier: statistical soundness on half-space classifiers with known radius, seeds and noise streams,
batching invariance, and refusal of bad input."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from scipy.stats import kstest
from torch import nn

import oracle
from halfspace import HalfSpace, point_at_distance
from rrcm.engine import Certifier
from rrcm.errors import UserError

SHAPE = (1, 16, 16)
# Triton's interpreter (the triton sampler on the CPU) pays about a microsecond per draw: smaller images there.
SHAPE_OF = {"torch": SHAPE, "triton": (1, 4, 4)}


def halfspace(sampler: str, seed: int) -> HalfSpace:
    return HalfSpace(SHAPE_OF[sampler], seed=seed, centred=sampler == "triton")

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def exact_outcomes(p_a: float, n0: int, n: int, alpha: float, sigma: float, d: float) -> tuple[float, float, float]:
    """(P(false certificate), E[radius], sd[radius]) of CERTIFY on a 2-class problem with P(class 1) = p_a,
    summed over the binomial laws of the selection (odd n0: no ties) and estimation counts, with the radius of
    each count from the oracle (mpmath), not from rrcm.engine.stats."""
    select_1 = float(sum(oracle.binomial_pmf(j, n0, p_a) for j in range(n0 // 2 + 1, n0 + 1)))  # class 1 wins the vote
    # A certificate is false when it is for class 1 beyond d, or for class 0 at all.
    p_false = mean = second = 0.0
    for k in range(n + 1):
        p_lower = oracle.clopper_pearson_lower(k, n, alpha)
        radius = oracle.certified_radius(p_lower, sigma)
        pmf_1, pmf_0 = float(oracle.binomial_pmf(k, n, p_a)), float(oracle.binomial_pmf(k, n, 1 - p_a))
        p_false += select_1 * pmf_1 * (radius > d) + (1 - select_1) * pmf_0 * (p_lower >= 0.5)
        mean += (select_1 * pmf_1 + (1 - select_1) * pmf_0) * radius
        second += (select_1 * pmf_1 + (1 - select_1) * pmf_0) * radius**2
    return p_false, mean, math.sqrt(max(second - mean**2, 0.0))


@pytest.mark.parametrize("p_a, n, alpha", [(0.8, 100, 0.1), (0.65, 200, 0.05)])
def test_false_certificates_at_most_alpha_and_mean_radius_exact(p_a, n, alpha, device, sampler):
    sigma, n0, trials, shape = 0.5, 11, 2000, SHAPE_OF[sampler]
    model = halfspace(sampler, seed=3)
    d = sigma * oracle.normal_quantile(p_a)  # the smoothed classifier's true radius at the point
    x = point_at_distance(model, d)
    certifier = Certifier(model, 2, sigma, batch_size=20_000, device=device, sampler=sampler)
    results = certifier.certify_many(x.expand(trials, *shape), n0, n, alpha, seeds=range(trials))

    prediction = np.array([r.prediction for r in results])
    radius = np.array([r.radius for r in results])
    false = ((prediction == 1) & (radius > d)) | (prediction == 0)
    p_false, mean, sd = exact_outcomes(p_a, n0, n, alpha, sigma, d)
    assert p_false <= alpha
    # 4 standard errors of 2,000 trials: 0.024 at p_false 0.080 (alpha 0.1), 0.017 at 0.036 (alpha 0.05); a false
    # certificate rate of 2 alpha lies 15-20 standard errors out.
    tolerance = 4 * math.sqrt(p_false * (1 - p_false) / trials)
    assert false.mean() <= alpha + tolerance
    assert abs(false.mean() - p_false) <= tolerance, (false.mean(), p_false)
    assert abs(radius.mean() - mean) <= 4 * sd / math.sqrt(trials), (radius.mean(), mean)
    # The estimation counts are Binomial(n, p_a) for the selected class 1.
    hits = np.array([r.counts[1] for r in results])
    assert abs(hits.mean() - n * p_a) <= 4 * math.sqrt(n * p_a * (1 - p_a) / trials)


class Recorder(nn.Module):
    """Two-class logits of pixel-space inputs, remembering every batch it saw."""

    def __init__(self):
        super().__init__()
        self.batches: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.clone())
        s = x.flatten(1).mean(1) - 0.5
        return torch.stack([-s, s], 1)


def noise_of_call(certifier: Certifier, recorder: Recorder, x: torch.Tensor, **kwargs) -> torch.Tensor:
    recorder.batches.clear()
    certifier.certify(x, **kwargs)
    return ((torch.cat(recorder.batches) - x.to(certifier.device)) / certifier.sigma).cpu()


def test_seeds_streams_and_noise_law(device, sampler):
    recorder, shape = Recorder(), SHAPE_OF[sampler]
    certifier = Certifier(recorder, 2, 0.3, batch_size=4000, device=device, sampler=sampler)
    x = torch.rand(shape)
    certifier.check_input(shape)  # the probe forward pass, before recording
    a = noise_of_call(certifier, recorder, x, n0=500, n=1500, alpha=0.01, seed=7)
    assert a.shape == (2000, *shape)
    assert torch.equal(a, noise_of_call(certifier, recorder, x, n0=500, n=1500, alpha=0.01, seed=7))
    assert not torch.equal(a, noise_of_call(certifier, recorder, x, n0=500, n=1500, alpha=0.01, seed=8))
    fresh = noise_of_call(certifier, recorder, x, n0=500, n=1500, alpha=0.01)
    assert not torch.equal(fresh, noise_of_call(certifier, recorder, x, n0=500, n=1500, alpha=0.01))
    # Selection (first 500) and estimation noise are different, uncorrelated streams.
    selection, estimation = a[:500].flatten(), a[500:1000].flatten()
    assert abs(np.corrcoef(selection, estimation)[0, 1]) < 4 / math.sqrt(len(selection))
    # Standard normal noise: mean 0 and variance 1 within sampling error, and the normal law by a KS test.
    assert abs(a.mean().item()) < 4 / math.sqrt(a.numel())
    assert abs(a.var().item() - 1) < 4 * math.sqrt(2 / a.numel())
    assert kstest(a.flatten().double().numpy(), "norm").pvalue > 1e-3


def test_predict_uses_the_estimation_stream_and_is_reproducible(device, sampler):
    model = halfspace(sampler, seed=1)
    certifier = Certifier(model, 2, 0.5, batch_size=1000, device=device, sampler=sampler)
    x = point_at_distance(model, 0.6)
    assert certifier.predict(x, 500, 0.001, seed=3) == certifier.predict(x, 500, 0.001, seed=3) == 1
    assert certifier.predict(point_at_distance(model, 0.0), 500, 1e-6, seed=3) == Certifier.ABSTAIN
    # Identical noise: PREDICT's counts are CERTIFY's estimation counts for the same seed.
    counts = certifier.sample_counts(x[None].to(device), [500], certifier._streams([3], 1))[0]
    assert torch.equal(counts.cpu(), torch.as_tensor(certifier.certify(x, 10, 500, 0.001, seed=3).counts))


@pytest.mark.parametrize("batch_size", [1, 7, 300, 5000])
def test_packing_and_splitting_do_not_change_results(batch_size, device, sampler):
    """certify_many packs pieces of several images into one batch (and splits n into pieces); each image's
    result is still exactly that of certify with its seed. The triton sampler's noise does not depend on
    the batching at all; the torch sampler's does not when pieces are cut the same way."""
    model = halfspace(sampler, seed=2)
    xs = torch.stack([point_at_distance(model, d) for d in (0.05, 0.2, -0.1, 0.4, 0.3)])
    n0, n = 13, 120 if batch_size > 1 else 20
    many = Certifier(model, 2, 0.25, batch_size=batch_size, device=device, sampler=sampler)
    results = many.certify_many(xs, n0, n, 0.01, seeds=[5, 6, 7, 8, 9])
    single = Certifier(model, 2, 0.25, batch_size=300, device=device, sampler=sampler)
    for x, seed, got in zip(xs, [5, 6, 7, 8, 9], results):
        want = single.certify(x, n0, n, 0.01, seed=seed)
        assert got.counts.sum() == n
        if batch_size in (300, 5000) or sampler == "triton":  # the same noise
            assert np.array_equal(got.counts, want.counts) and got.prediction == want.prediction
            assert got.radius == want.radius and got.p_lower == want.p_lower


@pytest.mark.parametrize("sampler, sizes", [("torch", [930, 270]), ("triton", [1000, 200])])
def test_one_forward_per_packed_batch(sampler, sizes):
    recorder = Recorder()
    certifier = Certifier(recorder, 2, 0.25, batch_size=1000, sampler=sampler)
    certifier.check_input(SHAPE)
    recorder.batches.clear()
    certifier.certify_many(torch.rand(12, *SHAPE), 10, 90, 0.01, seeds=range(12))
    # torch: 12 selection pieces of 10 and 9 estimation pieces of 90 fill the first batch; no batch exceeds
    # 1000. triton: draws do not depend on the cut, so batches are filled to the brim.
    assert [len(b) for b in recorder.batches] == sizes


def test_bad_inputs_are_user_errors():
    model = HalfSpace(SHAPE, seed=0)
    certifier = Certifier(model, 2, 0.25, batch_size=100)
    x = torch.rand(SHAPE)
    certifier.certify(x, 10, 10, 0.01, seed=0)  # fixes the input shape
    bad_images = {
        "shape": torch.rand(1, 16, 9), "channels": torch.rand(3, 16, 16), "batch dim": torch.rand(1, *SHAPE),
        "nan": x.clone().index_fill_(1, torch.tensor([2]), float("nan")), "inf": x.clone().fill_(float("inf")),
        "above 1": x + 1.5, "below 0": x - 1.5,
    }
    for name, bad in bad_images.items():
        with pytest.raises(UserError):
            certifier.certify(bad, 10, 10, 0.01)
        with pytest.raises(UserError):
            certifier.predict(bad, 10, 0.01)
    for n0, n, alpha in [(0, 10, 0.01), (10, 0, 0.01), (10, 10, 0.0), (10, 10, 1.0), (10, 10, 1.5), (10, 10, -0.1), (1.5, 10, 0.1)]:
        with pytest.raises(UserError):
            certifier.certify(x, n0, n, alpha)
    with pytest.raises(UserError):
        certifier.certify(x, 10, 10, 0.01, seed=-1)
    with pytest.raises(UserError):
        certifier.certify_many(torch.rand(3, *SHAPE), 10, 10, 0.01, seeds=[1, 2])
    for sigma in (0.0, -0.5, float("nan"), float("inf")):
        with pytest.raises(UserError):
            Certifier(model, 2, sigma)
    with pytest.raises(UserError):
        Certifier(model, 2, 0.25, batch_size=0)
    with pytest.raises(UserError):
        Certifier(model, 1, 0.25)
    with pytest.raises(UserError, match="unknown device 'gpu'"):
        Certifier(model, 2, 0.25, device="gpu")


def test_output_width_checked_with_one_forward():
    from deploy_helpers import SIGMA, tiny_checkpoint
    from rrcm import load_classifier

    classifier = load_classifier(tiny_checkpoint())
    with pytest.raises(UserError, match="10 classes, not 7"):
        Certifier(classifier, 7, SIGMA)
    with pytest.raises(UserError, match="built for sigma 0.25, not 0.5"):
        Certifier(classifier, 10, 0.5)
    # A plain module says nothing: the forward pass at the first call finds the width.
    wide = nn.Sequential(nn.Flatten(), nn.Linear(256, 3))
    with pytest.raises(UserError, match=r"output of shape \(3,\)"):
        Certifier(wide, 2, 0.25).certify(torch.rand(SHAPE), 10, 10, 0.01)
    # A module that cannot take the image at all.
    with pytest.raises(UserError, match="cannot run on inputs"):
        Certifier(wide, 3, 0.25).certify(torch.rand(1, 9, 9), 10, 10, 0.01)
