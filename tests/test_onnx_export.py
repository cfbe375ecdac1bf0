"""`rrcm export onnx`: a checked graph with a dynamic batch, rrcm metadata, plain operators, verified at export."""
from __future__ import annotations

import re

import onnx
import pytest
import torch

from deploy_helpers import SIGMA, tiny_checkpoint
from rrcm import load_classifier
from rrcm.cli import main
from rrcm.export.onnx import compare_with_torch, export_onnx

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
    assert diff < 1e-3 and agreement >= 99.0
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
    (["--opset", "13"], "opset must be >= 17"),
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
