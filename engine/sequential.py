"""Anytime-valid certification at a given radius: a beta-binomial mixture test with early stopping.

The smoothed classifier provably predicts class c within L2 radius r of x if p = P(f(x + e) = c) > p0 = Phi(r / sigma).
With h hits of c among t estimation samples, the mixture likelihood ratio against p0

    E_t = B(a + h, b + t - h) / B(a, b) / (p0^h (1 - p0)^(t - h))

is a nonnegative martingale with E_0 = 1 when p = p0, so Ville's inequality gives P(sup_t E_t >= 1/alpha) <= alpha:
the error bound holds however the samples are batched and whenever the stream is stopped. Certifying needs
h >= p0 t as well; then both stopping regions are thresholds in h (log E is convex in h and <= 0 at h = p0 t),
so "ever certified" only grows with the hits and its probability is <= alpha for every p <= p0.
The mirrored statistic (failures against 1 - p0) stops the stream as not certified; by the same argument
that happens with probability <= beta when p >= p0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from typing import Callable

import numpy as np
import torch
from scipy.special import betaln, ndtr

from rrcm.errors import UserError

Sampler = Callable[[int], torch.Tensor]
"""draw(m) -> (num_classes,) int64 class counts of m fresh noisy forward passes."""


class Decision(IntEnum):
    CONTINUE = 0
    CERTIFIED = 1
    NOT_CERTIFIED = 2


def _check_level(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise UserError(f"{name} must be in (0, 1), got {value}")


class BetaBinomialTest:
    """The sequential test of "p > p0" with a Beta(a, b) mixture (a = b = 1/2: Jeffreys).

    alpha bounds the probability of certifying when p <= p0; beta bounds the probability of stopping as
    not certified when p >= p0 (beta=None: never stop early, only at the sample budget).
    """

    def __init__(self, p0: float, alpha: float, beta: float | None = 1e-3, a: float = 0.5, b: float = 0.5):
        _check_level("p0", p0)
        _check_level("alpha", alpha)
        if beta is not None:
            _check_level("beta", beta)
        if not (a > 0 and b > 0):
            raise UserError(f"the Beta prior needs a, b > 0, got a={a}, b={b}")
        self.p0, self.alpha, self.beta, self.a, self.b = float(p0), float(alpha), beta, float(a), float(b)
        self.log_certify = math.log(1 / alpha)
        self.log_stop = math.inf if beta is None else math.log(1 / beta)
        self._log_p0, self._log_q0 = math.log(p0), math.log1p(-p0)
        self._log_prior = float(betaln(a, b))

    def log_e_value(self, t, h):
        """ln E for h hits among t samples (numpy broadcasting)."""
        return betaln(self.a + h, self.b + t - h) - self._log_prior - h * self._log_p0 - (t - h) * self._log_q0

    def log_e_value_mirrored(self, t, h):
        """ln E of the t - h failures against failure rate 1 - p0, same prior (equal to log_e_value when a = b)."""
        f = t - h
        return betaln(self.a + f, self.b + h) - self._log_prior - f * self._log_q0 - h * self._log_p0

    def decide_array(self, t, h) -> np.ndarray:
        """Decision codes (int) for arrays of (t, h); see `decide`."""
        t, h = np.asarray(t), np.asarray(h)
        certified = (h >= self.p0 * t) & (self.log_e_value(t, h) >= self.log_certify)
        stopped = (h <= self.p0 * t) & (self.log_e_value_mirrored(t, h) >= self.log_stop)
        return np.where(certified, Decision.CERTIFIED, np.where(stopped, Decision.NOT_CERTIFIED, Decision.CONTINUE))

    def decide(self, t: int, h: int) -> Decision:
        """CERTIFIED if h >= p0 t and ln E >= ln(1/alpha); NOT_CERTIFIED if h <= p0 t and the mirrored
        ln E >= ln(1/beta); else CONTINUE."""
        return Decision(int(self.decide_array(t, h)))

    def boundaries(self, t) -> tuple[np.ndarray, np.ndarray]:
        """(stop, certify) thresholds at sample counts t: NOT_CERTIFIED iff h <= stop (-1: never),
        CERTIFIED iff h >= certify (t + 1: impossible). Found by bisection, which is exact because both
        statistics are monotone in h on their side of p0 t."""
        t = np.atleast_1d(np.asarray(t, dtype=np.int64))
        # certify: the smallest h in [ceil(p0 t), t] with ln E >= ln(1/alpha); lo always fails, hi always passes
        lo, hi = np.ceil(self.p0 * t).astype(np.int64) - 1, t + 1
        while np.any(active := hi - lo > 1):
            mid = (lo + hi) // 2
            ok = self.log_e_value(t, np.clip(mid, 0, t)) >= self.log_certify
            hi, lo = np.where(active & ok, mid, hi), np.where(active & ~ok, mid, lo)
        certify = hi
        # stop: the largest h in [0, floor(p0 t)] with the mirrored ln E >= ln(1/beta); lo passes, hi fails
        lo, hi = np.full_like(t, -1), np.floor(self.p0 * t).astype(np.int64) + 1
        while np.any(active := hi - lo > 1):
            mid = (lo + hi) // 2
            ok = self.log_e_value_mirrored(t, np.clip(mid, 0, t)) >= self.log_stop
            lo, hi = np.where(active & ok, mid, lo), np.where(active & ~ok, mid, hi)
        return lo, certify


def upper_confidence_sequence(t, h, level: float, a: float = 0.5, b: float = 0.5) -> np.ndarray:
    """Anytime-valid upper bounds on hit probabilities from h hits among t samples (numpy broadcasting).

    The bound is the largest q >= h / t that the mirrored Beta(a, b) mixture test (`BetaBinomialTest`) at q does
    not reject at `level`: for a stream of hits with probability p, P(at some t the bound is below p) <= level,
    whenever the stream is read and stopped. Found by bisection (the statistic increases in q above h / t),
    rounded up; 1.0 where no q < 1 is rejected.
    """
    t, h = np.broadcast_arrays(np.asarray(t, dtype=np.float64), np.asarray(h, dtype=np.float64))
    if (t < 1).any() or (h < 0).any() or (h > t).any():
        raise ValueError("need 0 <= h <= t and t >= 1")
    _check_level("level", level)
    failures, threshold, prior = t - h, math.log(1 / level), float(betaln(a, b))

    def rejected(q):
        with np.errstate(divide="ignore", invalid="ignore"):  # log(1 - q) at q = 1: rejected once a failure is seen
            miss = np.where(failures > 0, failures * np.log1p(-q), 0.0)
        log_e = betaln(a + failures, b + h) - prior - miss - h * np.log(q)
        return log_e >= threshold

    lo, hi = h / t, np.ones_like(t)  # lo is never rejected (q <= h / t); the bound lies in [lo, hi]
    open_ended = ~rejected(hi)
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        bad = rejected(mid)
        lo, hi = np.where(bad, lo, mid), np.where(bad, mid, hi)
    return np.where(open_ended, 1.0, hi)


def check_times(max_samples: int, batch_size: int = 1, first_batch: int | None = None) -> np.ndarray:
    """Sample counts after each batch: batches of `first_batch` doubling up to `batch_size` (all `batch_size`
    when first_batch is None), the last one cut to end at max_samples."""
    first_batch = batch_size if first_batch is None else first_batch
    if min(max_samples, batch_size, first_batch) < 1:
        raise UserError(f"max_samples, batch_size and first_batch must be >= 1, got {max_samples}, {batch_size}, "
                        f"{first_batch}")
    sizes, total, size = [], 0, min(first_batch, batch_size)
    while total < max_samples and size < batch_size:
        sizes.append(size)
        total, size = total + size, 2 * size
    ends = np.cumsum(sizes, dtype=np.int64)
    ends = np.concatenate([ends, np.arange(total + batch_size, max_samples + batch_size, batch_size)])
    return np.minimum(ends, max_samples)


@dataclass(frozen=True)
class RadiusDecision:
    prediction: int  # the class chosen from the selection samples
    certified: bool  # whether the smoothed classifier provably predicts it within radius r (error <= alpha)
    samples: int  # noisy forward passes spent: n0 selection + estimation samples


def draw_counts(draw: Sampler, m: int, num_classes: int) -> np.ndarray:
    """The sampler's counts for m samples as a numpy int64 vector, checked."""
    counts = draw(m)
    if tuple(counts.shape) != (num_classes,):
        raise ValueError(f"sampler returned counts of shape {tuple(counts.shape)}, expected ({num_classes},)")
    counts = counts.detach().cpu().numpy().astype(np.int64)
    if counts.sum() != m or counts.min() < 0:
        raise ValueError(f"sampler returned counts summing to {counts.sum()} for {m} samples")
    return counts


