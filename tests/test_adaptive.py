"""Maximum radius within a budget: levels, Clopper-Pearson bounds, and soundness under adversarial stopping."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import binom

import oracle
from halfspace import GaussianSampler, HalfSpace
from rrcm.engine.adaptive import certify_adaptive, checkpoint_levels, doubling_checkpoints
from rrcm.engine.stats import ABSTAIN, lower_confidence_bound, upper_confidence_bound
from rrcm.errors import UserError

SIGMA = 0.5


def test_checkpoints_double_up_to_the_budget():
    assert doubling_checkpoints(100_000) == [100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 51200, 100_000]
    assert doubling_checkpoints(800) == [100, 200, 400, 800]
    assert doubling_checkpoints(50) == [50]


def test_levels_spend_half_on_the_last_checkpoint():
    levels = checkpoint_levels(11, 0.001)
    assert levels.sum() == pytest.approx(0.001, rel=1e-12)
    assert levels[-1] == 0.0005
    k = np.arange(10)
    np.testing.assert_allclose(levels[:-1] / levels[0], 2 / ((k + 1) * (k + 2)))
    assert checkpoint_levels(1, 0.01).tolist() == [0.01]


@pytest.mark.parametrize("t,level", [(20, 0.05), (100, 0.001), (100, 0.3)])
def test_clopper_pearson_bounds_have_exact_coverage(t, level):
    h = np.arange(t + 1)
    lower, upper = lower_confidence_bound(h, t, level), upper_confidence_bound(h, t, level)
    assert lower[0] == 0.0 and upper[-1] == 1.0 and (lower <= h / t).all() and (upper >= h / t).all()
    worst_low = worst_up = 0.0
    for p in np.linspace(0.001, 0.999, 999):
        pmf = binom.pmf(h, t, p)
        worst_low = max(worst_low, pmf[lower > p].sum())
        worst_up = max(worst_up, pmf[upper < p].sum())
    assert level / 3 < worst_low <= level * (1 + 1e-9)
    assert level / 3 < worst_up <= level * (1 + 1e-9)


def test_adversary_failure_at_one_checkpoint_is_the_bound_s_miss_probability():
    """The oracle's dynamic program at one checkpoint: P(the engine's bound > p), summed over the binomial law."""
    p, n, level = 0.7, 300, 0.01
    misses = lower_confidence_bound(np.arange(n + 1), n, level) > p
    assert oracle.adversary_failure(p, [n], [level]) == pytest.approx(binom.pmf(np.arange(n + 1), n, p)[misses].sum(),
                                                                      rel=1e-9)


@pytest.mark.parametrize("distance", [0.1, 0.6, 1.2])
def test_adversarial_stopping_cannot_beat_alpha(distance):
    """Half-space points with true radius `distance` (p = Phi(distance / sigma)), alpha = 0.05: the adversary's
    exact failure probability is at most alpha, and well above it with alpha at every checkpoint instead."""
    alpha = 0.05
    checkpoints = doubling_checkpoints(12_800)
    p_true = float(oracle.mp.ncdf(distance / SIGMA))
    assert oracle.adversary_failure(p_true, checkpoints, checkpoint_levels(len(checkpoints), alpha)) <= alpha
    # the same adversary against alpha at every checkpoint: the test above would catch that mistake
    assert oracle.adversary_failure(p_true, checkpoints, np.full(len(checkpoints), alpha)) > 1.5 * alpha


def fixed_rate_sampler(*rates: float):
    """Deterministic counts: round(rate * m) for classes 1, 2, ... and the rest for class 0, in every call."""
    def draw(m):
        counts = [round(rate * m) for rate in rates]
        return torch.tensor([m - sum(counts)] + counts)
    return draw


# checkpoint_levels(11, alpha)[0]: alpha / 2 in proportion to 1/2 of sum_{k<10} 1/((k+1)(k+2)) = 1 - 1/11
FIRST_LEVEL = 0.001 / 2 * (1 / 2) / (1 - 1 / 11)


def test_tolerance_decides_how_much_of_the_budget_is_spent():
    draw = fixed_rate_sampler(0.9)
    first = certify_adaptive(draw, draw, 2, SIGMA, 0.001, tolerance=math.inf)
    p_lower = oracle.clopper_pearson_lower(90, 100, FIRST_LEVEL)
    assert (first.prediction, first.samples) == (1, 200)
    assert first.p_lower == pytest.approx(p_lower, rel=1e-10)
    assert first.radius == pytest.approx(oracle.certified_radius(p_lower, SIGMA), rel=1e-10)
    full = certify_adaptive(draw, draw, 2, SIGMA, 0.001, tolerance=0.0)
    assert full.samples == 100 + 100_000
    assert full.p_lower == pytest.approx(oracle.clopper_pearson_lower(90_000, 100_000, 0.0005), rel=1e-10)
    some = certify_adaptive(draw, draw, 2, SIGMA, 0.001, tolerance=0.01)
    assert first.samples < some.samples < full.samples
    assert full.radius - 0.01 <= some.radius < full.radius


def test_clear_abstentions_stop_at_the_first_checkpoint():
    draw = fixed_rate_sampler(0.24, 0.24, 0.24)  # the top class, 0, has probability 0.28
    result = certify_adaptive(draw, draw, 4, SIGMA, 0.001, tolerance=0.0)
    assert (result.prediction, result.radius, result.samples) == (ABSTAIN, 0.0, 200)
    assert result.p_lower == pytest.approx(oracle.clopper_pearson_lower(28, 100, FIRST_LEVEL), rel=1e-10)
    tie = fixed_rate_sampler(0.5)
    result = certify_adaptive(tie, tie, 2, SIGMA, 0.001, max_samples=3200)
    assert result.prediction == ABSTAIN and result.samples == 3300


def test_real_sampler_runs_stay_below_the_adversarial_bound():
    """certify_adaptive through noisy_inputs + a half-space (true radius 0.64): its own stopping rule is one of the
    rules the adversarial bound covers."""
    alpha, runs, budget, distance = 0.2, 400, 1600, 0.64
    model = HalfSpace((1, 2, 2), seed=5)
    image = model.image_at_distance(distance)
    results = [certify_adaptive(GaussianSampler(model, image, SIGMA, 2 * i), GaussianSampler(model, image, SIGMA, 2 * i + 1),
                                2, SIGMA, alpha, max_samples=budget, tolerance=0.01) for i in range(runs)]
    assert all(r.prediction == 1 and r.radius > 0 for r in results)
    assert all(r.radius == pytest.approx(oracle.certified_radius(r.p_lower, SIGMA), rel=1e-10) for r in results)
    assert any(r.samples < 100 + budget for r in results)
    false = sum(r.radius > distance for r in results)
    checkpoints = doubling_checkpoints(budget)
    p_true = float(oracle.mp.ncdf(distance / SIGMA))
    bound = oracle.adversary_failure(p_true, checkpoints, checkpoint_levels(len(checkpoints), alpha))
    assert bound <= alpha
    # Its own rule is one the adversary's bound (0.144) covers, so its rate is at most the bound: refused past the
    # bound's 1e-4 binomial quantile (85 of 400). A rate twice the bound passes with probability 3e-4, 2 alpha 1e-15.
    assert false <= binom.isf(1e-4, runs, bound), (false, bound)


def test_bad_arguments_are_user_errors():
    draw = fixed_rate_sampler(0.9)
    for kwargs in (dict(alpha=0.0), dict(sigma=-1.0), dict(tolerance=-0.1), dict(n0=0),
                   dict(checkpoints=[100, 100, 1000], max_samples=1000), dict(checkpoints=[100, 500], max_samples=1000),
                   dict(max_samples=0)):
        args = dict(sigma=SIGMA, alpha=0.01) | kwargs
        with pytest.raises(UserError):
            certify_adaptive(draw, draw, 2, **args)
