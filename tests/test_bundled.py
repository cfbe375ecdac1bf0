"""The bundled Fashion-MNIST classifiers: they load, fit the size budget, reach the stated accuracy; `rrcm demo`."""
import math

import numpy as np
import pytest
import torch

from rrcm.classifier import BUNDLED_DIR, BUNDLED_SIGMAS, load_classifier
from rrcm.cli import main
from rrcm.data import load_dataset
from rrcm.engine import Certifier
from rrcm.engine.certifier import derive_seed

SIGMAS = BUNDLED_SIGMAS["fashion-mnist"]


@pytest.mark.parametrize("sigma", SIGMAS)
def test_each_sigma_loads_by_name(sigma):
    model = load_classifier("fashion-mnist", sigma=sigma)
    assert model.sigma == sigma and model.num_classes == 10 and model.input_shape == (1, 28, 28)
    assert model.cfg.dataset == "fashion-mnist"
    with torch.no_grad():
        assert model(torch.rand(4, 1, 28, 28)).shape == (4, 10)


def test_weights_fit_25_megabytes():
    files = list(BUNDLED_DIR.rglob("*"))
    assert sum(f.stat().st_size for f in files if f.is_file()) <= 25 * 2**20
    assert len([f for f in files if f.name == "model.safetensors"]) == len(SIGMAS)


def test_unbundled_sigma_is_a_user_error(capsys):
    assert main(["certify", "--model", "fashion-mnist", "--sigma", "0.3", "--out", "never.tsv"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rrcm: error: ") and "0.25" in err and err.count("\n") == 1


@pytest.mark.slow
def test_sigma_025_meets_the_certified_accuracy_goal():
    """100 test images (every 100th), N = 1,000, alpha = 0.001: >= 80% at radius 0, >= 60% at 0.5."""
    dataset = load_dataset("fashion-mnist", "test")
    idx = list(range(0, 10_000, 100))
    images, labels = dataset.batch(torch.tensor(idx))
    certifier = Certifier(load_classifier("fashion-mnist", sigma=0.25), 10, 0.25, batch_size=1000)
    results = certifier.certify_many(images, 100, 1000, 0.001, [derive_seed(0, i) for i in idx])
    correct = np.array([r.prediction == y for r, y in zip(results, labels.tolist())])
    radius = np.array([r.radius for r in results])
    assert (correct & (radius >= 0)).mean() >= 0.80
    assert (correct & (radius >= 0.5)).mean() >= 0.60


def test_demo_rows_equal_rrcm_certify(tmp_path, capsys):
    assert main(["demo", "--images", "3", "--n", "300", "--n0", "20"]) == 0
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    rows = [r for r in rows if len(r) == 5]  # the per-image table, not the accuracy one
    assert [int(r[0][2:]) for r in rows] == [0, 1000, 2000]
    assert "Certified accuracy" in out and "| 0.5 |" in out
    tsv = tmp_path / "c.tsv"
    assert main(["certify", "--model", "fashion-mnist", "--sigma", "0.25", "--n0", "20", "--n", "300",
                 "--skip", "1000", "--max", "3", "--out", str(tsv)]) == 0
    certified = [line.split("\t") for line in tsv.read_text().splitlines()[1:]]
    for row, (idx, label, predict, radius, correct, _) in zip(rows, certified):
        assert math.isclose(float(row[3]), float(radius)) and row[4].strip(" |") == correct


@pytest.mark.parametrize("args, message", [
    (["--images", "0"], ">= 1"), (["--n", "0"], "n must be"), (["--alpha", "2"], "alpha"),
    (["--sigma", "0.3"], "0.25"), (["--data-dir", "/nonexistent"], "/nonexistent"),
])
def test_demo_bad_input_exits_2(capsys, args, message):
    assert main(["demo", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rrcm: error: ") and err.count("\n") == 1 and message in err, err
