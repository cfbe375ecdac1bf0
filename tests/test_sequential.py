"""Anytime-valid certification at a radius: the statistic, its thresholds, the exact DP, and soundness end to end."""
import math

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.special import ndtr, ndtri
from scipy.stats import beta as beta_dist

from halfspace import GaussianSampler, HalfSpace
from rrcm.engine.sequential import (
    BetaBinomialTest, Decision, RadiusDecision, certify_radius, check_times, expected_samples, false_certify_probability,
    operating_characteristics,
)
from rrcm.errors import UserError
from rrcm.kernels import count_predictions, noisy_inputs

P0_GRID = (0.55, 0.69, 0.84, 0.95, 0.99)


def three_se(rate: float, runs: int) -> float:
    return 3 * math.sqrt(rate * (1 - rate) / runs)


def simulate(test: BetaBinomialTest, hits_of_batch, runs: int, max_samples: int, batch: int):
    """Many independent runs of the batched sequential procedure sharing each step; hits_of_batch(idx) gives the
    hits of one batch for the alive runs idx. Returns (certified, stopped, samples) arrays."""
    h = np.zeros(runs, np.int64)
    samples = np.full(runs, max_samples)
    outcome = np.full(runs, int(Decision.CONTINUE))
    alive = np.arange(runs)
    for t in range(batch, max_samples + 1, batch):
        h[alive] += hits_of_batch(alive)
        codes = test.decide_array(t, h[alive])
        done = codes != Decision.CONTINUE
        outcome[alive[done]], samples[alive[done]] = codes[done], t
        alive = alive[~done]
    return outcome == Decision.CERTIFIED, outcome == Decision.NOT_CERTIFIED, samples


# --- the statistic ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t,h", [(10, 8), (200, 160), (1000, 640), (1000, 700)])
def test_log_e_value_is_the_beta_mixture_likelihood_ratio(t, h):
    p0 = 0.69
    test = BetaBinomialTest(p0, 0.01)
    log_max = h * math.log(h / t) + (t - h) * math.log1p(-h / t)
    integrand = lambda q: math.exp(h * math.log(q) + (t - h) * math.log1p(-q) - log_max) * beta_dist.pdf(q, 0.5, 0.5)
    mixture, _ = integrate.quad(integrand, 0, 1, points=[h / t], epsabs=0, epsrel=1e-10, limit=200)
    expected = math.log(mixture) + log_max - h * math.log(p0) - (t - h) * math.log1p(-p0)
    assert test.log_e_value(t, h) == pytest.approx(expected, abs=1e-7)


def test_mirrored_statistic_counts_failures_against_one_minus_p0():
    test = BetaBinomialTest(0.8, 0.01, 0.01, a=0.7, b=2.0)
    swapped = BetaBinomialTest(0.2, 0.01, 0.01, a=0.7, b=2.0)
    t, h = np.arange(1, 500), np.arange(1, 500) // 3
    np.testing.assert_allclose(test.log_e_value_mirrored(t, h), swapped.log_e_value(t, t - h))
    jeffreys = BetaBinomialTest(0.8, 0.01, 0.01)
    np.testing.assert_allclose(jeffreys.log_e_value_mirrored(t, h), jeffreys.log_e_value(t, h))


def test_decisions_need_the_right_side_of_p0():
    test = BetaBinomialTest(0.69, alpha=1e-3, beta=0.1)
    assert test.decide(0, 0) == Decision.CONTINUE
    assert test.decide(100, 0) == Decision.NOT_CERTIFIED
    assert test.decide(100, 100) == Decision.CERTIFIED
    # all hits: the two-sided statistic passes ln(1/beta) long before ln(1/alpha), yet this is never a stop
    codes = [test.decide(t, t) for t in range(1, 100)]
    assert Decision.NOT_CERTIFIED not in codes and codes[0] == Decision.CONTINUE and codes[-1] == Decision.CERTIFIED
    # a certificate at exactly h = p0 t is impossible: ln E <= 0 there
    assert test.log_e_value(100, 69) <= 0