def certify_radius(
    select_draw: Sampler,
    estimate_draw: Sampler,
    num_classes: int,
    sigma: float,
    r: float,
    alpha: float,
    *,
    beta: float | None = 1e-3,
    n0: int = 100,
    max_samples: int = 100_000,
    batch_size: int = 1000,
    first_batch: int | None = 32,
) -> RadiusDecision:
    """Is the smoothed classifier's prediction robust at L2 radius r? Spends as few samples as the data allow.

    The class comes from n0 samples of `select_draw`; then `estimate_draw` (an independent noise stream) is read
    in the batches of `check_times(max_samples, batch_size, first_batch)` and the BetaBinomialTest at
    p0 = Phi(r / sigma) is checked after each; batches that start small and double keep clear cases cheap.
    Guarantee (Ville's inequality, valid for any batching and stopping):
    P(certified and the class's probability <= p0) <= alpha; P(not certified early while it is >= p0) <= beta.
    """
    if not (sigma > 0 and math.isfinite(sigma)):
        raise UserError(f"sigma must be positive, got {sigma}")
    if not (r >= 0 and math.isfinite(r)):
        raise UserError(f"radius must be >= 0, got {r}")
    if n0 < 1:
        raise UserError(f"n0 must be >= 1, got {n0}")
    checks = check_times(max_samples, batch_size, first_batch)
    _check_level("alpha", alpha)
    if beta is not None:
        _check_level("beta", beta)
    prediction = int(np.argmax(draw_counts(select_draw, n0, num_classes)))
    p0 = float(ndtr(r / sigma))
    if p0 >= 1.0:  # r / sigma > 8.2: no budget can certify it
        return RadiusDecision(prediction, False, n0)
    test = BetaBinomialTest(p0, alpha, beta)
    # ln E(t, t) is convex in t with ln E(0, 0) = 0, so if all-hits cannot certify at the budget, nothing can.
    if test.decide(max_samples, max_samples) != Decision.CERTIFIED:
        return RadiusDecision(prediction, False, n0)
    t = h = 0
    for check in checks.tolist():
        h += int(draw_counts(estimate_draw, check - t, num_classes)[prediction])
        t = check
        decision = test.decide(t, h)
        if decision != Decision.CONTINUE:
            break
    return RadiusDecision(prediction, decision == Decision.CERTIFIED, n0 + t)


