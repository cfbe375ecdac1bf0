"""Cascaded smoothing (rrcm.engine.cascade), certified as the rule deployed.

The base classifiers here are interval classifiers on one direction w of the image: class labels[j] where
thresholds[j-1] <= w . (x - 1/2) < thresholds[j]. Their smoothed probabilities are known exactly, so the
deployed cascade's answer is known exactly at every point: a certificate is checked by moving the input
inside the radius it reports, along the worst directions, and statistical levels against exact rates.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import binomtest, norm
from torch import nn

import oracle
from rrcm.engine import Cascade, Certifier
from rrcm.engine.sequential import BetaBinomialTest, check_times, operating_characteristics
from rrcm.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 16, 16)
ABSTAIN = Certifier.ABSTAIN


def directions() -> tuple[torch.Tensor, torch.Tensor]:
    """Two orthogonal unit vectors of +-1/16 entries: moving by 2 along either changes a pixel by 0.125."""
    g = torch.Generator().manual_seed(0)
    size = math.prod(SHAPE)
    signs = torch.randint(0, 2, (size,), generator=g).double() * 2 - 1
    pattern = (torch.arange(size) % 2).double() * 2 - 1
    pattern = pattern[torch.randperm(size, generator=g)]
    return signs / 16, signs * pattern / 16


W1, W2 = directions()


class Intervals(nn.Module):
    """Class labels[j] where thresholds[j-1] <= w . (x - 1/2) < thresholds[j] (thresholds increasing)."""

    def __init__(self, w: torch.Tensor, thresholds, labels, num_classes: int):
        super().__init__()
        assert len(labels) == len(thresholds) + 1
        self.register_buffer("w", w.float())
        self.register_buffer("thresholds", torch.tensor(thresholds, dtype=torch.float32))
        self.register_buffer("labels", torch.tensor(labels))
        self.w64, self.edges = w, np.array([-np.inf, *thresholds, np.inf])
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = (x.flatten(1) - 0.5) @ self.w
        return F.one_hot(self.labels[torch.bucketize(t, self.thresholds, right=True)], self.num_classes).float()

    def probabilities(self, point: torch.Tensor, sigma: float) -> np.ndarray:
        """Exact P(f(point + sigma e) = c) for every class c: w . e ~ N(0, 1) since |w| = 1."""
        t = float((point.flatten().double() - 0.5) @ self.w64)
        mass = np.diff(norm.cdf((self.edges - t) / sigma))
        return np.bincount(self.labels.numpy(), weights=mass, minlength=self.num_classes)


def spread(w: torch.Tensor, num_classes: int, width: float = 0.5, reach: float = 20.0) -> Intervals:
    """Intervals of `width` cycling through the classes over [-reach, reach]: at sigma 1 every class stays near
    1 / (num_classes (or the share of a cycle)), so this stage passes everywhere it is sampled."""
    thresholds = np.arange(-reach, reach + width / 2, width).tolist()
    return Intervals(w, thresholds, [j % num_classes for j in range(len(thresholds) + 1)], num_classes)


def point(a: float, b: float = 0.0) -> torch.Tensor:
    """The image 1/2 + a w1 + b w2 (in [0, 1] for |a| + |b| < 8)."""
    return (0.5 + a * W1 + b * W2).float().view(SHAPE)


def exact_answer(stages: list[tuple[float, Intervals]], y: torch.Tensor, p0: float = 0.5) -> int:
    """The deployed cascade's answer at y from the exact smoothed probabilities."""
    for sigma, model in sorted(stages, key=lambda s: -s[0]):
        p = model.probabilities(y, sigma)
        if p.max() > p0:
            return int(p.argmax())
    return ABSTAIN


def cascade(stages, p0: float = 0.5, batch_size: int = 4096) -> Cascade:
    return Cascade([Certifier(model, model.num_classes, sigma, batch_size=batch_size) for sigma, model in stages], p0)


