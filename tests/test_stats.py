"""engine.stats: the Clopper-Pearson bound, the radius and PREDICT's test, checked exactly and statistically."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom, norm

import oracle
from rrcm.engine import stats


def test_bound_closed_forms():
    # k = n: the bound solves p^n = alpha; k = 0: nothing can be said.
    for n in (1, 10, 1000):
        assert stats.lower_confidence_bound(n, n, 0.01) == pytest.approx(0.01 ** (1 / n), rel=1e-12)
        assert stats.lower_confidence_bound(0, n, 0.01) == 0.0
    # k = 1 of n: P(K >= 1) = 1 - (1 - p)^n = alpha.
    assert stats.lower_confidence_bound(1, 50, 0.05) == pytest.approx(1 - 0.95 ** (1 / 50), rel=1e-10)


@pytest.mark.parametrize("k, n, alpha", [(7, 10, 0.05), (990, 1000, 0.001), (99_000, 100_000, 0.001), (55, 100, 0.1),
                                         (1, 100_000, 0.01), (3, 10, 0.3)])
def test_bounds_equal_the_exact_tail_roots(k, n, alpha):
    """The lower bound is the p with P(Bin(n, p) >= k) = alpha, the upper one the p with P(Bin(n, p) <= k) = alpha:
    both against the oracle's roots of exact binomial sums (mpmath)."""
    lower, upper = oracle.clopper_pearson_lower(k, n, alpha), oracle.clopper_pearson_upper(k, n, alpha)
    assert stats.lower_confidence_bound(k, n, alpha) == pytest.approx(lower, rel=1e-10)
    assert stats.upper_confidence_bound(k, n, alpha) == pytest.approx(upper, rel=1e-10)


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
    assert p_lower == pytest.approx(oracle.clopper_pearson_lower(985, 1000, 0.001), rel=1e-10)
    assert radius == pytest.approx(oracle.certified_radius(p_lower, 0.5), rel=1e-10)
    # Estimation disagreeing with selection: class 1 has 400 of 1000 -> abstain.
    assert stats.certify_from_counts(selection, np.array([600, 400, 0]), 0.5, 0.001)[:2] == (stats.ABSTAIN, 0.0)
    # Just above half is not enough at this alpha.
    assert stats.certify_from_counts(selection, np.array([0, 520, 480]), 0.5, 0.001)[0] == stats.ABSTAIN


def test_predict_binomial_test():
    assert stats.predict_from_counts(np.array([3, 90, 7]), 0.001) == 1
    assert stats.predict_from_counts(np.array([48, 52, 0]), 0.001) == stats.ABSTAIN
    assert stats.predict_from_counts(np.array([0, 0, 12]), 0.001) == 2  # 2 * 0.5^12 < 0.001
    assert stats.predict_from_counts(np.array([0, 0, 9]), 0.001) == stats.ABSTAIN  # 2 * 0.5^9 > 0.001


def two_sided_fair_coin_rejects(a: int, b: int, alpha: float) -> bool:
    """The exact two-sided binomial test of a vs b at p = 1/2, in integers: P(Bin(a + b, 1/2) as far from the
    middle as a) = 2 P(Bin <= min(a, b)) (1 where a = b) is at most alpha."""
    n = a + b
    if a == b:
        return alpha >= 1
    return 2 * sum(math.comb(n, j) for j in range(min(a, b) + 1)) <= alpha * 2**n


@pytest.mark.parametrize("n, alpha", [(200, 0.05), (12, 0.001), (1000, 0.001)])
def test_predict_answers_exactly_where_the_binomial_test_rejects(n, alpha):
    """With two classes of equal probability any answer is wrong: PREDICT answers exactly on the counts where the
    exact test (integers) rejects, so it errs with probability at most alpha (summed exactly)."""
    answered = [stats.predict_from_counts(np.array([k, n - k, 0]), alpha) != stats.ABSTAIN for k in range(n + 1)]
    assert answered == [two_sided_fair_coin_rejects(k, n - k, alpha) for k in range(n + 1)]
    error = sum(math.comb(n, k) for k in range(n + 1) if answered[k]) / 2**n
    assert 0 < error <= alpha
