"""TensorRT: the ONNX export TensorRT parses, the not-installed error, and (where tensorrt and a GPU
exist) building and running plans."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from deploy_helpers import SIGMA, TENSORRT_OPERATORS, fashion_test_images, tiny_checkpoint
from rrcm import load_classifier
from rrcm.engine import Certifier
from rrcm.errors import UserError
from rrcm.export.tensorrt import PlanInfo, TensorRTBackend, onnx_for_tensorrt

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def needs_tensorrt(test):
    """A test of TensorRT plans: marked `cuda` (selected by `pytest -m cuda`), skipped without tensorrt and a GPU."""
    skip = pytest.mark.skipif(not (HAS_TENSORRT and torch.cuda.is_available()), reason="needs tensorrt and a CUDA GPU")
    return pytest.mark.cuda(skip(test))


MAX_OPSET = 24  # the document TENSORRT_OPERATORS is from: "opset 9 to opset 24"


@pytest.fixture(scope="module")
def classifier():
    return load_classifier(tiny_checkpoint())


def rrcm_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rrcm", *args], capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("precision,batch", [("fp32", None), ("fp32", 8), ("fp16", None), ("bf16", 8)])
def test_onnx_export_is_tensorrt_friendly(classifier, precision, batch):
    import onnx

    model = onnx.load_from_string(onnx_for_tensorrt(classifier, precision, batch))
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    assert opsets == {"ai.onnx": 22 if precision == "bf16" else 17}
    assert opsets["ai.onnx"] <= MAX_OPSET
    ops = {n.op_type for n in model.graph.node}
    assert not ops - TENSORRT_OPERATORS, f"operators TensorRT does not list as supported: {ops - TENSORRT_OPERATORS}"
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node), "custom-domain operators need plugins"
    low = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}.get(precision)
    weights = {t.data_type for t in model.graph.initializer if len(t.dims) >= 2}
    assert weights == {low or onnx.TensorProto.FLOAT}, "matrix weights carry the plan's precision (strong typing)"
    (x,), (logits,) = model.graph.input, model.graph.output
    assert x.type.tensor_type.elem_type == logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in x.type.tensor_type.shape.dim]
    assert dims == [batch or "batch", 1, 28, 28]


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here, so the not-installed error cannot occur")
def test_missing_tensorrt_says_how_to_install(tmp_path):
    done = rrcm_cli("export", "tensorrt", "--model", str(tiny_checkpoint()), "--out", str(tmp_path / "m.plan"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("rrcm: error: TensorRT is not installed")
    assert "pip install tensorrt" in done.stderr
    (tmp_path / "m.plan").write_bytes(b"plan")
    with pytest.raises(UserError, match="pip install tensorrt"):
        Certifier(str(tmp_path / "m.plan"), 10, SIGMA, device="cuda")


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "tiny.plan"
    done = rrcm_cli("export", "tensorrt", "--model", str(tiny_checkpoint()), "--out", str(out), "--max-batch", "500")
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@needs_tensorrt
def test_plan_certifies_like_torch(plan, classifier):
    images, _ = fashion_test_images(6)
    seeds = list(range(6))
    via_plan = Certifier(str(plan), 10, SIGMA, batch_size=500, device="cuda").certify_many(images, 100, 2000, 0.001, seeds)
    via_torch = Certifier(classifier, 10, SIGMA, batch_size=500, device="cuda").certify_many(images, 100, 2000, 0.001, seeds)
    for a, b in zip(via_plan, via_torch):
        assert a.prediction == b.prediction
        assert abs(a.counts - b.counts).sum() <= 20  # same noise; only near-ties may flip (fp32 kernels differ)


@needs_tensorrt
@pytest.mark.parametrize("precision", ["--fp16", "--bf16"])
def test_static_reduced_precision_plan(tmp_path, classifier, precision):
    out = tmp_path / "static.plan"
    done = rrcm_cli("export", "tensorrt", "--model", str(tiny_checkpoint()), "--out", str(out), "--batch", "8", precision)
    assert done.returncode == 0, done.stderr[-4000:]
    backend = TensorRTBackend(out, "cuda")
    assert backend.plan.static and backend.plan.batch == 8 and backend.plan.precision == precision[2:]
    x = torch.rand((21, 1, 28, 28), device="cuda")
    with torch.no_grad():
        expected = classifier.to("cuda")(x).argmax(1)
    assert (backend.forward(x).argmax(1) == expected).float().mean() >= 0.9


@needs_tensorrt
def test_bad_plans_are_user_errors(tmp_path, plan):
    info = json.loads(PlanInfo.sidecar(plan).read_text())
    other_gpu = tmp_path / "other.plan"
    other_gpu.write_bytes(plan.read_bytes())
    PlanInfo.sidecar(other_gpu).write_text(json.dumps({**info, "gpu": "Another GPU", "compute_capability": "1.0"}))
    corrupt = tmp_path / "corrupt.plan"
    corrupt.write_bytes(plan.read_bytes()[:1000])
    PlanInfo.sidecar(corrupt).write_text(PlanInfo.sidecar(plan).read_text())
    no_sidecar = tmp_path / "bare.plan"
    no_sidecar.write_bytes(plan.read_bytes())
    for path, message in [(other_gpu, "built for Another GPU"), (corrupt, "cannot load"), (no_sidecar, "no bare.plan.json"),
                          (tmp_path / "missing.plan", "no such")]:
        with pytest.raises(UserError, match=message):
            TensorRTBackend(path, "cuda")
    with pytest.raises(UserError, match="sigma 0.25, not 0.5"):
        Certifier(str(plan), 10, 0.5, device="cuda")