def ball(x: torch.Tensor, radius: float, angles: int = 72) -> list[torch.Tensor]:
    """Points of the disc of `radius` around x in the plane of w1 and w2 (where every classifier here varies):
    the centre, and rings at half and 0.999 of the radius."""
    points = [x]
    for rho in (0.5 * radius, 0.999 * radius):
        for theta in np.linspace(0, 2 * np.pi, angles, endpoint=False):
            points.append(x + (rho * (math.cos(theta) * W1 + math.sin(theta) * W2)).float().view(SHAPE))
    return points


# --- the example: sigma 0.25 with its boundary at 0, sigma 1.0 with its boundary at 1 -----------------

EXAMPLE = [(0.25, Intervals(W1, [0.0], [0, 1], 2)), (1.0, Intervals(W1, [1.0], [0, 1], 2))]


def test_the_example_holds_inside_its_radius():
    run = cascade(EXAMPLE)
    for t in (-0.5, 0.5, 1.3):
        x = point(t)
        c = run.certify(x, 100, 20_000, 0.001, seed=1)
        assert c.prediction == exact_answer(EXAMPLE, x) != ABSTAIN
        assert c.sigma == 1.0  # sigma 1.0 answers wherever p(c) > 1/2, i.e. everywhere but at t = 1
        # The answer changes only at t = 1 (sigma 1.0's boundary): the radius must not reach past it.
        assert 0 < c.radius < abs(t - 1.0)
        for y in ball(x, c.radius):
            assert exact_answer(EXAMPLE, y) == c.prediction
        # The deployed rule by Monte Carlo, at the far ends of the radius along the worst direction.
        for sign in (-1, 1):
            y = x + (sign * 0.999 * c.radius * W1).float().view(SHAPE)
            assert run.predict(y, 20_000, 0.001, seed=2) in (c.prediction, ABSTAIN)
    # The withdrawn largest-radius rule reported class 0 at radius 1.48 at t = -0.5 and broke it within 1.0;
    # the cascade's answer at t = +0.5 is still class 0.
    assert run.certify(point(0.5), 100, 20_000, 0.001, seed=3).prediction == 0


# --- every certificate on a planar family, checked on its ball ------------------------------------------------

def planar_family(num_classes: int = 10) -> list[tuple[float, Intervals]]:
    """Each stage spreads its votes in a band (narrow intervals cycling through classes 2..) and answers outside
    it (one class on each side): sigma 1.0 along w2, sigma 0.5 along w1; sigma 0.25 is a slab on (w1 + w2) / sqrt 2."""
    high = Intervals(W2, np.linspace(-2.0, 2.0, 10).tolist(), [0] + [2 + j % 8 for j in range(9)] + [1], num_classes)
    middle = Intervals(W1, np.linspace(-0.75, 0.75, 11).tolist(), [0] + [3 + j % 7 for j in range(10)] + [1], num_classes)
    low = Intervals((W1 + W2) / math.sqrt(2), [-0.2, 0.4], [1, 2, 0], num_classes)
    return [(1.0, high), (0.5, middle), (0.25, low)]


def test_every_certificate_holds_on_its_ball():
    family = planar_family()
    run = cascade(family)
    rng = np.random.default_rng(0)
    answered_by, binding_earlier = set(), 0
    for i in range(120):
        a, b = rng.uniform(-3, 3, size=2)
        x = point(a, b)
        # alpha tiny: every bound holds, so what is tested here is the radius the bounds give.
        c = run.certify(x, 64, 4000, 1e-9, seed=i)
        if c.prediction == ABSTAIN:
            continue
        assert c.prediction == exact_answer(family, x), (a, b)
        for y in ball(x, c.radius):
            assert exact_answer(family, y) == c.prediction, (a, b, c)
        answered_by.add(c.sigma)
        last = c.stages[-1]
        own = last.sigma * (norm.ppf(last.p_lower) - norm.ppf(0.5))
        binding_earlier += c.radius < own - 1e-12
    # The test exercised what it is for: every stage answered somewhere, and earlier stages limited radii.
    assert answered_by == {1.0, 0.5, 0.25}
    assert binding_earlier >= 5


