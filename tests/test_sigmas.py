"""Certification at several sigmas (rrcm.engine.sigmas): sound at alpha by the union bound, tested on half-spaces,
whose true radius d is the same at every sigma (P(class 1) = Phi(d / sigma))."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from halfspace import HalfSpace, point_at_distance
from rrcm.engine import Certifier
from rrcm.engine.sigmas import certify_best, certify_radius_best, sigma_seed
from rrcm.errors import UserError
from test_certifier import exact_outcomes

SHAPE = (1, 8, 8)
SIGMAS = (0.25, 0.5, 1.0)

pytestmark = pytest.mark.usefixtures("one_thread")


def certifiers(model, sigmas=SIGMAS, batch_size=20_000):
    return [Certifier(model, 2, s, batch_size=batch_size) for s in sigmas]


def test_false_certificates_at_most_alpha_over_all_sigmas():
    d, n0, n, alpha, trials = 0.3, 11, 100, 0.3, 2000
    model = HalfSpace(SHAPE, seed=5, centred=True)
    x = point_at_distance(model, d)
    best = certify_best(certifiers(model), x.expand(trials, *SHAPE), n0, n, alpha, seeds=range(trials))

    def false(prediction, radius):
        return (prediction == 1 and radius > d) or prediction == 0

    reported = np.array([false(b.prediction, b.radius) for b in best])
    any_false = np.array([any(false(r.prediction, r.radius) for r in b.results) for b in best])
    # Each sigma at level alpha / 3, with noise of its own: the exact chance that some certificate is wrong.
    per_sigma = [exact_outcomes(norm.cdf(d / s), n0, n, alpha / 3, s, d)[0] for s in SIGMAS]
    p_any = 1 - math.prod(1 - p for p in per_sigma)
    assert max(per_sigma) <= alpha / 3 and p_any <= alpha
    tolerance = 4 * math.sqrt(p_any * (1 - p_any) / trials)
    assert abs(any_false.mean() - p_any) <= tolerance, (any_false.mean(), p_any)
    assert reported.mean() <= any_false.mean() <= alpha + tolerance
    # The best radius is the largest over the sigmas that certify, and names its sigma.
    for b in best[:50]:
        certified = [(r.radius, s) for r, s in zip(b.results, SIGMAS) if r.prediction != Certifier.ABSTAIN]
        if certified:
            assert (b.radius, b.sigma) == max(certified, key=lambda t: t[0])
        else:
            assert b.prediction == Certifier.ABSTAIN and b.sigma is None and b.radius == 0.0


def test_one_sigma_is_the_ordinary_run_and_each_sigma_has_its_own_noise():
    model = HalfSpace(SHAPE, seed=6, centred=True)
    x = point_at_distance(model, 0.2)
    single = Certifier(model, 2, 0.5, batch_size=500)
    [best] = certify_best([single], x[None], 20, 400, 0.01, seeds=[9])
    plain = single.certify(x, 20, 400, 0.01, seed=9)
    assert np.array_equal(best.results[0].counts, plain.counts) and best.radius == plain.radius
    # Two certifiers of the same sigma draw different noise as sigma 0 and sigma 1.
    assert sigma_seed(9, 0) == 9 and sigma_seed(9, 1) != 9 and sigma_seed(None, 1) is None
    twin = certify_best([single, Certifier(model, 2, 0.5000001, batch_size=500)], x[None], 20, 400, 0.01, seeds=[9])[0]
    assert not np.array_equal(twin.results[0].counts, twin.results[1].counts)
    again = certify_best([single, Certifier(model, 2, 0.5000001, batch_size=500)], x[None], 20, 400, 0.01, seeds=[9])[0]
    assert all(np.array_equal(a.counts, b.counts) for a, b in zip(twin.results, again.results))
    # Each certificate is at level alpha / K: with K = 2 the bound is that of alpha / 2.
    assert twin.results[0].p_lower <= single.certify(x, 20, 400, 0.005, seed=9).p_lower + 1e-12


def test_decision_at_a_radius_is_sound_over_all_sigmas():
    d, alpha, trials = 0.3, 0.3, 400
    model = HalfSpace(SHAPE, seed=7, centred=True)
    x = point_at_distance(model, d)
    runs = certifiers(model, batch_size=1000)
    # At r = d, the true radius at every sigma (the hardest case for the tests), every certificate is false.
    false = [certify_radius_best(runs, x, d, alpha, n0=11, max_samples=2000, seed=t).certified for t in range(trials)]
    assert np.mean(false) <= alpha + 4 * math.sqrt(alpha * (1 - alpha) / trials)
    # Well inside the true radius it certifies, naming the first sigma that did, and counts every sample spent.
    decision = certify_radius_best(runs, x, 0.1, 0.001, n0=11, max_samples=20_000, seed=1)
    assert decision.certified and decision.prediction == 1 and decision.sigma in SIGMAS and decision.samples > 11


def test_bad_sets_of_certifiers():
    model = HalfSpace(SHAPE, seed=0)
    x = torch.rand(SHAPE)
    for bad, message in [([], "at least one"), (certifiers(model, (0.5, 0.5)), "each sigma once"),
                         ([Certifier(model, 2, 0.5), Certifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3)), 3, 1.0)],
                          "same classes")]:
        with pytest.raises(UserError, match=message):
            certify_best(bad, x[None], 10, 10, 0.01)
    with pytest.raises(UserError, match="alpha"):
        certify_best(certifiers(model), x[None], 10, 10, 1.5)


def test_certify_command_at_several_sigmas(tmp_path, capsys):
    from rrcm.cli import main

    out = tmp_path / "c.tsv"
    args = ["certify", "--model", "fashion-mnist", "--sigma", "0.25,0.5,1", "--n0", "20", "--n", "200", "--max", "4",
            "--skip", "500", "--out", str(out)]
    assert main(args) == 0
    header, *rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert header == ["idx", "label", "predict", "radius", "correct", "sigma", "time"]
    assert [r[0] for r in rows] == ["0", "500", "1000", "1500"]
    assert all(r[5] in ("0.25", "0.5", "1") or (r[5] == "-" and r[2] == "-1") for r in rows)
    first = out.read_text()
    from rrcm.engine.analyze import read_results

    assert read_results(out).samples_per_image().tolist() == [3 * 220] * 4  # every sigma's samples count
    assert main(args) == 0 and out.read_text() == first  # resumes: nothing left to do
    assert "at radius 0 / 0.25 / 0.5 / 1" in capsys.readouterr().out
    # The same images through one bundled classifier per sigma, named one by one, give the same rows.
    again = tmp_path / "again.tsv"
    assert main([*args[:2], "fashion-mnist,fashion-mnist,fashion-mnist", *args[3:-1], str(again)]) == 0
    strip = lambda text: [line.rsplit("\t", 1)[0] for line in text.splitlines()]  # noqa: E731  (times differ)
    assert strip(again.read_text()) == strip(first)
    # A decision at r: a sigma column too.
    decided = tmp_path / "r.tsv"
    assert main(["certify", "--model", "fashion-mnist", "--sigma", "0.5,1", "--radius", "0.5", "--n0", "20", "--n", "500",
                 "--max", "2", "--out", str(decided)]) == 0
    assert decided.read_text().splitlines()[0] == "idx\tlabel\tpredict\tcertified\tsamples\tsigma\ttime"


@pytest.mark.parametrize("extra, message", [
    (["--sigma", "0.25,0.25"], "lists a sigma twice"),
    (["--sigma", "0.25,x"], "comma-separated numbers"),
    (["--sigma", "0.25,-1"], "--sigma"),
    (["--sigma", "0.25,0.5", "--adaptive"], "not to predict or --adaptive"),
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
    assert model_sigma_pairs("a", None) == [("a", None)]
    with pytest.raises(UserError, match="2 models for 3 sigmas"):
        model_sigma_pairs("a,b", "0.25,0.5,1")