@pytest.mark.parametrize("p0,alpha,beta", [(0.55, 0.05, 1e-3), (0.84, 1e-3, 1e-2), (0.99, 0.01, 1e-3), (0.7, 0.2, None)])
def test_boundaries_agree_with_decide_everywhere(p0, alpha, beta):
    test = BetaBinomialTest(p0, alpha, beta)
    t_max = 1500
    t, h = np.meshgrid(np.arange(t_max + 1), np.arange(t_max + 1), indexing="ij")
    valid = h <= t
    codes = test.decide_array(t[valid], h[valid])
    stop, certify = test.boundaries(np.arange(t_max + 1))
    from_thresholds = np.where(h >= certify[:, None], Decision.CERTIFIED,
                               np.where(h <= stop[:, None], Decision.NOT_CERTIFIED, Decision.CONTINUE))[valid]
    np.testing.assert_array_equal(codes, from_thresholds)
    assert (codes == Decision.CERTIFIED).any()


def test_bad_parameters_are_user_errors():
    for kwargs in (dict(p0=1.0, alpha=0.1), dict(p0=0.6, alpha=0.0), dict(p0=0.6, alpha=0.1, beta=1.5), dict(p0=0.6, alpha=0.1, a=0)):
        with pytest.raises(UserError):
            BetaBinomialTest(**kwargs)


# --- the exact DP ---------------------------------------------------------------------------------------------------

def naive_probabilities(p: float, test: BetaBinomialTest, max_samples: int, check_every: int):
    """P(certified), P(stopped), E[samples] by a plain dictionary recursion calling decide() state by state."""
    states, p_cert, p_stop, expected = {0: 1.0}, 0.0, 0.0, 0.0
    for t in range(1, max_samples + 1):
        expected += sum(states.values())
        nxt = {}
        for h, mass in states.items():
            nxt[h] = nxt.get(h, 0.0) + mass * (1 - p)
            nxt[h + 1] = nxt.get(h + 1, 0.0) + mass * p
        states = nxt
        if t % check_every == 0 or t == max_samples:
            for h in list(states):
                decision = test.decide(t, h)
                if decision == Decision.CERTIFIED:
                    p_cert += states.pop(h)
                elif decision == Decision.NOT_CERTIFIED:
                    p_stop += states.pop(h)
    return p_cert, p_stop, expected


@pytest.mark.parametrize("p,check_every", [(0.6, 1), (0.6, 7), (0.7, 3), (0.5, 1)])
def test_dp_matches_a_plain_recursion(p, check_every):
    test = BetaBinomialTest(0.6, alpha=0.2, beta=0.2)
    oc = operating_characteristics(p, test, check_times(301, check_every))
    p_cert, p_stop, expected = naive_probabilities(p, test, 301, check_every)
    assert oc.p_certified == pytest.approx(p_cert, abs=1e-12) and oc.p_certified > 1e-3
    assert oc.p_not_certified == pytest.approx(p_stop, abs=1e-12)
    assert oc.expected_samples == pytest.approx(expected, rel=1e-12)
    assert oc.p_certified + oc.p_not_certified + oc.p_exhausted == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("alpha", [1e-3, 1e-2, 0.05])
def test_dp_false_certificates_at_most_alpha(alpha):
    for p0 in P0_GRID:
        at_p0 = false_certify_probability(p0, p0, alpha, 1e-3, max_samples=20_000)
        assert alpha / 100 < at_p0 <= alpha
        below = [false_certify_probability(p, p0, alpha, 1e-3, max_samples=5_000) for p in (p0, p0 - 0.005, p0 - 0.02)]
        assert at_p0 >= below[0] > below[1] > below[2]
        assert false_certify_probability(p0, p0, alpha, 1e-3, max_samples=20_000, check_every=100) <= alpha
        growing = check_times(20_000, batch_size=1000, first_batch=32)  # certify_radius's default schedule
        assert operating_characteristics(p0, BetaBinomialTest(p0, alpha, 1e-3), growing).p_certified <= alpha


@pytest.mark.parametrize("delta,expected", [(0.05, 1700), (0.1, 380), (0.2, 80)])
def test_dp_expected_samples_regression(delta, expected):
    p0 = float(ndtr(0.5))
    assert expected_samples(p0 + delta, p0, 1e-3, 1e-3, max_samples=20_000) == pytest.approx(expected, rel=0.05)


# --- end to end ------------------------------------------------------------------------------------------------------