def test_passing_stages_stop_early_and_abstentions_are_cheap():
    family = [(1.0, spread(W2, 10)), (0.25, Intervals(W1, [0.0], [0, 1], 10))]
    run = cascade(family, batch_size=1024)
    c = run.certify(point(0.5), 100, 10_000, 0.001, seed=0)
    assert c.prediction == 1 and c.stages[0].outcome == "pass"
    assert c.stages[0].samples < 1_000  # the spread stage passed at a tenth of its budget
    # A last stage that spreads its votes too abstains at a fraction of its budget.
    c = cascade([(1.0, spread(W2, 10)), (0.25, spread(W1, 10, width=0.1))], batch_size=1024).certify(
        point(0.5), 100, 10_000, 0.001, seed=0)
    assert c.prediction == ABSTAIN and c.stages[-1].outcome == "undecided" and c.samples < 2_000
    # Without beta, only stops that change nothing: the last stage then runs until too few hits are left.
    c = run.certify(point(0.5), 100, 10_000, 0.001, seed=0, beta=None)
    assert c.prediction == 1


# --- levels, against exact rates -------------------------------------------------------------------------------

def test_false_bounds_at_the_exact_rate():
    """Sigma 1.0 spreads (it passes), sigma 0.25 has P(class 1) = 0.8 exactly. The answering stage's lower bound
    is Clopper-Pearson at n, level alpha / 2 (K = 2): it exceeds 0.8 at a rate the binomial sums give exactly."""
    p, n0, n, alpha, trials = 0.8, 11, 300, 0.2, 800
    family = [(1.0, spread(W2, 10)), (0.25, Intervals(W1, [0.0], [0, 1], 10))]
    run = cascade(family)
    x = point(0.25 * float(oracle.normal_quantile(p)))
    assert np.isclose(family[1][1].probabilities(x, 0.25)[1], p, atol=1e-6)
    false_lower = false_upper = 0
    for seed in range(trials):
        c = run.certify(x, n0, n, alpha, seed=seed)
        first, last = c.stages[0], c.stages[-1]
        assert first.outcome == "pass"  # every class near 0.1 at sigma 1.0
        false_upper += bool((first.p_upper < family[0][1].probabilities(x, 1.0)).any())
        if last.outcome == "answer":
            false_lower += last.p_lower > family[1][1].probabilities(x, 0.25)[last.selected]
    select = float(sum(oracle.binomial_pmf(j, n0, p) for j in range(n0 // 2 + 1, n0 + 1)))
    needed = next(h for h in range(n + 1) if oracle.clopper_pearson_lower(h, n, alpha / 2) > 0.5)
    exact = select * float(sum(oracle.binomial_pmf(h, n, p) for h in range(needed, n + 1)
                               if oracle.clopper_pearson_lower(h, n, alpha / 2) > p))
    assert 0.05 < exact <= alpha / 2
    # Two-sided: alpha in place of alpha / 2 (a rate near 0.19) or a looser bound would both be rejected.
    assert binomtest(false_lower, trials, exact).pvalue > 1e-4, (false_lower / trials, exact)
    # Anytime upper bounds at alpha / (2 K C) each: at most that rate for the ten classes together.
    assert binomtest(false_upper, trials, alpha / 4, alternative="greater").pvalue > 1e-4


def test_decision_at_a_radius_at_the_exact_rate():
    """Decided at r = the true radius d, a certificate is false; the last stage's anytime test is the only way to
    give one, at the exact rate its dynamic program gives (level alpha / 2)."""
    # alpha large, so that the rate is large enough to tell alpha / 2 (about 0.010) from alpha (about 0.024).
    sigma, d, alpha, trials, budget = 0.25, 0.1, 0.5, 2000, 600
    family = [(1.0, spread(W2, 10)), (sigma, Intervals(W1, [0.0], [0, 1], 10))]
    run = cascade(family, batch_size=64)
    x = point(d)
    decisions = [run.certify_radius(x, d, alpha, n0=11, max_samples=budget, seed=s) for s in range(trials)]
    false = sum(dec.certified for dec in decisions)
    p = float(norm.cdf(d / sigma))
    select = float(sum(oracle.binomial_pmf(j, 11, p) for j in range(6, 12)))
    test = BetaBinomialTest(float(norm.cdf(d / sigma)), alpha / 2, 1e-3)
    exact = select * operating_characteristics(p, test, check_times(budget, 64, 32)).p_certified
    assert 0.005 < exact <= alpha / 2
    assert binomtest(false, trials, exact).pvalue > 1e-4, (false / trials, exact)
    # Power: well inside the true radius, it is certified every time.
    inside = sum(run.certify_radius(x, 0.3 * d, 0.001, n0=100, max_samples=20_000, seed=s).certified for s in range(20))
    assert inside == 20


def test_decisions_hold_on_their_balls():
    family = planar_family()
    run = cascade(family)
    rng = np.random.default_rng(1)
    certified = 0
    for i in range(60):
        a, b = rng.uniform(-3, 3, size=2)
        x, r = point(a, b), float(rng.uniform(0.05, 0.6))
        dec = run.certify_radius(x, r, 1e-9, n0=64, max_samples=8000, seed=i)
        if dec.certified:
            certified += 1
            assert all(exact_answer(family, y) == dec.prediction for y in ball(x, r))
    assert certified >= 15


# --- one sigma is Cohen et al.'s CERTIFY; bad input ----------------------------------------------------------

@pytest.mark.parametrize("t", [-0.3, 0.0, 0.02, 0.1, 0.6])
def test_one_sigma_is_the_ordinary_certify(t):
    model = Intervals(W1, [0.0], [0, 1], 2)
    certifier = Certifier(model, 2, 0.5, batch_size=256)
    for seed in range(3):
        plain = certifier.certify(point(t), 50, 3000, 0.01, seed=seed)
        for beta in (None, 1e-3):  # beta: the same but for early abstentions, none of them on these seeds
            cascaded = Cascade([certifier]).certify(point(t), 50, 3000, 0.01, seed=seed, beta=beta)
            assert (cascaded.prediction, cascaded.radius) == (plain.prediction, pytest.approx(plain.radius, abs=1e-12))
            assert cascaded.samples <= plain.samples
        plain_decision = certifier.certify_radius(point(t), 0.1, 0.01, n0=50, max_samples=3000, seed=seed)
        decision = Cascade([certifier]).certify_radius(point(t), 0.1, 0.01, n0=50, max_samples=3000, seed=seed)
        assert (decision.prediction, decision.certified, decision.samples) == \
            (plain_decision.prediction, plain_decision.certified, plain_decision.samples)


def test_bad_cascades():
    model = Intervals(W1, [0.0], [0, 1], 2)
    with pytest.raises(UserError, match="at least one"):
        Cascade([])
    with pytest.raises(UserError, match="each sigma once"):
        Cascade([Certifier(model, 2, 0.5), Certifier(model, 2, 0.5)])
    with pytest.raises(UserError, match="same classes"):
        Cascade([Certifier(model, 2, 0.5), Certifier(Intervals(W1, [0.0], [0, 1], 3), 3, 1.0)])
    for p0 in (0.4, 1.0, float("nan")):
        with pytest.raises(UserError, match="p0"):
            Cascade([Certifier(model, 2, 0.5)], p0=p0)
    run = Cascade([Certifier(model, 2, 0.5), Certifier(model, 2, 1.0)])
    with pytest.raises(UserError, match="alpha"):
        run.certify(point(0.1), 10, 10, 1.5)
    with pytest.raises(UserError, match="n must be"):
        run.certify(point(0.1), 10, 0, 0.01)
    with pytest.raises(UserError, match="radius"):
        run.certify_radius(point(0.1), -1.0, 0.01)


# --- the commands ----------------------------------------------------------------------------------------------

def test_certify_and_predict_commands_run_the_cascade(tmp_path, capsys):
    from rrcm.cli import main
    from rrcm.engine.analyze import read_results

    out = tmp_path / "c.tsv"
    args = ["certify", "--model", "fashion-mnist", "--sigma", "0.25,0.5,1", "--n0", "20", "--n", "200", "--max", "4",
            "--skip", "500", "--out", str(out)]
    assert main(args) == 0
    header, *rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert header == ["idx", "label", "predict", "radius", "correct", "samples", "sigma", "time"]
    assert [r[0] for r in rows] == ["0", "500", "1000", "1500"]
    for r in rows:
        assert (r[6] in ("0.25", "0.5", "1")) if r[2] != "-1" else (r[6] == "-" and r[3] == "0.0000")
        assert 20 <= int(r[5]) <= 3 * 220
    first = out.read_text()
    assert read_results(out).samples_per_image().tolist() == [int(r[5]) for r in rows]
    assert main(args) == 0 and out.read_text() == first  # resumes: nothing left to do
    assert "at radius 0 / 0.25 / 0.5 / 1" in capsys.readouterr().out
    # The same images through one bundled classifier per sigma, named one by one, give the same rows.
    again = tmp_path / "again.tsv"
    assert main([*args[:2], "fashion-mnist,fashion-mnist,fashion-mnist", *args[3:-1], str(again)]) == 0
    strip = lambda text: [line.rsplit("\t", 1)[0] for line in text.splitlines()]  # noqa: E731  (times differ)
    assert strip(again.read_text()) == strip(first)
    decided = tmp_path / "r.tsv"
    assert main(["certify", "--model", "fashion-mnist", "--sigma", "0.5,1", "--radius", "0.5", "--n0", "20", "--n", "500",
                 "--max", "2", "--p0", "0.6", "--out", str(decided)]) == 0
    assert decided.read_text().splitlines()[0] == "idx\tlabel\tpredict\tcertified\tsamples\tsigma\ttime"
    predicted = tmp_path / "p.tsv"
    assert main(["predict", "--model", "fashion-mnist", "--sigma", "0.25,0.5,1", "--n", "200", "--max", "3",
                 "--out", str(predicted)]) == 0
    assert predicted.read_text().splitlines()[0] == "idx\tlabel\tpredict\tcorrect\tsamples\tsigma\ttime"
    assert read_results(predicted).samples is not None


@pytest.mark.parametrize("extra, message", [
    (["--sigma", "0.25,0.25"], "lists a sigma twice"),
    (["--sigma", "0.25,x"], "comma-separated numbers"),
    (["--sigma", "0.25,-1"], "--sigma"),
    (["--sigma", "0.25,0.5", "--adaptive"], "exclude each other"),
    (["--sigma", "0.25,0.5", "--p0", "0.3"], "--p0"),
    (["--sigma", "0.25", "--p0", "0.6"], "several sigmas"),
    (["--sigma", "0.3,0.5"], "classifier for each of sigma 0.25, 0.5, 1"),
])
def test_bad_sets_of_sigmas_on_the_command_line(tmp_path, capsys, extra, message):
    from rrcm.cli import main

    out = tmp_path / "c.tsv"
    assert main(["certify", "--model", "fashion-mnist", "--n", "10", "--max", "1", *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rrcm: error:") and message in err[0], err
    assert not out.exists()


def test_models_and_sigmas_pair_up():
    from rrcm.engine.commands import model_sigma_pairs

    assert model_sigma_pairs("fashion-mnist", "0.25,0.5") == [("fashion-mnist", 0.25), ("fashion-mnist", 0.5)]
    assert model_sigma_pairs("a,b", "0.25,0.5") == [("a", 0.25), ("b", 0.5)]
    assert model_sigma_pairs("a,b", None) == [("a", None), ("b", None)]
    with pytest.raises(UserError, match="2 models for 3 sigmas"):
        model_sigma_pairs("a,b", "0.25,0.5,1")
