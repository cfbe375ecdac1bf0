"""engine.stats: the Clopper-Pearson bound, the radius and PREDICT's test, checked exactly and statistically."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom, norm

from rrcm.engine import stats


def test_bound_closed_forms():
    # k = n: the bound solves p^n = alpha; k = 0: nothing can be said.
    for n in (1, 10, 1000):
        assert stats.lower_confidence_bound(n, n, 0.01) == pytest.approx(0.01 ** (1 / n), rel=1e-12)
        assert stats.lower_confidence_bound(0, n, 0.01) == 0.0
    # k = 1 of n: P(K >= 1) = 1 - (1 - p)^n = alpha.
    assert stats.lower_confidence_bound(1, 50, 0.05) == pytest.approx(1 - 0.95 ** (1 / 50), rel=1e-10)


def test_bound_is_the_smallest_p_with_tail_alpha():
    # The one-sided bound is the p with P(Bin(n, p) >= k) = alpha.
    for k, n, alpha in [(7, 10, 0.05), (990, 1000, 0.001), (99_000, 100_000, 0.001), (55, 100, 0.1)]:
        p = stats.lower_confidence_bound(k, n, alpha)
        assert binom.sf(k - 1, n, p) == pytest.approx(alpha, rel=1e-6)


def test_bound_on_arrays_matches_scalars():
    k = np.array([0, 3, 10, 10])
    n = np.array([10, 10, 10, 20])
    got = stats.lower_confidence_bound(k, n, 0.05)
    assert got.shape == (4,)
    assert list(got) == [stats.lower_confidence_bound(int(a), int(b), 0.05) for a, b in zip(k, n)]


@pytest.mark.parametrize("n, alpha", [(20, 0.1), (100, 0.05), (1000, 0.001)])
def test_bound_coverage_is_exact_and_at_most_alpha(n, alpha):
    """P(bound > p) summed exactly over the binomial law, on a grid of p: never above alpha, and close to
    alpha somewhere (the bound is not needlessly loose)."""
    k = np.arange(n + 1)
    bounds = stats.lower_confidence_bound(k, np.full_like(k, n), alpha)
    worst = 0.0
    for p in np.linspace(0.005, 0.995, 397):
        miss = binom.pmf(k, n, p)[bounds > p].sum()
        assert miss <= alpha * (1 + 1e-9), (p, miss)
        worst = max(worst, miss)
    assert worst > 0.5 * alpha


def test_radius_and_abstention():
    assert stats.certified_radius(0.5, 0.25) == 0.0
    assert stats.certified_radius(0.4, 0.25) == 0.0
    assert stats.certified_radius(norm.cdf(2.0), 0.5) == pytest.approx(1.0)
    # Counts -> decision: the class comes from the selection counts, the bound from the estimation counts.
    selection = np.array([1, 9, 0])
    prediction, radius, p_lower = stats.certify_from_counts(selection, np.array([10, 985, 5]), 0.5, 0.001)
    assert prediction == 1
    assert p_lower == pytest.approx(stats.lower_confidence_bound(985, 1000, 0.001))
    assert radius == pytest.approx(0.5 * norm.ppf(p_lower))
    # Estimation disagreeing with selection: class 1 has 400 of 1000 -> abstain.
    assert stats.certify_from_counts(selection, np.array([600, 400, 0]), 0.5, 0.001)[:2] == (stats.ABSTAIN, 0.0)
    # Just above half is not enough at this alpha.
    assert stats.certify_from_counts(selection, np.array([0, 520, 480]), 0.5, 0.001)[0] == stats.ABSTAIN


def test_predict_binomial_test():
    assert stats.predict_from_counts(np.array([3, 90, 7]), 0.001) == 1
    assert stats.predict_from_counts(np.array([48, 52, 0]), 0.001) == stats.ABSTAIN
    assert stats.predict_from_counts(np.array([0, 0, 12]), 0.001) == 2  # 2 * 0.5^12 < 0.001
    assert stats.predict_from_counts(np.array([0, 0, 9]), 0.001) == stats.ABSTAIN  # 2 * 0.5^9 > 0.001


def test_predict_error_rate_at_most_alpha():
    """With two classes of equal probability any answer is wrong: PREDICT must abstain but for alpha."""
    rng = np.random.default_rng(0)
    alpha, n, trials = 0.05, 200, 4000
    a = rng.binomial(n, 0.5, size=trials)
    answered = np.mean([stats.predict_from_counts(np.array([k, n - k]), alpha) != stats.ABSTAIN for k in a])
    exact = binom.pmf(np.arange(n + 1), n, 0.5)[[stats.predict_from_counts(np.array([k, n - k]), alpha) != stats.ABSTAIN
                                                 for k in range(n + 1)]].sum()
    assert exact <= alpha
    assert abs(answered - exact) <= 4 * math.sqrt(exact * (1 - exact) / trials)