SIGMA, R = 0.5, 0.25  # p0 = Phi(0.5)


@pytest.mark.parametrize("excess", [0.0, 0.015])
def test_real_noise_path_many_runs_match_the_dp(excess):
    """20,000 runs through noisy_inputs + a half-space + count_predictions, sharing each batch; true radius r + excess."""
    alpha, beta, max_samples, batch, runs = 0.05, 1e-3, 2000, 100, 20_000
    p0 = float(ndtr(R / SIGMA))
    model = HalfSpace((1, 2, 2), seed=3)
    image = model.image_at_distance(R + excess)
    generator = torch.Generator().manual_seed(11)

    def hits(alive):
        x = noisy_inputs(image[None], torch.tensor([batch * alive.size]), SIGMA, generator)
        ids = torch.arange(alive.size).repeat_interleave(batch)
        return count_predictions(model(x), ids, alive.size)[:, 1].numpy()

    test = BetaBinomialTest(p0, alpha, beta)
    certified, _, samples = simulate(test, hits, runs, max_samples, batch)
    oc = operating_characteristics(float(ndtr((R + excess) / SIGMA)), test, check_times(max_samples, batch))
    assert abs(certified.mean() - oc.p_certified) <= three_se(oc.p_certified, runs)
    assert abs(samples.mean() - oc.expected_samples) <= 3 * samples.std() / math.sqrt(runs)
    if excess == 0.0:
        assert certified.mean() <= alpha


@pytest.mark.parametrize("p0,delta", [(0.69, 0.0), (0.69, 0.02), (0.95, 0.0)])
def test_exact_bernoulli_runs_match_the_dp(p0, delta):
    """100,000 runs with the exact per-sample hit probability of a half-space point, up to 10,000 samples."""
    alpha, runs, max_samples, batch = 0.05, 100_000, 10_000, 100
    rng = np.random.default_rng(5)
    test = BetaBinomialTest(p0, alpha, 1e-3)
    p = p0 + delta
    certified, stopped, _ = simulate(test, lambda alive: rng.binomial(batch, p, alive.size), runs, max_samples, batch)
    oc = operating_characteristics(p, test, check_times(max_samples, batch))
    assert abs(certified.mean() - oc.p_certified) <= three_se(oc.p_certified, runs)
    assert abs(stopped.mean() - oc.p_not_certified) <= max(three_se(oc.p_not_certified, runs), 3 / runs)
    if delta == 0.0:
        assert certified.mean() <= alpha


def test_multiclass_near_ties_keep_false_certificates_below_alpha():
    """Classes (0.5, 0.49, 0.01) at r = 0 (p0 = 1/2): whichever class is selected, a certificate is false."""
    alpha, runs, n0, max_samples, batch = 0.05, 100_000, 100, 2000, 100
    probs = np.array([0.5, 0.49, 0.01])
    rng = np.random.default_rng(7)
    selected = rng.multinomial(n0, probs, size=runs).argmax(axis=1)
    test = BetaBinomialTest(0.5, alpha, 1e-3)
    certified, _, _ = simulate(test, lambda alive: rng.binomial(batch, probs[selected[alive]]), runs, max_samples, batch)
    exact = sum(np.mean(selected == c) * operating_characteristics(p, test, check_times(max_samples, batch)).p_certified
                for c, p in enumerate(probs))
    assert certified.mean() <= alpha
    assert abs(certified.mean() - exact) <= three_se(exact, runs)


def multinomial_sampler(probs, seed):
    rng = np.random.default_rng(seed)
    return lambda m: torch.from_numpy(rng.multinomial(m, probs))


def test_certify_radius_on_near_ties_through_its_own_loop():
    alpha, runs = 0.05, 3000
    probs = [0.45, 0.44, 0.11]  # no class reaches p0 = Phi(0.2) = 0.58: every certificate is false
    false = 0
    for i in range(runs):
        out = certify_radius(multinomial_sampler(probs, 2 * i), multinomial_sampler(probs, 2 * i + 1), 3,
                             sigma=0.5, r=0.1, alpha=alpha, max_samples=1000, batch_size=100)
        false += out.certified
        assert out.prediction in (0, 1, 2) and 100 < out.samples <= 1100
    assert false / runs <= alpha


