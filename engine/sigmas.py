"""Certification at several noise levels at once, keeping the best radius, soundly.

Each image is certified by every certifier (one per sigma) with noise of its own, each at level alpha / K
for K certifiers (Bonferroni). Every one of the K certificates is wrong with probability at most alpha / K,
so by the union bound all of them hold together with probability at least 1 - alpha, and so does the one
reported: the largest radius, with the sigma that gave it (the certificate of that sigma's smoothed
classifier). Each sigma's class is chosen from that sigma's own selection samples.

Seeds: for image seed s, sigma number k draws from image seed s when k = 0 (one sigma is the ordinary run)
and from derive_seed(s, SIGMA_STREAM, k) otherwise.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rrcm.engine.certifier import Certifier, CertifyResult, derive_seed
from rrcm.engine.sequential import RadiusDecision
from rrcm.errors import UserError

SIGMA_STREAM = 2  # beside the selection (0) and estimation (1) streams of an image seed


@dataclass(frozen=True)
class BestCertificate:
    """The largest certified radius over the sigmas, and every sigma's own result (at level alpha / K)."""

    prediction: int  # the class certified at `sigma`, or Certifier.ABSTAIN when no sigma certifies
    radius: float
    sigma: float | None  # None when every sigma abstains
    results: tuple[CertifyResult, ...]

    @property
    def samples(self) -> int:
        return sum(r.samples or 0 for r in self.results)


def sigma_seed(seed: int | None, k: int) -> int | None:
    """The image seed that sigma number k draws from."""
    return seed if seed is None or k == 0 else derive_seed(seed, SIGMA_STREAM, k)


def check_certifiers(certifiers: Sequence[Certifier]) -> list[Certifier]:
    certifiers = list(certifiers)
    if not certifiers:
        raise UserError("certification at several sigmas needs at least one certifier")
    sigmas = [c.sigma for c in certifiers]
    if len({round(s, 12) for s in sigmas}) != len(sigmas):
        raise UserError(f"each sigma once, got {sigmas}")
    if len({c.num_classes for c in certifiers}) != 1:
        raise UserError("the certifiers of one run must have the same classes")
    return certifiers


def certify_best(certifiers: Sequence[Certifier], xs, n0: int, n: int, alpha: float,
                 seeds: Sequence[int | None] | None = None) -> list[BestCertificate]:
    """CERTIFY of each image of xs at every certifier's sigma, at level alpha / K each; per image the largest radius.

    P(any reported radius is wrong) <= alpha. seeds[i] makes image i's result exactly reproducible.
    """
    certifiers = check_certifiers(certifiers)
    level = _level(alpha, len(certifiers))
    count = len(xs)
    seeds = [None] * count if seeds is None else list(seeds)
    per_sigma = [c.certify_many(xs, n0, n, level, [sigma_seed(s, k) for s in seeds]) for k, c in enumerate(certifiers)]
    best = []
    for i in range(count):
        results = tuple(results[i] for results in per_sigma)
        k = max(range(len(certifiers)), key=lambda j: (results[j].prediction != Certifier.ABSTAIN, results[j].radius))
        if results[k].prediction == Certifier.ABSTAIN:
            best.append(BestCertificate(Certifier.ABSTAIN, 0.0, None, results))
        else:
            best.append(BestCertificate(results[k].prediction, results[k].radius, certifiers[k].sigma, results))
    return best


@dataclass(frozen=True)
class BestDecision:
    """Robust at r if any sigma certifies it at level alpha / K; `sigma` is the first that did (None: none did)."""

    prediction: int
    certified: bool
    sigma: float | None
    samples: int  # over every sigma tried


def certify_radius_best(certifiers: Sequence[Certifier], x, r: float, alpha: float, *, beta: float | None = 1e-3,
                        n0: int = 100, max_samples: int = 100_000, seed: int | None = None) -> BestDecision:
    """Is x robust at radius r at some sigma? The sigmas in order, each an anytime-valid test at level alpha / K,
    stopping at the first that certifies: P(certified while no sigma's smoothed classifier is robust at r) <= alpha.
    Without a certificate the prediction is the first sigma's."""
    certifiers = check_certifiers(certifiers)
    level = _level(alpha, len(certifiers))
    samples, first = 0, None
    for k, certifier in enumerate(certifiers):
        decision: RadiusDecision = certifier.certify_radius(x, r, level, beta=beta, n0=n0, max_samples=max_samples,
                                                            seed=sigma_seed(seed, k))
        samples += decision.samples
        first = decision if first is None else first
        if decision.certified:
            return BestDecision(decision.prediction, True, certifier.sigma, samples)
    return BestDecision(first.prediction, False, None, samples)


def _level(alpha: float, k: int) -> float:
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and 0 < alpha < 1):
        raise UserError(f"alpha must be in (0, 1), got {alpha!r}")
    return alpha / k
