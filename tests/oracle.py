"""Independent expected values for the statistics tests: exact binomial sums, root finding in mpmath, and a
dynamic program.

Nothing here calls scipy's beta or normal quantiles (what rrcm.engine.stats uses): a bound is the p at which the
exact binomial tail sum equals alpha, found by root finding on that sum, and PhiInv is the root of mpmath's normal
CDF. Values are returned as floats, accurate far beyond float64 rounding.
"""
from __future__ import annotations

import functools

import mpmath
import numpy as np
from scipy.stats import binom

mp = mpmath.mp.clone()
mp.dps = 40


def binomial_tail(k: int, n: int, p) -> mpmath.mpf:
    """P(Bin(n, p) >= k) = sum_{j >= k} C(n, j) p^j (1 - p)^(n - j), summed term by term (the shorter side)."""
    p = mp.mpf(p)
    if k <= 0 or p == 1:
        return mp.mpf(1 if k <= n else 0)
    if k > n or p == 0:
        return mp.mpf(0)
    if k > n / 2:
        return _sum_terms(range(k, n + 1), n, p)
    return 1 - _sum_terms(range(0, k), n, p)


def binomial_pmf(k: int, n: int, p) -> mpmath.mpf:
    """P(Bin(n, p) = k)."""
    p = mp.mpf(p)
    return mp.binomial(n, k) * p ** k * (1 - p) ** (n - k) if 0 <= k <= n else mp.mpf(0)


def _sum_terms(js: range, n: int, p) -> mpmath.mpf:
    q = 1 - p
    term = mp.binomial(n, js[0]) * p ** js[0] * q ** (n - js[0])
    total = term
    for j in js[:-1]:  # C(n, j+1) p^(j+1) q^(n-j-1) = C(n, j) p^j q^(n-j) * (n - j) / (j + 1) * p / q
        term = term * (n - j) / (j + 1) * p / q
        total += term
    return total


def _tail_root(k: int, n: int, target) -> mpmath.mpf:
    """The p in (0, 1) with P(Bin(n, p) >= k) = target, for 1 <= k <= n: Newton steps on the exact derivative
    d/dp P(Bin(n, p) >= k) = k C(n, k) p^(k-1) (1 - p)^(n-k), kept inside a shrinking bracket (the tail increases
    in p), bisecting where a step would leave it."""
    lo, hi, p = mp.mpf(0), mp.mpf(1), mp.mpf(k) / (n + 1)
    for _ in range(400):
        f = binomial_tail(k, n, p) - target
        lo, hi = (p, hi) if f < 0 else (lo, p)
        step = f / (k * mp.binomial(n, k) * p ** (k - 1) * (1 - p) ** (n - k))
        if abs(step) < mp.mpf(10) ** -25 * p:
            return p - step
        p = p - step if lo < p - step < hi else (lo + hi) / 2
    raise ArithmeticError(f"no convergence for k={k}, n={n}")


@functools.lru_cache(maxsize=None)
def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """The p with P(Bin(n, p) >= k) = alpha (0 for k = 0): the one-sided lower confidence bound."""
    if k == 0:
        return 0.0
    return float(_tail_root(k, n, alpha))


@functools.lru_cache(maxsize=None)
def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """The p with P(Bin(n, p) <= k) = alpha (1 for k = n): the one-sided upper confidence bound."""
    if k == n:
        return 1.0
    return float(_tail_root(k + 1, n, 1 - alpha))  # P(Bin <= k) = alpha


@functools.lru_cache(maxsize=None)
def normal_quantile(p: float) -> float:
    """PhiInv(p) for 0 < p < 1: the root of mpmath's normal CDF minus p, by Newton's method (the derivative is
    the normal density)."""
    z = mp.mpf(0)
    for _ in range(200):
        step = (mp.ncdf(z) - p) / mp.npdf(z)
        z -= max(min(step, 1), -1)  # at most 1 a step: the CDF is flat in the tails
        if abs(step) < mp.mpf(10) ** -30:
            return float(z)
    raise ArithmeticError(f"no convergence for p={p}")


def certified_radius(p_lower: float, sigma: float) -> float:
    """sigma * PhiInv(p_lower) where p_lower >= 1/2, else 0 (an abstention)."""
    return sigma * normal_quantile(p_lower) if p_lower >= 0.5 else 0.0


def adversary_failure(p: float, checkpoints: list[int], levels, threshold: float | None = None) -> float:
    """P(some checkpoint's Clopper-Pearson lower bound exceeds `threshold` (default p)) when each sample is a hit
    with probability p: what an adversary who stops at the first such checkpoint achieves. The bound at level a
    exceeds q exactly when P(Bin(t, q) >= h) < a (the tail increases in q), so no quantile is computed: a forward
    dynamic program over the hits h, absorbing the paths whose tail at `threshold` is below the checkpoint's level."""
    threshold = p if threshold is None else threshold
    alive, failed, t = np.ones(1), 0.0, 0
    for n, level in zip(checkpoints, levels):
        alive = np.convolve(alive, binom.pmf(np.arange(n - t + 1), n - t, p))
        t = n
        exceeds = binom.sf(np.arange(t + 1) - 1, t, threshold) < level
        failed += alive[exceeds].sum()
        alive[exceeds] = 0.0
    return float(failed)