def test_certify_radius_with_the_real_sampler_matches_the_dp():
    """certify_radius itself, run by run with growing batches, on a half-space point where the DP predicts
    certification ~30% of the time."""
    alpha, runs, max_samples, batch, first, n0 = 0.05, 600, 2000, 400, 25, 100
    p0 = float(ndtr(R / SIGMA))
    model = HalfSpace((1, 2, 2), seed=4)
    distance = SIGMA * float(ndtri(p0 + 0.03))
    image = model.image_at_distance(distance)
    results = [certify_radius(GaussianSampler(model, image, SIGMA, 2 * i), GaussianSampler(model, image, SIGMA, 2 * i + 1), 2,
                              SIGMA, R, alpha, n0=n0, max_samples=max_samples, batch_size=batch, first_batch=first)
               for i in range(runs)]
    oc = operating_characteristics(p0 + 0.03, BetaBinomialTest(p0, alpha, 1e-3), check_times(max_samples, batch, first))
    certified = np.array([r.certified for r in results])
    samples = np.array([r.samples for r in results]) - n0
    assert all(r.prediction == 1 for r in results)
    assert abs(certified.mean() - oc.p_certified) <= three_se(oc.p_certified, runs)
    assert abs(samples.mean() - oc.expected_samples) <= 3 * samples.std() / math.sqrt(runs)


def test_certify_radius_spends_few_samples_when_the_answer_is_clear():
    far = certify_radius(multinomial_sampler([0.02, 0.98], 0), multinomial_sampler([0.02, 0.98], 1), 2,
                         sigma=0.5, r=0.25, alpha=1e-3)
    assert far == RadiusDecision(1, True, far.samples) and far.samples <= 100 + 96
    wrong = certify_radius(multinomial_sampler([0.35, 0.65], 0), multinomial_sampler([0.35, 0.65], 1), 2,
                           sigma=0.5, r=0.25, alpha=1e-3)
    assert wrong.prediction == 1 and not wrong.certified and wrong.samples < 3000


def test_check_times_grow_then_stay_at_the_batch_size():
    assert check_times(100_000, 1000, 32)[:7].tolist() == [32, 96, 224, 480, 992, 1992, 2992]
    assert check_times(100_000, 1000, 32)[-2:].tolist() == [99_992, 100_000]
    assert check_times(2000, 100).tolist() == list(range(100, 2001, 100))
    assert check_times(50, 1000, 32).tolist() == [32, 50]
    assert check_times(7, 3).tolist() == [3, 6, 7]
    for n, batch, first in [(1, 1, 1), (1000, 64, 64), (999, 100, 7), (10**5, 4096, 1)]:
        ends = check_times(n, batch, first)
        assert ends[-1] == n and (np.diff(ends, prepend=0) >= 1).all() and (np.diff(ends) <= batch).all()


def test_certify_radius_does_not_sample_an_unreachable_radius():
    def forbidden(m):
        raise AssertionError("no estimation samples should be drawn")
    for r in (3.0, 100.0):  # all hits at 1,000 samples cannot reach p0 = Phi(6); p0 rounds to 1 at r/sigma = 200
        out = certify_radius(multinomial_sampler([0.0, 1.0], 0), forbidden, 2, sigma=0.5, r=r, alpha=1e-3, max_samples=1000)
        assert out == RadiusDecision(1, False, 100)


def test_certify_radius_checks_its_inputs():
    draw = multinomial_sampler([0.5, 0.5], 0)
    for kwargs in (dict(sigma=0.0), dict(r=-1.0), dict(alpha=1.0), dict(n0=0), dict(batch_size=0),
                   dict(first_batch=0), dict(max_samples=0), dict(beta=0.0), dict(r=float("nan"))):
        args = dict(sigma=0.5, r=0.1, alpha=0.01) | kwargs
        with pytest.raises(UserError):
            certify_radius(draw, draw, 2, **args)
    with pytest.raises(ValueError, match="shape"):
        certify_radius(draw, draw, 3, sigma=0.5, r=0.1, alpha=0.01)
    with pytest.raises(ValueError, match="summing"):
        certify_radius(draw, lambda m: torch.tensor([m, 1]), 2, sigma=0.5, r=0.1, alpha=0.01)
