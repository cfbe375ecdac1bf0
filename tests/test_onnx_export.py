"""`rrcm export onnx`: a checked graph with a dynamic batch, rrcm metadata, plain operators, verified at export."""
from __future__ import annotations

import re

import onnx
import pytest
import torch

from deploy_helpers import SIGMA, SIGMAS, TENSORRT_OPERATORS, tiny_checkpoint
from rrcm import load_classifier
from rrcm.classifier import SigmaInputClassifier, load_for_export
from rrcm.cli import main
from rrcm.engine import Certifier
from rrcm.errors import UserError
from rrcm.export.onnx import OnnxRuntimeBackend, compare_with_torch, export_onnx

# What the exporter may emit: operators that ONNX Runtime and TensorRT's ONNX parser both support.
PLAIN_OPS = {"Add", "Cast", "Concat", "Constant", "ConstantOfShape", "Conv", "Div", "Equal", "Erf", "Expand", "Gather",
             "Gemm", "Identity", "LayerNormalization", "MatMul", "Mul", "Reshape", "Shape", "Slice", "Softmax", "Sqrt",
             "Sub", "Transpose", "Unsqueeze", "Where"}


def test_export_cli_writes_a_checked_dynamic_batch_model(tmp_path, capsys):
    out = tmp_path / "tiny.onnx"
    assert main(["export", "onnx", "--model", str(tiny_checkpoint()), "--sigma", str(SIGMA), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    diff = float(re.search(r"max \|logit diff\| ([0-9.e+-]+)", printed).group(1))
    agreement = float(re.search(r"argmax agreement ([0-9.]+)%", printed).group(1))
    assert diff < 1e-3 and agreement == 100.0  # float32 throughout: the same function, up to rounding
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    (x,) = model.graph.input
    dims = x.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    assert {p.key: p.value for p in model.metadata_props} == {
        "rrcm.sigma": "0.25", "rrcm.num_classes": "10", "rrcm.input_shape": "1,28,28", "rrcm.dataset": "fashion-mnist"}
    assert {n.op_type for n in model.graph.node} <= PLAIN_OPS
    assert model.opset_import[0].version == 17


def test_static_batch_and_opset(tmp_path, capsys):
    out = tmp_path / "static.onnx"
    assert main(["export", "onnx", "--model", str(tiny_checkpoint()), "--out", str(out), "--static-batch", "8", "--opset", "18"]) == 0
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 8
    assert model.opset_import[0].version == 18
    assert "batch 8" in capsys.readouterr().out


def test_verification_measures_disagreement():
    classifier = load_classifier(tiny_checkpoint())
    data = export_onnx(classifier)
    good = compare_with_torch(data, classifier)
    assert good.argmax_agreement == 1.0 and good.max_logit_diff < 1e-3
    # A different classifier must be caught.
    other = load_classifier(tiny_checkpoint())
    with torch.no_grad():
        other.classifier.linear_head.weight.mul_(-1)
    bad = compare_with_torch(data, other)
    assert bad.argmax_agreement < 0.5 and bad.max_logit_diff > 0.1


@pytest.mark.parametrize("args, message", [
    (["--static-batch", "0"], "--static-batch must be >= 1"),
    (["--opset", "13"], "--opset must be in [17, "),
    (["--sigma", "0.5"], "fine-tuned for sigma 0.25"),
])
def test_bad_export_arguments(tmp_path, capsys, args, message):
    out = tmp_path / "x.onnx"
    assert main(["export", "onnx", "--model", str(tiny_checkpoint()), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rrcm: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_missing_model(tmp_path, capsys):
    assert main(["export", "onnx", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err


# --- a classifier fine-tuned for several sigmas: one graph with a sigma input ---------------------------------

@pytest.fixture(scope="module")
def sigma_input_onnx(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "sigmas.onnx"
    assert main(["export", "onnx", "--model", str(tiny_checkpoint("sigmas")), "--out", str(out)]) == 0
    return out


def test_sigma_input_graph_records_what_it_serves_and_uses_tensorrt_operators(sigma_input_onnx, capsys):
    model = onnx.load(str(sigma_input_onnx))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["x", "sigma"]
    assert [d.dim_value for d in model.graph.input[1].type.tensor_type.shape.dim] == [1]
    assert {p.key: p.value for p in model.metadata_props} == {
        "rrcm.sigmas": "0.25,0.5,1.0", "rrcm.num_classes": "10", "rrcm.input_shape": "1,28,28",
        "rrcm.dataset": "fashion-mnist"}
    ops = {n.op_type for n in model.graph.node}
    assert "ArgMin" in ops and ops <= TENSORRT_OPERATORS, ops - TENSORRT_OPERATORS
    assert model.opset_import[0].version == 17


@pytest.mark.parametrize("noise, sigmas", [("sigmas", SIGMAS), ("sigma_range", (0.12, 0.3, 0.45, 1.0))])
def test_sigma_input_graph_matches_torch_at_each_sigma(noise, sigmas):
    checkpoint = tiny_checkpoint(noise)
    exported = load_for_export(checkpoint)
    assert isinstance(exported, SigmaInputClassifier)
    data = export_onnx(exported)
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    logits = {}
    for sigma in sigmas:
        classifier = load_classifier(checkpoint, sigma)
        backend = OnnxRuntimeBackend(data, sigma=sigma)
        assert backend.info.sigma == sigma and backend.info.serves == exported.trained
        noisy = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = classifier(noisy)
            torch.testing.assert_close(exported(noisy, torch.tensor([sigma])), expected, atol=1e-5, rtol=1e-5)
        logits[sigma] = backend.forward(noisy)
        torch.testing.assert_close(logits[sigma], expected, atol=1e-4, rtol=1e-4)
        assert torch.equal(logits[sigma].argmax(1), expected.argmax(1))
    # The sigma input is live: the same images at the smallest and largest sigma give other logits.
    assert (OnnxRuntimeBackend(data, sigma=sigmas[0]).forward(x) - OnnxRuntimeBackend(data, sigma=sigmas[-1]).forward(x)).abs().max() > 0.1
    if noise == "sigma_range":  # 0.3 and 0.45 are no grid points: conditioned on the nearest ones, as in torch
        assert all(load_classifier(checkpoint, s).t != pytest.approx(2 * s, abs=1e-3) for s in (0.3, 0.45))


def test_sigma_input_graph_refuses_sigmas_it_does_not_serve(sigma_input_onnx, tmp_path):
    with pytest.raises(UserError, match=r"takes the noise level as an input and serves sigma 0.25, 0.5 and 1: give"):
        OnnxRuntimeBackend(sigma_input_onnx)
    with pytest.raises(UserError, match="fine-tuned for sigma 0.25, 0.5 and 1, not 0.3"):
        OnnxRuntimeBackend(sigma_input_onnx, sigma=0.3)
    with pytest.raises(UserError, match="not 0.3"):
        Certifier(str(sigma_input_onnx), 10, 0.3)
    ranged = tmp_path / "range.onnx"
    assert main(["export", "onnx", "--model", str(tiny_checkpoint("sigma_range")), "--out", str(ranged)]) == 0
    assert OnnxRuntimeBackend(ranged, sigma=0.7).info.sigma == 0.7
    for sigma in (0.1, 1.5):
        with pytest.raises(UserError, match=rf"sigma in \[0.12, 1\], not {sigma:g}"):
            OnnxRuntimeBackend(ranged, sigma=sigma)
    # A graph for one sigma takes its own sigma, or none, and refuses another.
    single = tmp_path / "single.onnx"
    assert main(["export", "onnx", "--model", str(tiny_checkpoint()), "--out", str(single)]) == 0
    assert OnnxRuntimeBackend(single, sigma=SIGMA).info.sigma == SIGMA
    with pytest.raises(UserError, match="built for sigma 0.25, not 0.5"):
        OnnxRuntimeBackend(single, sigma=0.5)


def test_sigma_of_a_classifier_of_several_exports_a_graph_for_that_sigma(tmp_path, capsys):
    out = tmp_path / "half.onnx"
    assert main(["export", "onnx", "--model", str(tiny_checkpoint("sigmas")), "--sigma", "0.5", "--out", str(out)]) == 0
    assert "sigma 0.5, 10 classes" in capsys.readouterr().out
    model = onnx.load(str(out))
    assert [i.name for i in model.graph.input] == ["x"]
    assert {p.key: p.value for p in model.metadata_props}["rrcm.sigma"] == "0.5"
    assert main(["export", "onnx", "--model", str(tiny_checkpoint("sigmas")), "--sigma", "0.3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rrcm: error: ") and "fine-tuned for sigma 0.25, 0.5 and 1, not 0.3" in err and err.count("\n") == 1
