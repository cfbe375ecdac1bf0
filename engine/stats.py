"""The statistics of randomized smoothing (Cohen et al., 2019), from class counts to a guarantee.

g(x) = argmax_c P(f(x + e) = c), e ~ N(0, sigma^2 I), is the smoothed classifier of a base classifier f.
CERTIFY: the class cA comes from selection counts; from independent estimation counts, nA of n samples
voted cA. With probability >= 1 - alpha over the estimation noise, p_lower <= P(f(x + e) = cA); so if
p_lower >= 1/2, g(x + d) = cA for every ||d||_2 < sigma * PhiInv(p_lower). Otherwise abstain.
PREDICT: the top class of the counts is returned unless a two-sided binomial test between the top two
counts fails at level alpha; with probability >= 1 - alpha, a returned class is g(x).
"""
from __future__ import annotations

import numpy as np
from scipy.stats import beta, binomtest, norm

ABSTAIN = -1


def lower_confidence_bound(k, n, alpha: float):
    """One-sided Clopper-Pearson bound: P(bound > p) <= alpha for k ~ Binomial(n, p). Works on arrays."""
    k, n = np.asarray(k), np.asarray(n)
    bound = np.where(k > 0, beta.ppf(alpha, np.maximum(k, 1), n - k + 1), 0.0)
    return float(bound) if bound.ndim == 0 else bound


def upper_confidence_bound(k, n, alpha: float):
    """One-sided Clopper-Pearson upper bound: P(bound < p) <= alpha for k ~ Binomial(n, p). Works on arrays."""
    k, n = np.asarray(k), np.asarray(n)
    bound = np.where(k < n, beta.ppf(1 - alpha, k + 1, np.maximum(n - k, 1)), 1.0)
    return float(bound) if bound.ndim == 0 else bound


def certified_radius(p_lower, sigma: float):
    """L2 radius sigma * PhiInv(p_lower) of a certificate; 0 where p_lower < 1/2 (abstention)."""
    p_lower = np.asarray(p_lower, dtype=np.float64)
    radius = np.where(p_lower >= 0.5, sigma * norm.ppf(np.maximum(p_lower, 0.5)), 0.0)
    return float(radius) if radius.ndim == 0 else radius


def certify_from_counts(selection: np.ndarray, estimation: np.ndarray, sigma: float, alpha: float) -> tuple[int, float, float]:
    """(prediction or ABSTAIN, radius, p_lower) from selection and estimation class counts."""
    top = int(np.argmax(selection))
    p_lower = lower_confidence_bound(int(estimation[top]), int(estimation.sum()), alpha)
    if p_lower < 0.5:
        return ABSTAIN, 0.0, p_lower
    return top, certified_radius(p_lower, sigma), p_lower


def predict_from_counts(counts: np.ndarray, alpha: float) -> int:
    """The top class of `counts`, or ABSTAIN if the binomial test of top vs runner-up has p-value > alpha."""
    first, second = np.argsort(-counts, kind="stable")[:2]
    n_a, n_b = int(counts[first]), int(counts[second])
    return int(first) if binomtest(n_a, n_a + n_b, 0.5).pvalue <= alpha else ABSTAIN
