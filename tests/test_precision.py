"""Lower precisions: FP8 linear layers (run here through torch's CPU _scaled_mm), the agreement with float32 that
`rrcm certify` measures before it certifies in a lower precision, and its refusal on a GPU."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from deploy_helpers import fashion_test_images
from rrcm import load_classifier
from rrcm.cli import main
from rrcm.engine import commands
from rrcm.engine.backends import TorchBackend
from rrcm.engine.fp8 import Fp8Linear, to_fp8
from rrcm.errors import UserError
from rrcm.export.runtime import Agreement


@pytest.fixture(scope="module")
def bundled():
    return load_classifier("fashion-mnist", sigma=0.25)


def test_fp8_linear_is_close_and_per_sample(bundled):
    linear = torch.nn.Linear(64, 32)
    fp8 = Fp8Linear(linear)
    x = torch.randn(5, 7, 64)
    want = linear(x)
    got = fp8(x.bfloat16()).float()
    assert got.shape == want.shape
    assert ((got - want).norm() / want.norm()) < 0.08  # e4m3 has 3 mantissa bits
    # A row's scale is its own: a sample's output does not depend on the others in the batch.
    assert torch.equal(fp8(x[:1].bfloat16()), fp8(torch.cat([x[:1], 100 * x[1:]]).bfloat16())[:1])


def test_fp8_model_keeps_head_and_patch_embedding_in_bf16(bundled):
    model = to_fp8(bundled)
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["classifier.base_model.blocks.0.mlp.fc1"] == "Fp8Linear"
    assert kinds["classifier.linear_head"] == "Linear" and kinds["classifier.base_model.patch_embed.proj"] == "Conv2d"
    assert next(bundled.parameters()).dtype == torch.float32  # the caller's module is left as it was
    images, _ = fashion_test_images(200)
    noisy = images + 0.25 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        agree = (model(noisy.bfloat16()).argmax(1) == bundled(noisy).argmax(1)).float().mean()
    assert agree > 0.95


def test_fp8_needs_a_gpu_with_fp8_tensor_cores(bundled):
    with pytest.raises(UserError, match="compute capability 8.9"):
        TorchBackend(bundled, "cpu", dtype=torch.float8_e4m3fn)


def test_a_gpu_refuses_a_precision_below_the_agreement_bar(monkeypatch):
    monkeypatch.setattr("rrcm.export.runtime.backend_agreement", lambda *a, **k: Agreement(1.0, 0.99, 512))
    inputs = torch.zeros(512, 1, 28, 28)
    on_gpu = SimpleNamespace(device=torch.device("cuda"))
    with pytest.raises(UserError, match="agrees with float32 on only 99.00%"):
        commands.precision_agreement(None, on_gpu, inputs, "fp8", 256, verbose=False)
    on_cpu = SimpleNamespace(device=torch.device("cpu"))
    assert commands.precision_agreement(None, on_cpu, inputs, "bf16", 256, verbose=False) == 0.99


def test_certify_records_the_measured_agreement(tmp_path, capsys):
    out = tmp_path / "c.tsv"
    args = ["certify", "--model", "fashion-mnist", "--sigma", "0.25", "--precision", "bf16", "--n0", "10", "--n", "50",
            "--max", "2", "--out", str(out)]
    assert main(args) == 0
    assert "bf16 gives the float32 classifier's top class on" in capsys.readouterr().out
    params = json.loads(out.with_name(out.name + ".json").read_text())
    assert params["precision"] == "bf16" and 0.98 <= params["agreement"] <= 1.0
    assert main(args) == 0  # resumes: the agreement describes the run, it does not change what a row means
