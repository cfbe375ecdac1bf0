"""The largest certifiable radius within a sample budget, stopping early when more samples would not pay.

Estimation samples are looked at only at checkpoints n_1 < ... < n_K = N fixed in advance, each with its own
Clopper-Pearson level alpha_k, sum alpha_k = alpha. By the union bound, with probability >= 1 - alpha every
lower bound at every checkpoint (reached or not) is below the true p; so the best bound so far is valid
whenever the stream is stopped, by any rule that looks at the data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtri

from rrcm.engine.sequential import Sampler, draw_counts
from rrcm.engine.stats import ABSTAIN, lower_confidence_bound, upper_confidence_bound
from rrcm.errors import UserError



def doubling_checkpoints(max_samples: int, first: int = 100) -> list[int]:
    """first, 2 first, 4 first, ... below max_samples, then max_samples."""
    if max_samples < 1 or first < 1:
        raise UserError(f"max_samples and the first checkpoint must be >= 1, got {max_samples}, {first}")
    points = []
    n = first
    while n < max_samples:
        points.append(n)
        n *= 2
    return points + [max_samples]


def checkpoint_levels(num_checkpoints: int, alpha: float) -> np.ndarray:
    """alpha/2 on the last checkpoint; alpha/2 over the earlier ones k = 0, 1, ... in proportion to 1/((k+1)(k+2))."""
    if num_checkpoints < 1:
        raise UserError("at least one checkpoint is needed")
    if num_checkpoints == 1:
        return np.array([alpha])
    k = np.arange(num_checkpoints - 1)
    weights = 1.0 / ((k + 1) * (k + 2))
    return np.append(alpha / 2 * weights / weights.sum(), alpha / 2)


@dataclass(frozen=True)
class AdaptiveResult:
    prediction: int  # the class, or ABSTAIN
    radius: float  # sigma * PhiInv(p_lower); 0.0 when abstaining
    p_lower: float  # the best lower bound on the class's probability
    samples: int  # noisy forward passes spent: n0 selection + estimation samples


def certify_adaptive(
    draw_select: Sampler,
    draw_estimate: Sampler,
    num_classes: int,
    sigma: float,
    alpha: float,
    *,
    n0: int = 100,
    max_samples: int = 100_000,
    tolerance: float = 0.01,
    checkpoints: list[int] | None = None,
) -> AdaptiveResult:
    """Cohen et al.'s CERTIFY with a budget of `max_samples` estimation samples read at checkpoints.

    After each checkpoint it stops when a radius is certified and the radius predicted at the budget (the
    current hit rate at the final level) exceeds it by at most `tolerance`, or when the upper confidence bound
    is below 1/2 (a clear abstention); an uncertain abstention spends the budget, so accuracy at radius 0 is kept.
    `draw_estimate(m)` may be asked for tens of thousands of samples at once.
    Guarantee, whatever the stopping: P(radius > the smoothed classifier's true radius for the class) <= alpha.
    """
    if not (sigma > 0 and math.isfinite(sigma)):
        raise UserError(f"sigma must be positive, got {sigma}")
    if not 0.0 < alpha < 1.0:
        raise UserError(f"alpha must be in (0, 1), got {alpha}")
    if not tolerance >= 0:
        raise UserError(f"tolerance must be >= 0, got {tolerance}")
    if n0 < 1:
        raise UserError(f"n0 must be >= 1, got {n0}")
    checkpoints = doubling_checkpoints(max_samples) if checkpoints is None else [int(n) for n in checkpoints]
    increasing = all(b > a for a, b in zip(checkpoints, checkpoints[1:]))
    if not checkpoints or checkpoints[0] < 1 or not increasing or checkpoints[-1] != max_samples:
        raise UserError(f"checkpoints must increase from >= 1 and end at max_samples={max_samples}, got {checkpoints}")
    levels = checkpoint_levels(len(checkpoints), alpha)
    prediction = int(np.argmax(draw_counts(draw_select, n0, num_classes)))
    t = h = 0
    best = 0.0
    for n, level in zip(checkpoints, levels):
        h += int(draw_counts(draw_estimate, n - t, num_classes)[prediction])
        t = n
        best = max(best, float(lower_confidence_bound(h, t, level)))
        if t == max_samples or upper_confidence_bound(h, t, level) < 0.5:
            break
        if best > 0.5:
            predicted = lower_confidence_bound(round(h / t * max_samples), max_samples, levels[-1])
            if sigma * (ndtri(predicted) - ndtri(best)) <= tolerance:
                break
    if best <= 0.5:
        return AdaptiveResult(ABSTAIN, 0.0, best, n0 + t)
    return AdaptiveResult(prediction, float(sigma * ndtri(best)), best, n0 + t)
