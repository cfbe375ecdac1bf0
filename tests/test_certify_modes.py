"""Certifier modes of issue 7: decision at a radius, adaptive budget, sound sampling; and their CLI / TSV."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import binom
from torch import nn

from deploy_helpers import SIGMA, fashion_test_images, tiny_checkpoint
import oracle
from halfspace import HalfSpace, point_at_distance
from rrcm import load_classifier
from rrcm.cli import main
from rrcm.engine import Certifier
from rrcm.engine import stats
from rrcm.engine.adaptive import checkpoint_levels, doubling_checkpoints
from rrcm.engine.certifier import derive_seed
from rrcm.engine.sequential import BetaBinomialTest, check_times, operating_characteristics
from rrcm.errors import UserError
from rrcm.kernels.sound import tv_per_pixel

SHAPE = (1, 16, 16)


pytestmark = pytest.mark.usefixtures("one_thread")




def grid_image(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, SHAPE, generator=torch.Generator().manual_seed(seed)).float() / 255


# --- decision at a radius ---------------------------------------------------------------------------------------

def test_certify_radius_decides_by_the_true_radius():
    sigma = 0.5
    model = HalfSpace(SHAPE, seed=3)
    certifier = Certifier(model, 2, sigma, batch_size=1000)
    far = certifier.certify_radius(point_at_distance(model, 1.0), 0.25, 0.001, max_samples=20_000, seed=1)
    assert far.prediction == 1 and far.certified
    assert far.samples < 1000  # p = Phi(2) against p0 = Phi(0.5): settled within the first batches
    near = certifier.certify_radius(point_at_distance(model, 0.1), 0.5, 0.001, max_samples=20_000, seed=1)
    assert near.prediction == 1 and not near.certified
    assert near.samples < 20_100  # stopped as not certified (or at the budget), never beyond it


def test_certify_radius_seeds_reproduce():
    model = HalfSpace(SHAPE, seed=3)
    certifier = Certifier(model, 2, 0.5, batch_size=500)
    x = point_at_distance(model, 0.45)
    runs = [certifier.certify_radius(x, 0.4, 0.01, max_samples=5000, seed=s) for s in (4, 4, 5)]
    assert runs[0] == runs[1]
    # Same decisions as the sequential module fed with the seed's two streams.
    counts = certifier.sample_counts(x[None], [100], certifier._streams([4], 0))[0]
    assert runs[0].prediction == int(counts.argmax())


def within_binomial_quantiles(count: int, trials: int, rate: float, tail: float = 1e-4) -> bool:
    """count is inside the two-sided `tail` quantiles of Binomial(trials, rate): a test that refuses a right law
    with probability <= 2 tail."""
    return binom.ppf(tail, trials, rate) <= count <= binom.isf(tail, trials, rate)


@pytest.mark.parametrize("excess", [0.0, 0.03])
def test_certify_radius_certifies_at_the_exact_rate(excess):
    """A half-space point where P(class 1) = p0 + excess, p0 = Phi(r / sigma); n0 = 11 selection samples (class 0
    may win them). Over 300 seeds the certificates are counted against the exact rate, two-sided: the sequential
    test's dynamic program for each class, weighted by the binomial law of the selection.
    excess 0: every certificate is false (true radius r); exact rate 0.0013, far below alpha by Ville's inequality;
    refused above 4 of 300, so a rate of 2 alpha = 0.1 passes with probability 1e-9.
    excess 0.03: exact rate 0.25; refused outside [49, 104] of 300, so the rates at excess 0.02 (0.05) and 0.04
    (0.63) pass with probability < 1e-9."""
    sigma, r, alpha, n0, trials, max_samples = 0.5, 0.3, 0.05, 11, 300, 2000
    model = HalfSpace(SHAPE, seed=2)
    certifier = Certifier(model, 2, sigma, batch_size=1000)
    p0 = float(oracle.mp.ncdf(r / sigma))
    p = p0 + excess
    x = point_at_distance(model, sigma * oracle.normal_quantile(p))
    certified = sum(certifier.certify_radius(x, r, alpha, n0=n0, max_samples=max_samples, seed=s).certified
                    for s in range(trials))
    test, checks = BetaBinomialTest(p0, alpha, 1e-3), check_times(max_samples, 1000, 32)  # certify_radius's defaults
    select_1 = binom.sf(n0 // 2, n0, p)
    exact = (select_1 * operating_characteristics(p, test, checks).p_certified
             + (1 - select_1) * operating_characteristics(1 - p, test, checks).p_certified)
    assert within_binomial_quantiles(certified, trials, exact), (certified, exact)
    if excess == 0.0:
        assert exact <= alpha


def test_certify_radius_refuses_bad_values():
    model = HalfSpace(SHAPE, seed=3)
    certifier = Certifier(model, 2, 0.5)
    x = point_at_distance(model, 0.5)
    for kwargs in ({"r": -0.1}, {"r": float("nan")}, {"r": 0.2, "alpha": 0.0}, {"r": 0.2, "max_samples": 0}):
        with pytest.raises(UserError):
            certifier.certify_radius(x, **{"alpha": 0.01, **kwargs})


# --- adaptive maximum radius --------------------------------------------------------------------------------------

def test_adaptive_spends_at_most_the_budget_and_is_sound():
    sigma, d, budget = 0.5, 1.0, 20_000
    model = HalfSpace(SHAPE, seed=3)
    certifier = Certifier(model, 2, sigma, batch_size=2000)
    x = point_at_distance(model, d)
    result = certifier.certify(x, 100, budget, 0.001, seed=2, adaptive=True, tolerance=0.05)
    assert result.prediction == 1 and 0.5 * d < result.radius <= d
    assert result.samples < 100 + budget  # an easy case stops early
    assert result.counts.sum() == result.samples - 100
    again = certifier.certify(x, 100, budget, 0.001, seed=2, adaptive=True, tolerance=0.05)
    assert (again.prediction, again.radius, again.samples) == (result.prediction, result.radius, result.samples)
    assert np.array_equal(again.counts, result.counts)
    small = certifier.certify(x, 100, budget, 0.001, seed=2, adaptive=True, max_samples=300)
    assert small.samples <= 400
    fixed = certifier.certify(x, 100, 500, 0.001, seed=2)
    assert fixed.samples == 600 and fixed.counts.sum() == 500
    for tolerance in (0.0, -1.0, float("nan")):
        with pytest.raises(UserError):
            certifier.certify(x, 100, budget, 0.001, adaptive=True, tolerance=tolerance)


def test_adaptive_false_radius_rate_at_most_the_adversary_s():
    """P(radius > true radius) over 400 seeds on a half-space with true radius d (P(class 1) = 0.8), n0 = 11:
    whatever its stopping rule, at most what an adversary stopping at the first checkpoint whose bound exceeds the
    truth achieves, computed exactly (oracle: class 1 selected and a bound above 0.8, or class 0 and one above 1/2):
    0.073 at alpha = 0.1. Refused above its 1e-4 binomial quantile, 50 of 400: a rate of 2 alpha passes with
    probability 5e-5."""
    sigma, alpha, trials, n0, budget = 0.5, 0.1, 400, 11, 1600
    model = HalfSpace(SHAPE, seed=4)
    d = sigma * oracle.normal_quantile(0.8)
    certifier = Certifier(model, 2, sigma, batch_size=2000)
    x = point_at_distance(model, d)
    results = [certifier.certify(x, n0, budget, alpha, seed=s, adaptive=True, tolerance=0.02) for s in range(trials)]
    false = sum((r.prediction == 1 and r.radius > d) or r.prediction == 0 for r in results)
    checkpoints = doubling_checkpoints(budget)
    levels = checkpoint_levels(len(checkpoints), alpha)
    select_1 = binom.sf(n0 // 2, n0, 0.8)
    bound = (select_1 * oracle.adversary_failure(0.8, checkpoints, levels)
             + (1 - select_1) * oracle.adversary_failure(0.2, checkpoints, levels, threshold=0.5))
    assert bound <= alpha
    assert false <= binom.isf(1e-4, trials, bound), (false, bound)


# --- sound sampling ---------------------------------------------------------------------------------------------

class GridRecorder(nn.Module):
    """Two-class logits, counting the inputs it saw off the 1/255 grid (beyond float32 rounding of k / 255)."""

    def __init__(self):
        super().__init__()
        self.off_grid = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaled = x.double() * 255
        self.off_grid += int(((scaled - scaled.round()).abs() > 1e-4).flatten(1).any(1).sum())
        s = x.flatten(1).mean(1) - 0.5
        return torch.stack([-s, s], 1)


def test_sound_refuses_off_grid_images_and_feeds_grid_values():
    recorder = GridRecorder()
    certifier = Certifier(recorder, 2, 0.25, batch_size=700, sound=True)
    certifier.check_input(SHAPE)  # its probe is not on the grid
    recorder.off_grid = 0
    with pytest.raises(UserError, match="grid"):
        certifier.certify(torch.rand(SHAPE) * 0.5 + 0.001, 10, 100, 0.01)
    x = grid_image()
    result = certifier.certify(x, 20, 1500, 0.01, seed=3)
    assert result.samples == 1520 and result.counts.sum() == 1500
    top = int(certifier.sample_counts(certifier._images([x]), [20], certifier._streams([3], 0))[0].argmax())
    exact = stats.lower_confidence_bound(int(result.counts[top]), 1500, 0.01)
    assert certifier.slack() == tv_per_pixel(0.25) * 256
    assert result.p_lower == pytest.approx(exact - certifier.slack(), abs=1e-15)
    assert result.p_lower < exact
    assert certifier.predict(x, 500, 0.01, seed=1) in (0, 1, Certifier.ABSTAIN)
    assert certifier.certify_radius(x, 0.0, 0.01, max_samples=2000, seed=1).samples <= 2100
    assert certifier.certify(x, 20, 1500, 0.01, seed=3, adaptive=True).samples <= 1520
    assert recorder.off_grid == 0
    Certifier(recorder, 2, 0.25, batch_size=700).certify(x, 20, 100, 0.01)
    assert recorder.off_grid > 100  # the recorder does catch Gaussian noise


def test_sound_certificates_on_a_halfspace_stay_sound():
    sigma = 0.5
    model = HalfSpace(SHAPE, seed=3)
    x = (point_at_distance(model, 1.0) * 255).round() / 255
    d = float(x.flatten() @ model.w + model.b)
    certifier = Certifier(model, 2, sigma, batch_size=2000, sound=True)
    result = certifier.certify(x, 100, 4000, 0.001, seed=0)
    # Rounding to the grid moves the law slightly; the radius is still close to, and in practice below, d.
    assert result.prediction == 1 and 0.5 * d < result.radius < d + 0.05


# --- CLI ------------------------------------------------------------------------------------------------------

def certify(out, *extra: str) -> int:
    return main(["certify", "--model", str(tiny_checkpoint()), "--out", str(out), *extra])


def lines(path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


def test_cli_radius_rows(tmp_path):
    out = tmp_path / "r.tsv"
    assert certify(out, "--radius", "0.1", "--n0", "10", "--n", "300", "--max", "3", "--alpha", "0.01", "--batch", "200") == 0
    header, *got = lines(out)
    assert header == ["idx", "label", "predict", "certified", "samples", "time"]
    certifier = Certifier(load_classifier(tiny_checkpoint()), 10, SIGMA, batch_size=200)
    images, labels = fashion_test_images(3)
    assert [int(r[0]) for r in got] == [0, 1, 2]
    for idx, label, predict, certified, samples, _ in got:
        want = certifier.certify_radius(images[int(idx)], 0.1, 0.01, n0=10, max_samples=300, seed=derive_seed(0, int(idx)))
        assert (int(label), int(predict), bool(int(certified)), int(samples)) == (
            labels[int(idx)], want.prediction, want.certified, want.samples)
    sidecar = json.loads((tmp_path / "r.tsv.json").read_text())
    assert sidecar["radius"] == 0.1 and sidecar["beta"] == 1e-3
    # Resume refuses another mode on the same file.
    assert certify(out, "--n0", "10", "--n", "300", "--max", "3", "--alpha", "0.01") == 2
    assert certify(out, "--radius", "0.2", "--n0", "10", "--n", "300", "--max", "3", "--alpha", "0.01") == 2
    assert certify(out, "--radius", "0.1", "--n0", "10", "--n", "300", "--max", "4", "--alpha", "0.01") == 0
    assert len(lines(out)) == 5
    assert certify(out, "--radius", "0.1", "--beta", "0.01", "--n0", "10", "--n", "300", "--max", "4", "--alpha", "0.01") == 2


def test_cli_beta_zero_never_stops_before_the_budget(tmp_path):
    out = tmp_path / "b.tsv"
    assert certify(out, "--radius", "0.3", "--beta", "0", "--n0", "10", "--n", "300", "--max", "2", "--alpha", "0.01") == 0
    assert [(r[3], r[4]) for r in lines(out)[1:]] == [("0", "310")] * 2  # tiny model: not certified at 0.3
    # The same images with beta 0.1 are given up on early.
    out = tmp_path / "b2.tsv"
    assert certify(out, "--radius", "0.3", "--beta", "0.1", "--n0", "10", "--n", "300", "--max", "2", "--alpha", "0.01") == 0
    assert all(r[3] == "0" and int(r[4]) < 310 for r in lines(out)[1:])


def test_cli_adaptive_rows(tmp_path):
    out = tmp_path / "a.tsv"
    assert certify(out, "--adaptive", "--tolerance", "0.05", "--n0", "10", "--n", "400", "--max", "3") == 0
    header, *got = lines(out)
    assert header == ["idx", "label", "predict", "radius", "correct", "samples", "time"]
    certifier = Certifier(load_classifier(tiny_checkpoint()), 10, SIGMA)
    images, labels = fashion_test_images(3)
    for idx, label, predict, radius, correct, samples, _ in got:
        want = certifier.certify(images[int(idx)], 10, 400, 0.001, seed=derive_seed(0, int(idx)), adaptive=True,
                                 tolerance=0.05)
        assert int(predict) == want.prediction and int(samples) == want.samples <= 410
        assert float(radius) <= want.radius < float(radius) + 1e-4
        assert int(correct) == int(want.prediction == labels[int(idx)])
    sidecar = json.loads((tmp_path / "a.tsv.json").read_text())
    assert sidecar["adaptive"] is True and sidecar["tolerance"] == 0.05
    assert certify(out, "--adaptive", "--tolerance", "0.1", "--n0", "10", "--n", "400", "--max", "3") == 2


def test_cli_sound(tmp_path):
    out = tmp_path / "s.tsv"
    assert certify(out, "--sound", "--n0", "10", "--n", "200", "--max", "2") == 0
    assert lines(out)[0] == ["idx", "label", "predict", "radius", "correct", "time"] and len(lines(out)) == 3
    assert json.loads((tmp_path / "s.tsv.json").read_text())["sound"] is True
    certifier = Certifier(load_classifier(tiny_checkpoint()), 10, SIGMA, sound=True)
    images, _ = fashion_test_images(2)
    for row in lines(out)[1:]:
        want = certifier.certify(images[int(row[0])], 10, 200, 0.001, seed=derive_seed(0, int(row[0])))
        assert int(row[2]) == want.prediction
    assert certify(out, "--n0", "10", "--n", "200", "--max", "2") == 2  # sound run, plain resume: refused
    predicted = tmp_path / "p.tsv"
    assert main(["predict", "--model", str(tiny_checkpoint()), "--sound", "--n", "200", "--max", "2", "--out", str(predicted)]) == 0
    assert lines(predicted)[0] == ["idx", "label", "predict", "correct", "time"] and len(lines(predicted)) == 3


@pytest.mark.parametrize("extra, message", [
    (["--radius", "-0.5"], "--radius"), (["--radius", "nan"], "--radius"),
    (["--adaptive", "--tolerance", "0"], "--tolerance"), (["--adaptive", "--tolerance", "-1"], "--tolerance"),
    (["--radius", "0.1", "--adaptive"], "exclude"), (["--tolerance", "0.1"], "--adaptive only"),
    (["--beta", "0.1"], "--radius and to several sigmas only"), (["--radius", "0.1", "--beta", "1"], "--beta"),
    (["--radius", "0.1", "--beta", "-0.1"], "--beta"),
])
def test_cli_bad_mode_values_exit_2(tmp_path, capsys, extra, message):
    out = tmp_path / "bad.tsv"
    assert certify(out, "--n0", "10", "--n", "100", "--max", "1", *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("rrcm: error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()
