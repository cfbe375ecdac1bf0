"""The sigmas a classifier was fine-tuned for (rrcm.sigma_set) and `load_classifier` of a classifier for several."""
from __future__ import annotations

import pytest
import torch

from deploy_helpers import SIGMA, SIGMAS, tiny_checkpoint
from rrcm import load_classifier
from rrcm.classifier import SigmaInputClassifier, load_for_export
from rrcm.errors import UserError
from rrcm.schedule import grid_time_for_sigma, karras_times, nearest_grid_times
from rrcm.sigma_set import SigmaSet


def test_parse_the_three_options():
    assert SigmaSet.parse(sigma=0.5) == SigmaSet(values=(0.5,))
    assert SigmaSet.parse(sigmas="1.0, 0.25,0.5") == SigmaSet(values=(0.25, 0.5, 1.0))
    assert SigmaSet.parse(sigma_range="0.12:1") == SigmaSet(bounds=(0.12, 1.0))


@pytest.mark.parametrize("options, message", [
    ({"sigmas": "0.5,0.5"}, "each sigma once"),
    ({"sigmas": "0.5,x"}, "not a number: 'x'"),
    ({"sigmas": "0.5,"}, "not a number: ''"),
    ({"sigmas": "0.25,-1"}, "each sigma must be a positive number"),
    ({"sigmas": "0.25,nan"}, "each sigma must be a positive number"),
    ({"sigmas": "inf"}, "each sigma must be a positive number"),
    ({"sigma_range": "1:0.5"}, "the lower end must be below the upper one"),
    ({"sigma_range": "0.5:0.5"}, "the lower end must be below the upper one"),
    ({"sigma_range": "0:1"}, "each sigma must be a positive number"),
    ({"sigma_range": "0.5"}, "LO:HI"),
    ({"sigma_range": "0.1:0.5:1"}, "LO:HI"),
    ({"sigma": 0.0}, "sigma must be a positive number"),
    ({"sigma": float("nan")}, "sigma must be a positive number"),
    ({"sigma": 0.5, "sigmas": "0.5,1"}, "exactly one of"),
    ({}, "exactly one of"),
])
def test_bad_sigmas_are_refused(options, message):
    with pytest.raises(UserError, match=message):
        SigmaSet.parse(**options)


def test_membership_choice_and_description():
    listed, ranged, single = SigmaSet(values=SIGMAS), SigmaSet(bounds=(0.12, 1.0)), SigmaSet(values=(SIGMA,))
    assert 0.5 in listed and 0.5 + 1e-12 in listed and 0.3 not in listed
    assert 0.12 in ranged and 0.7 in ranged and 1.0 + 1e-12 in ranged and 0.1 not in ranged and 1.01 not in ranged
    assert (listed.describe(), ranged.describe(), single.describe()) == (
        "sigma 0.25, 0.5 and 1", "sigma in [0.12, 1]", "sigma 0.25")
    assert single.choose(None, "m") == SIGMA and listed.choose(0.5, "m") == 0.5 and ranged.choose(0.3, "m") == 0.3
    with pytest.raises(UserError, match="m: fine-tuned for sigma 0.25, 0.5 and 1: give the sigma to use"):
        listed.choose(None, "m")
    with pytest.raises(UserError, match=r"m: fine-tuned for sigma in \[0.12, 1\], not 2"):
        ranged.choose(2.0, "m")
    with pytest.raises(UserError, match="m: fine-tuned for sigma 0.25, not 0.5"):
        single.choose(0.5, "m")
    assert listed.representatives() == SIGMAS
    assert ranged.representatives() == pytest.approx((0.12, 0.12 ** 0.5, 1.0))


@pytest.mark.parametrize("trained", [SigmaSet(values=(0.25,)), SigmaSet(values=SIGMAS), SigmaSet(bounds=(0.12, 1.0))])
def test_config_and_metadata_round_trips(trained):
    assert SigmaSet.from_config(trained.to_config(), "c") == trained
    assert SigmaSet.from_metadata(trained.to_metadata(), "m") == trained
    assert SigmaSet.from_config({}, "c") is None and SigmaSet.from_metadata({}, "m") is None
    if trained.single is not None:  # recorded as before classifiers of several sigmas
        assert trained.to_config() == {"sigma": 0.25}


@pytest.mark.parametrize("config, metadata", [
    ({"sigmas": "0.25"}, {"sigmas": "0.25,abc"}),
    ({"sigma_range": [1.0]}, {"sigma_range": "1.0"}),
    ({"sigma_range": [1.0, 0.5]}, {"sigma_range": "1.0,0.5"}),
    ({"sigmas": [0.5, 0.5]}, {"sigmas": "0.5,0.5"}),
    ({"sigma": -1}, {"sigmas": "-1"}),
])
def test_corrupt_records_are_user_errors(config, metadata):
    with pytest.raises(UserError, match="c"):
        SigmaSet.from_config(config, "c")
    with pytest.raises(UserError, match="m"):
        SigmaSet.from_metadata(metadata, "m")


def test_nearest_grid_times_vectorized_equals_the_scalar_mapping():
    sigmas = torch.tensor([0.05, 0.12, 0.25, 0.3, 0.5, 0.77, 1.0, 3.0])
    for points in (21, 81):
        grid = karras_times(points)
        expected = torch.tensor([grid_time_for_sigma(float(s), points) for s in sigmas], dtype=torch.float64)
        assert torch.equal(nearest_grid_times(sigmas.double() * 2, grid), expected)
        assert torch.equal(nearest_grid_times(sigmas * 2, grid.float()), expected.float())


def test_load_classifier_of_several_sigmas():
    listed, ranged = tiny_checkpoint("sigmas"), tiny_checkpoint("sigma_range")
    for sigma in SIGMAS:
        classifier = load_classifier(listed, sigma)
        assert classifier.sigma == sigma and classifier.t == grid_time_for_sigma(sigma)
    assert load_classifier(ranged, 0.3).t == grid_time_for_sigma(0.3)
    for path, sigma, message in [(listed, None, "give the sigma to use"), (listed, 0.3, "not 0.3"),
                                 (ranged, None, "give the sigma to use"), (ranged, 1.2, "not 1.2"),
                                 (tiny_checkpoint(), 0.5, "fine-tuned for sigma 0.25, not 0.5")]:
        with pytest.raises(UserError, match=message):
            load_classifier(path, sigma)
    assert load_classifier(tiny_checkpoint()).sigma == SIGMA  # one sigma: the default, as before


def test_at_sigma_shares_the_weights_and_checks_the_sigma():
    quarter = load_classifier(tiny_checkpoint("sigmas"), 0.25)
    one = quarter.at_sigma(1.0)
    assert one.classifier is quarter.classifier and one.sigma == 1.0 and one.t == grid_time_for_sigma(1.0)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(one(x), load_classifier(tiny_checkpoint("sigmas"), 1.0)(x))
    with pytest.raises(UserError, match="not 0.3"):
        quarter.at_sigma(0.3)


def test_load_for_export_takes_sigma_as_an_input_only_for_several_sigmas_without_one():
    assert isinstance(load_for_export(tiny_checkpoint("sigmas")), SigmaInputClassifier)
    assert isinstance(load_for_export(tiny_checkpoint("sigma_range")), SigmaInputClassifier)
    assert load_for_export(tiny_checkpoint("sigmas"), 0.5).sigma == 0.5
    assert load_for_export(tiny_checkpoint()).sigma == SIGMA