@dataclass(frozen=True)
class OperatingCharacteristics:
    p_certified: float  # P(ever certified)
    p_not_certified: float  # P(stopped early as not certified)
    p_exhausted: float  # P(undecided at max_samples)
    expected_samples: float  # E[estimation samples]


def operating_characteristics(p: float, test: BetaBinomialTest, checks: np.ndarray) -> OperatingCharacteristics:
    """Exact outcome probabilities of the sequential test when each sample is a hit with probability p.

    `checks`: the increasing sample counts after which the test is checked (`check_times`); the last is the
    budget. Forward dynamic programming over the number of hits h among t samples; stopped paths are absorbed.
    Only the band of undecided h between the two thresholds is kept, so the cost is O(budget * band width):
    well under a second for 20,000 samples.
    """
    if not 0.0 <= p <= 1.0:
        raise UserError(f"p must be in [0, 1], got {p}")
    checks = np.asarray(checks, dtype=np.int64)
    if checks.ndim != 1 or checks.size == 0 or checks[0] < 1 or (np.diff(checks) <= 0).any():
        raise UserError("checks must be increasing sample counts >= 1")
    stop, certify = test.boundaries(checks)
    mass = np.zeros(checks[-1] + 2)  # mass[h] = P(undecided with h hits), nonzero only for lo <= h < hi
    mass[0], lo, hi = 1.0, 0, 1
    p_cert = p_stop = expected = 0.0
    t = 0
    for check, s, c in zip(checks, stop, certify):
        expected += mass[lo:hi].sum() * (check - t)  # sum of P(tau > u) over u in [t, check)
        for _ in range(check - t):
            moved = mass[lo:hi] * p
            mass[lo:hi] *= 1 - p
            mass[lo + 1:hi + 1] += moved
            hi += 1
        t = check
        if s >= lo:
            p_stop += mass[lo:s + 1].sum()
            mass[lo:s + 1] = 0.0
            lo = s + 1
        if c < hi:
            p_cert += mass[c:hi].sum()
            mass[c:hi] = 0.0
            hi = c
        if lo >= hi:
            break
    return OperatingCharacteristics(float(p_cert), float(p_stop), float(mass[lo:hi].sum()), float(expected))


def false_certify_probability(
    p: float, p0: float, alpha: float, beta: float | None, max_samples: int, check_every: int = 1
) -> float:
    """Exact P(certified) for hit probability p (a false certificate when p <= p0)."""
    test = BetaBinomialTest(p0, alpha, beta)
    return operating_characteristics(p, test, check_times(max_samples, check_every)).p_certified


def expected_samples(
    p: float, p0: float, alpha: float, beta: float | None, max_samples: int, check_every: int = 1
) -> float:
    """Exact expected number of estimation samples (selection samples not included)."""
    test = BetaBinomialTest(p0, alpha, beta)
    return operating_characteristics(p, test, check_times(max_samples, check_every)).expected_samples
