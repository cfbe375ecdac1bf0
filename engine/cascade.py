"""Cascaded smoothing over several noise levels (Jeong & Shin, NeurIPS 2023), certified as the rule deployed.

The rule. Sigmas sigma_1 > ... > sigma_K, each with its smoothed class probabilities
p_k(c | x) = P(f_k(x + sigma_k e) = c). Stage k answers c when p_k(c | x) > p0 (p0 >= 1/2, so at most one
class can); otherwise x goes to stage k + 1. When no stage answers, the cascade abstains.

The certificate. x -> sigma PhiInv(p(c | x)) is 1-Lipschitz in x for every class (Salman et al., 2019). If
stage t answers c at x with p_t(c | x) >= pL, and every earlier stage k < t has p_k(b | x) <= pU_k for every
class b != c, then for every ||d|| < R, with

    R = min( sigma_t (PhiInv(pL) - PhiInv(p0)),  min_{k < t} sigma_k (PhiInv(p0) - PhiInv(pU_k)) ),

stage t still gives p_t(c | x + d) > p0, and no earlier stage gives any b != c more than p0 (an earlier
stage answering c itself leaves the answer c): the cascade answers c on the whole ball.

Monte Carlo, soundly. Each stage draws noise of its own and spends level alpha / K, whatever happens at the
other stages, so by the union bound every bound used holds together with probability >= 1 - alpha:
- the answering class c_k comes from n0 selection samples; its lower bound is Clopper-Pearson at the
  stage's full budget n (level alpha / K at the last stage, alpha / 2K at the others);
- stages before the last also bound every class's probability from above, anytime-valid
  (`sequential.upper_confidence_sequence`, Bonferroni over the C classes: alpha / 2KC each), read after each
  batch: a stage whose classes are all below p0 passes x on as soon as that is clear, at a fraction of n;
- a stage stops early once it can no longer answer (too few hits left for the Clopper-Pearson bound at n, or
  an anytime upper bound at level beta below p0) and can no longer pass (even no further hits leave a bound
  above p0, or some class's anytime lower bound at level beta / C is above p0). Stopping only ever abstains,
  so it spends no alpha; beta bounds the chance that an early stop loses an answer (beta=None: only stops
  that change nothing).
A stage that ends undecided (neither answering nor passing) makes the image abstain. With one sigma and
beta=None this is exactly Cohen et al.'s CERTIFY with the same noise (p0 = 1/2); with beta, the same but for
an early abstention, at most beta likely where CERTIFY would answer.

`certify_radius` decides "the cascade's answer is constant on the ball of radius r" with the anytime-valid
tests of `rrcm.engine.sequential` instead: the same events at the thresholds r asks for, at the same levels.

Seeds: for image seed s, stage k (0 = the largest sigma) draws from s when k = 0 and from
derive_seed(s, STAGE_STREAM, k) otherwise.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr, ndtri

from rrcm.engine import stats
from rrcm.engine.certifier import Certifier, derive_seed
from rrcm.engine.sequential import BetaBinomialTest, Decision, check_times, draw_counts, upper_confidence_sequence
from rrcm.errors import UserError

STAGE_STREAM = 2  # beside the selection (0) and estimation (1) streams of an image seed
FIRST_BATCH = 32  # a passing stage reads 32, 64, ... samples up to the batch size, then whole batches


@dataclass(frozen=True)
class Stage:
    """What one stage of one image found."""

    sigma: float
    outcome: str  # "answer", "pass" or "undecided"
    selected: int  # the class chosen from its selection samples
    p_lower: float  # lower bound on p(selected | x); nan where the stage stopped before its budget
    p_upper: np.ndarray | None  # (C,) upper bounds on each class; None at the last stage
    samples: int


@dataclass(frozen=True)
class CascadeCertificate:
    """The cascade's answer at x (Certifier.ABSTAIN: none) and the radius of the ball it holds on."""

    prediction: int
    radius: float
    sigma: float | None  # the stage that answered; None when abstaining
    samples: int  # noisy forward passes over all stages run
    stages: tuple[Stage, ...]


@dataclass(frozen=True)
class CascadeDecision:
    """Whether the cascade's answer at x holds on the ball of radius r; `sigma`: the stage that answered."""

    prediction: int
    certified: bool
    sigma: float | None
    samples: int


def stage_seed(seed: int | None, k: int) -> int | None:
    """The image seed that stage k (0: the largest sigma) draws from."""
    return seed if seed is None or k == 0 else derive_seed(seed, STAGE_STREAM, k)


