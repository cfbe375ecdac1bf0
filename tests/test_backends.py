"""Backends: torch and ONNX Runtime give the same counts on the same noise; bad models are refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deploy_helpers import SIGMA, SIGMAS, fashion_test_images, tiny_checkpoint
from rrcm import load_classifier
from rrcm.classifier import load_for_export
from rrcm.engine import Certifier
from rrcm.engine.backends import BACKENDS, TorchBackend, make_backend
from rrcm.errors import UserError
from rrcm.export.onnx import OnnxRuntimeBackend, export_onnx, save_onnx


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def classifier():
    return load_classifier(tiny_checkpoint())


@pytest.fixture(scope="module")
def onnx_file(classifier, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    save_onnx(export_onnx(classifier), path)
    return path


def test_torch_and_onnxruntime_same_counts_on_same_noise(classifier, onnx_file):
    images, _ = fashion_test_images(6)
    seeds = list(range(10, 16))
    torch_results = Certifier(classifier, 10, SIGMA, batch_size=700).certify_many(images, 100, 2000, 0.001, seeds)
    ort_results = Certifier(str(onnx_file), 10, SIGMA, batch_size=700).certify_many(images, 100, 2000, 0.001, seeds)
    for a, b in zip(torch_results, ort_results):
        assert np.array_equal(a.counts, b.counts)
        assert (a.prediction, a.radius) == (b.prediction, b.radius)
    # The tiny classifier is not constant: the comparison covers several classes.
    assert len({int(np.argmax(r.counts)) for r in torch_results}) > 1 or max(r.counts.max() for r in torch_results) < 2000


def test_sigma_input_graph_gives_the_torch_counts_at_each_sigma(tmp_path):
    """A graph exported once for every sigma a classifier was fine-tuned for certifies like the torch classifier
    loaded for each sigma, on the same noise."""
    checkpoint = tiny_checkpoint("sigmas")
    path = tmp_path / "sigmas.onnx"
    save_onnx(export_onnx(load_for_export(checkpoint)), path)
    images, _ = fashion_test_images(4)
    seeds = list(range(20, 24))
    for sigma in SIGMAS:
        eager = Certifier(load_classifier(checkpoint, sigma), 10, sigma, batch_size=500).certify_many(images, 100, 1000, 0.001, seeds)
        graph = Certifier(str(path), 10, sigma, batch_size=500).certify_many(images, 100, 1000, 0.001, seeds)
        for a, b in zip(eager, graph):
            assert np.array_equal(a.counts, b.counts), sigma
            assert (a.prediction, a.radius) == (b.prediction, b.radius)
    assert make_backend(str(path), sigma=0.5).info.sigma == 0.5


def test_backend_inputs_and_info(classifier, onnx_file):
    t = TorchBackend(classifier)
    o = OnnxRuntimeBackend(onnx_file)
    # The torch backend takes model-space inputs (normalization fused into sampling), ONNX pixel-space ones.
    assert (t.input_scale, t.input_shift) == (classifier.input_scale, classifier.input_shift)
    assert (o.input_scale, o.input_shift) == (1.0, 0.0)
    for b in (t, o):
        assert b.info.sigma == SIGMA and b.info.num_classes == 10
        assert b.info.input_shape == (1, 28, 28) and b.info.dataset == "fashion-mnist"
    x = torch.rand(5, 1, 28, 28)
    expected = classifier(x)
    assert torch.allclose(t.forward(x * t.input_scale + t.input_shift), expected, atol=1e-5)
    assert torch.allclose(o.forward(x), expected, atol=1e-4)
    # From a module, the onnxruntime backend exports on the fly.
    assert torch.allclose(OnnxRuntimeBackend(classifier).forward(x), expected, atol=1e-4)


def test_static_batch_graph_accepts_any_batch(classifier, tmp_path):
    path = tmp_path / "static.onnx"
    save_onnx(export_onnx(classifier, static_batch=4), path)
    backend = OnnxRuntimeBackend(path)
    assert backend.static_batch == 4
    x = torch.rand(10, 1, 28, 28)
    assert torch.allclose(backend.forward(x), classifier(x), atol=1e-4)
    images, _ = fashion_test_images(2)
    dynamic = Certifier(classifier, 10, SIGMA, batch_size=300).certify_many(images, 50, 500, 0.01, [1, 2])
    static = Certifier(str(path), 10, SIGMA, batch_size=300).certify_many(images, 50, 500, 0.01, [1, 2])
    assert all(np.array_equal(a.counts, b.counts) for a, b in zip(dynamic, static))


def test_bf16_torch_backend(classifier):
    images, _ = fashion_test_images(3)
    fp32 = Certifier(classifier, 10, SIGMA, batch_size=500).certify_many(images, 50, 1000, 0.01, [4, 5, 6])
    bf16 = Certifier(classifier, 10, SIGMA, batch_size=500, dtype=torch.bfloat16).certify_many(images, 50, 1000, 0.01, [4, 5, 6])
    for a, b in zip(fp32, bf16):
        assert b.counts.sum() == 1000
        assert np.abs(a.counts - b.counts).sum() <= 0.05 * 2000  # same noise, a slightly different classifier
    assert next(classifier.parameters()).dtype == torch.float32  # the caller's module is left alone


@pytest.mark.slow
def test_compiled_torch_backend_matches_eager(classifier):
    images, _ = fashion_test_images(2)
    eager = Certifier(classifier, 10, SIGMA, batch_size=500).certify_many(images, 50, 1000, 0.01, [1, 2])
    compiled = Certifier(classifier, 10, SIGMA, batch_size=500, compile=True).certify_many(images, 50, 1000, 0.01, [1, 2])
    for a, b in zip(eager, compiled):
        assert np.abs(a.counts - b.counts).sum() <= 4  # fused kernels round differently, rarely flipping a vote


def test_bad_models_refused(classifier, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07garbage" * 100)
    text = tmp_path / "notes.onnx"
    text.write_text("not a model\n")
    for path in (junk, text, tmp_path / "missing.onnx"):
        with pytest.raises(UserError, match="ONNX"):
            OnnxRuntimeBackend(path)
    with pytest.raises(UserError, match="unknown backend"):
        make_backend(classifier, "cpu", "tensorflow")
    with pytest.raises(UserError, match="torch backend"):
        TorchBackend(str(junk))
    with pytest.raises(UserError, match="sigma, num_classes and input_shape"):
        OnnxRuntimeBackend(torch.nn.Linear(3, 2))
    assert set(BACKENDS) >= {"torch", "onnxruntime"}


def test_onnx_model_of_other_shape_or_sigma_refused(tmp_path):
    from rrcm.checkpoint import save_checkpoint
    from rrcm.model import Classifier
    from rrcm.presets import get_preset

    cfg = get_preset("tiny", image_size=32, patch_size=8, in_chans=3, dataset="cifar10")
    folder = save_checkpoint(tmp_path / "rgb", Classifier(cfg), cfg, kind="classifier", sigma=0.5, dataset="cifar10")
    path = tmp_path / "rgb.onnx"
    save_onnx(export_onnx(load_classifier(folder)), path)
    with pytest.raises(UserError, match="built for sigma 0.5, not 0.25"):
        Certifier(str(path), 10, 0.25)
    certifier = Certifier(str(path), 10, 0.5)
    assert certifier.input_shape == (3, 32, 32)
    with pytest.raises(UserError, match="does not fit"):
        certifier.certify(torch.rand(1, 28, 28), 10, 10, 0.01)
