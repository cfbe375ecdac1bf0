"""int8 (static PT2E quantization, torchao): close to fp32, each sample's logits independent of its batch."""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rrcm import load_classifier
from rrcm.cli import main
from rrcm.cpu import cpu_info
from rrcm.data import load_dataset
from rrcm.engine import Certifier
from rrcm.engine.backends import TorchBackend
from rrcm.engine.quantize import dataset_calibration, noisy_calibration
from rrcm.errors import UserError

SIGMA, BATCH = 0.25, 64

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def classifier():
    return load_classifier("fashion-mnist", SIGMA)


X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.fixture(scope="module")
def int8_backend(classifier):
    pytest.importorskip("torchao")
    if not X86:
        pytest.skip(f"int8 (torchao's X86InductorQuantizer, oneDNN kernels) needs an x86 CPU, not {platform.machine()}")
    calibration = dataset_calibration(load_dataset("fashion-mnist", "train"), SIGMA, count=256)
    return TorchBackend(classifier, dtype=torch.int8, calibration=calibration, static_batch=BATCH)


def _noisy_test_images(count: int, seed: int) -> torch.Tensor:
    test = load_dataset("fashion-mnist", "test")
    return noisy_calibration(torch.stack([test[i][0] for i in range(count)]), SIGMA, seed)


@pytest.mark.slow
def test_int8_agrees_with_fp32(classifier, int8_backend):
    # 7-bit activations where oneDNN's u8 x s8 kernels lack VNNI: 8-bit ones saturate there (94% agreement)
    assert int8_backend.activation_bits == (8 if cpu_info().vnni else 7)
    x = _noisy_test_images(1000, seed=3)
    with torch.no_grad():
        expected = classifier(x).argmax(1)
    got = int8_backend.forward(x * int8_backend.input_scale + int8_backend.input_shift).argmax(1)
    assert (got == expected).double().mean() >= 0.98  # measured 0.99-1.00 on the bundled classifiers
    images = load_dataset("fashion-mnist", "test").batch(torch.arange(4))[0]
    fp32 = Certifier(classifier, 10, SIGMA, batch_size=BATCH).certify_many(images, 50, 1000, 0.01, [1, 2, 3, 4])
    int8 = Certifier(classifier, 10, SIGMA, backend=int8_backend).certify_many(images, 50, 1000, 0.01, [1, 2, 3, 4])
    for a, b in zip(fp32, int8):
        assert b.counts.sum() == 1000
        assert np.abs(a.counts - b.counts).sum() <= 0.04 * 2000  # same noise, a slightly different classifier


@pytest.mark.slow
def test_int8_agrees_with_fp32_on_an_avx2_cpu():
    """The agreement test again, on an AVX2-only CPU (like AMD Zen 3) as oneDNN and ATen emulate one here."""
    pytest.importorskip("torchao")
    cpu = cpu_info()
    if not (X86 and cpu.has("AVX2")):
        pytest.skip("emulating an AVX2-only CPU needs an x86 CPU with AVX2")
    if not cpu.vnni:
        pytest.skip(f"{cpu.model} has no VNNI itself: test_int8_agrees_with_fp32 covers it")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    test = f"{Path(__file__).resolve()}::test_int8_agrees_with_fp32"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], env=env,
                          cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_int8_sample_logits_do_not_depend_on_the_batch(int8_backend):
    # Certificates need independent samples: a row's logits must not depend on its neighbours (static scales).
    u = _noisy_test_images(2 * BATCH, seed=5) * int8_backend.input_scale + int8_backend.input_shift
    first, other = u[:BATCH], torch.cat([u[:1], u[BATCH + 1:]])
    assert torch.equal(int8_backend.forward(first)[0], int8_backend.forward(other)[0])
    assert torch.equal(int8_backend.forward(first[:5]), int8_backend.forward(first)[:5])  # padded chunk
    assert int8_backend.forward(u).shape == (2 * BATCH, 10)  # split into static batches


@pytest.mark.slow
def test_certify_int8_command(tmp_path, capsys):
    pytest.importorskip("torchao")
    out = tmp_path / "int8.tsv"
    args = ["certify", "--model", "fashion-mnist", "--sigma", str(SIGMA), "--n", "500", "--max", "3", "--skip", "50",
            "--batch", "100", "--precision", "int8", "--out", str(out)]
    assert main(args) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and [line.split("\t")[0] for line in lines[1:]] == ["0", "50", "100"]
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert sidecar["precision"] == "int8" and sidecar.get("int8_activation_bits") == (None if cpu_info().vnni else 7)
    before = out.read_text()
    assert main([*args[:-4], "--precision", "fp32", "--max", "4", "--out", str(out)]) == 2  # rows of another classifier
    assert "precision='int8'" in capsys.readouterr().err and out.read_text() == before
    assert main([*args[:-2], "--backend", "onnxruntime", "--out", str(tmp_path / "ort.tsv")]) == 2
    assert "torch backend only" in capsys.readouterr().err


def test_int8_refusals(classifier, monkeypatch):
    with pytest.raises(UserError, match="calibration"):
        TorchBackend(classifier, dtype=torch.int8)
    with pytest.raises(UserError, match="x86 CPUs" if torch.cuda.is_available() else "sees no CUDA GPU"):
        TorchBackend(classifier, "cuda", dtype=torch.int8, calibration=torch.rand(4, 1, 28, 28))
    with pytest.raises(UserError, match="batch size"):
        TorchBackend(classifier, dtype=torch.int8, calibration=torch.rand(4, 1, 28, 28), static_batch=0)
    if importlib.util.find_spec("torchao"):
        with pytest.raises(UserError, match=r"int8 quantization failed .*\(3, 28, 28\)"):
            TorchBackend(classifier, dtype=torch.int8, calibration=torch.rand(4, 3, 28, 28), static_batch=4)
        with pytest.raises(UserError, match="finite"):
            TorchBackend(classifier, dtype=torch.int8, calibration=torch.full((4, 1, 28, 28), float("nan")))
    for name in ("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer", "torchao.quantization.pt2e.quantize_pt2e"):
        monkeypatch.setitem(sys.modules, name, None)  # as if torchao were not installed
    with pytest.raises(UserError, match="needs torchao"):
        TorchBackend(classifier, dtype=torch.int8, calibration=torch.rand(4, 1, 28, 28))