class Cascade:
    """Cascaded smoothing over `certifiers` (one per sigma, any order: stages run from the largest sigma down)
    at threshold p0. Guarantee of `certify`: with probability >= 1 - alpha over the noise, every non-abstaining
    answer c with radius R is the cascade's answer at every point within distance R of x (R = 0: at x)."""

    def __init__(self, certifiers: Sequence[Certifier], p0: float = 0.5):
        certifiers = sorted(certifiers, key=lambda c: -c.sigma)
        if not certifiers:
            raise UserError("a cascade needs at least one sigma")
        sigmas = [c.sigma for c in certifiers]
        if any(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(sigmas, sigmas[1:])):
            raise UserError(f"each sigma once, got {sigmas}")
        if len({c.num_classes for c in certifiers}) != 1:
            raise UserError("the certifiers of one cascade must have the same classes")
        if not (isinstance(p0, (int, float)) and 0.5 <= p0 < 1):
            raise UserError(f"p0 must be in [0.5, 1), got {p0!r}")
        self.certifiers, self.p0 = certifiers, float(p0)
        self.num_classes = certifiers[0].num_classes

    @property
    def sigmas(self) -> list[float]:
        return [c.sigma for c in self.certifiers]

    def _levels(self, alpha: float, k: int) -> tuple[float, float]:
        """(lower-bound level, per-class upper-bound level) of stage k at overall level alpha."""
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and 0 < alpha < 1):
            raise UserError(f"alpha must be in (0, 1), got {alpha!r}")
        share = alpha / len(self.certifiers)
        if k == len(self.certifiers) - 1:  # the last stage never passes: no upper bounds
            return share, 0.0
        return share / 2, share / (2 * self.num_classes)

    def certify(self, x, n0: int, n: int, alpha: float, seed: int | None = None, *,
                beta: float | None = 1e-3) -> CascadeCertificate:
        """The cascade's certified answer at x: n0 selection and at most n estimation samples per stage; beta
        bounds the chance that a stage that would answer gives up early (None: never, but when settled)."""
        if beta is not None and not (isinstance(beta, (int, float)) and 0 < beta < 1):
            raise UserError(f"beta must be in (0, 1) or None, got {beta!r}")
        for name, value in (("n0", n0), ("n", n)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise UserError(f"{name} must be an integer >= 1, got {value!r}")
        stages: list[Stage] = []
        for k, certifier in enumerate(self.certifiers):
            stage = self._certify_stage(k, certifier, x, int(n0), int(n), alpha, beta, stage_seed(seed, k))
            stages.append(stage)
            if stage.outcome != "pass":
                break
        samples = sum(s.samples for s in stages)
        last = stages[-1]
        if last.outcome != "answer":
            return CascadeCertificate(Certifier.ABSTAIN, 0.0, None, samples, tuple(stages))
        c = last.selected
        radius = last.sigma * (float(ndtri(last.p_lower)) - float(ndtri(self.p0)))
        for s in stages[:-1]:
            others = np.delete(s.p_upper, c).max()
            radius = min(radius, s.sigma * (float(ndtri(self.p0)) - float(ndtri(others))))
        return CascadeCertificate(c, max(radius, 0.0), last.sigma, samples, tuple(stages))

    def _certify_stage(self, k: int, certifier: Certifier, x, n0: int, n: int, alpha: float, beta: float | None,
                       seed: int | None) -> Stage:
        lower_level, upper_level = self._levels(alpha, k)
        last = k == len(self.certifiers) - 1
        slack = certifier.slack()
        select, estimate = certifier.draws(x, seed)
        selected = int(np.argmax(draw_counts(select, n0, self.num_classes)))
        # The fewest hits of `selected` at n whose Clopper-Pearson bound, less the slack, exceeds p0.
        needed = _fewest_hits(n, lower_level, self.p0 + slack)
        # The last stage reads whole batches, as CERTIFY does (the same noise); the others start small.
        checks = check_times(n, certifier.batch_size, None if last else FIRST_BATCH).tolist()
        counts = np.zeros(self.num_classes, dtype=np.int64)
        t, upper = 0, None
        for check in checks:
            counts += draw_counts(estimate, check - t, self.num_classes)
            t = check
            if not last:
                upper = upper_confidence_sequence(t, counts, upper_level) + slack
                if upper.max() <= self.p0:
                    return Stage(certifier.sigma, "pass", selected, math.nan, upper, n0 + t)
            can_answer = counts[selected] + (n - t) >= needed and (
                beta is None or upper_confidence_sequence(t, counts[selected], beta) - slack > self.p0)
            if can_answer:
                continue
            # Only passing is left, which the last stage cannot; more samples lower an upper bound at most to its
            # value at n with no further hits, and a class clearly above p0 stays there.
            if last or (upper_confidence_sequence(n, counts, upper_level) + slack).max() > self.p0 or (
                    beta is not None
                    and (1.0 - upper_confidence_sequence(t, t - counts, beta / self.num_classes) + slack).max() > self.p0):
                break
        if t == n and counts[selected] >= needed:
            p_lower = float(stats.lower_confidence_bound(int(counts[selected]), n, lower_level)) - slack
            return Stage(certifier.sigma, "answer", selected, p_lower, upper, n0 + t)
        return Stage(certifier.sigma, "undecided", selected, math.nan, upper, n0 + t)

    def certify_radius(self, x, r: float, alpha: float, *, beta: float | None = 1e-3, n0: int = 100,
                       max_samples: int = 100_000, seed: int | None = None) -> CascadeDecision:
        """Is the cascade's answer at x the same on the whole ball of radius r? At each stage k, anytime-valid
        tests (`rrcm.engine.sequential`) of "p_k(selected) > Phi(PhiInv(p0) + r / sigma_k)" (answer) and, before
        the last stage, of "every p_k(b) < Phi(PhiInv(p0) - r / sigma_k)" (pass), read after each batch of at
        most max_samples: P(certified while the answer changes within r) <= alpha. beta bounds the chance that
        a stage gives up early on an image that would answer (None: never before the budget)."""
        if not (isinstance(r, (int, float)) and math.isfinite(r) and r >= 0):
            raise UserError(f"radius must be a number >= 0, got {r!r}")
        samples = 0
        for k, certifier in enumerate(self.certifiers):
            lower_level, upper_level = self._levels(alpha, k)
            shift = certifier.sigma * float(ndtri(self.p0))
            if k == len(self.certifiers) - 1:  # answer or not: the single-sigma test at radius r + shift
                d = certifier.certify_radius(x, r + shift, lower_level, beta=beta, n0=n0, max_samples=max_samples,
                                             seed=stage_seed(seed, k))
                return CascadeDecision(d.prediction, d.certified, certifier.sigma if d.certified else None,
                                       samples + d.samples)
            outcome, prediction, used = self._decide_stage(certifier, x, r, lower_level, upper_level, beta, n0,
                                                           max_samples, stage_seed(seed, k))
            samples += used
            if outcome != "pass":
                certified = outcome == "answer"
                return CascadeDecision(prediction, certified, certifier.sigma if certified else None, samples)
        raise AssertionError("the last stage always returns")

    def _decide_stage(self, certifier: Certifier, x, r: float, lower_level: float, upper_level: float,
                      beta: float | None, n0: int, max_samples: int, seed: int | None) -> tuple[str, int, int]:
        """(outcome, selected class, samples) of a stage before the last, deciding at radius r."""
        slack = certifier.slack()
        ceiling = float(np.nextafter(1.0, 0.0))
        high = min(float(ndtr(ndtri(self.p0) + r / certifier.sigma)) + slack, ceiling)
        low = float(ndtr(ndtri(self.p0) - r / certifier.sigma)) - slack
        select, estimate = certifier.draws(x, seed)
        selected = int(np.argmax(draw_counts(select, n0, self.num_classes)))
        answer = BetaBinomialTest(high, lower_level, beta) if high < 1.0 else None
        # "b < low" is the test's NOT_CERTIFIED side, at error upper_level; its CERTIFIED side ("b > low", at any
        # level: it only stops the stage) says the stage cannot pass.
        below = BetaBinomialTest(low, upper_level, upper_level) if low > 0.0 else None
        counts = np.zeros(self.num_classes, dtype=np.int64)
        t = 0
        for check in check_times(max_samples, certifier.batch_size, FIRST_BATCH).tolist():
            counts += draw_counts(estimate, check - t, self.num_classes)
            t = check
            if answer is not None and answer.decide(t, int(counts[selected])) == Decision.CERTIFIED:
                return "answer", selected, n0 + t
            decisions = below.decide_array(t, counts) if below is not None else None
            if decisions is not None and (decisions == Decision.NOT_CERTIFIED).all():
                return "pass", selected, n0 + t
            answer_out = answer is None or answer.decide(t, int(counts[selected])) == Decision.NOT_CERTIFIED
            pass_out = decisions is None or (decisions == Decision.CERTIFIED).any()
            if answer_out and pass_out:
                break
        return "undecided", selected, n0 + t

    def predict(self, x, n: int, alpha: float, seed: int | None = None, n0: int = 100,
                beta: float | None = 1e-3) -> int:
        """The cascade's answer at x, or Certifier.ABSTAIN: with probability >= 1 - alpha a returned class is
        the deployed rule's answer at x. `certify` with its radius dropped: n0 selection and at most n
        estimation samples per stage."""
        return self.certify(x, n0, n, alpha, seed, beta=beta).prediction


def _fewest_hits(n: int, level: float, p: float) -> int:
    """The smallest h whose Clopper-Pearson lower bound at level from h of n hits exceeds p (n + 1: none)."""
    if p >= 1.0:
        return n + 1
    lo, hi = -1, n + 1  # bound(lo) <= p < bound(hi), with bound(n + 1) taken as 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if stats.lower_confidence_bound(mid, n, level) > p:
            hi = mid
        else:
            lo = mid
    return hi
