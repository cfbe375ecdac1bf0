"""Shared by the deployment tests (AOTInductor, C++, TensorRT): a tiny classifier checkpoint, its
AOTInductor package compiled once per test process, and Fashion-MNIST test images; the same network
recorded as fine-tuned for several sigmas, and its package with a sigma input; a package that answers NaN and
zip archives written entry by entry (for unsafe packages)."""
from __future__ import annotations

import atexit
import functools
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from rrcm.checkpoint import save_checkpoint
from rrcm.model import Classifier
from rrcm.presets import get_preset

SIGMA = 0.25
SIGMAS = (0.25, 0.5, 1.0)
SIGMA_RANGE = (0.12, 1.0)
MODEL_DIR = "pkg/data/aotinductor/model/"  # where a package made by hand keeps its model files

# Operators marked supported ("Y") in onnx/onnx-tensorrt docs/operators.md for TensorRT 10.15 (opsets 9 to 24):
# https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md. Limited to those a PyTorch export of a
# vision model can plausibly emit; anything else in our graph fails the test and must be checked by hand.
TENSORRT_OPERATORS = {
    "Abs", "Add", "ArgMax", "ArgMin", "AveragePool", "BatchNormalization", "Cast", "CastLike", "Ceil", "Clip",
    "Concat", "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "CumSum", "DepthToSpace", "Div",
    "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "Flatten", "Floor", "Gather", "GatherElements",
    "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "Greater", "GreaterOrEqual",
    "GroupNormalization", "HardSigmoid", "HardSwish", "Identity", "If", "InstanceNormalization",
    "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "MatMul", "Max", "MaxPool",
    "Mean", "Min", "Mod", "Mul", "Neg", "Not", "Or", "Pad", "Pow", "PRelu", "Range", "Reciprocal", "ReduceL2",
    "ReduceMax", "ReduceMean", "ReduceMin", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize",
    "Round", "Shape", "Sigmoid", "Sign", "Sin", "Size", "Slice", "Softmax", "Softplus", "Split", "Sqrt",
    "Squeeze", "Sub", "Sum", "Tanh", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Where",
}


@functools.cache
def _workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="rrcm-deploy-"))
    atexit.register(shutil.rmtree, path, True)
    return path


@functools.cache
def tiny_checkpoint(noise: str = "sigma") -> Path:
    """An untrained tiny classifier (a seed whose noisy predictions vary between classes and images) with a
    head of unit-scale logits, so that numerical differences between runtimes stay far below the logit gaps.
    `noise`: recorded as fine-tuned for SIGMA ("sigma"), for each of SIGMAS ("sigmas"), or for SIGMA_RANGE
    ("sigma_range")."""
    with torch.random.fork_rng():
        torch.manual_seed(2)
        cfg = get_preset("tiny")
        model = Classifier(cfg)
        torch.nn.init.normal_(model.linear_head.weight, std=0.5)
    recorded = {"sigma": SIGMA, "sigmas": list(SIGMAS), "sigma_range": list(SIGMA_RANGE)}[noise]
    return save_checkpoint(_workdir() / f"tiny-{noise}", model, cfg, kind="classifier", dataset="fashion-mnist",
                           **{noise: recorded})


@functools.cache
def tiny_package(device: str = "cpu", batch: int | None = None) -> Path:
    """The tiny checkpoint compiled by `rrcm export aoti` for `device` (dynamic batch unless `batch`)."""
    out = _workdir() / f"tiny-{device}-{batch or 'any'}.pt2"
    fixed = ["--batch", str(batch)] if batch else []
    done = subprocess.run([sys.executable, "-m", "rrcm", "export", "aoti", "--model", str(tiny_checkpoint()),
                           "--sigma", str(SIGMA), "--device", device, *fixed, "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "argmax agreement 100.00%" in done.stdout, done.stdout
    return out


@functools.cache
def tiny_sigma_package() -> Path:
    """The tiny network fine-tuned for SIGMAS compiled by `rrcm export aoti` without --sigma: a package with a
    sigma input (CPU, dynamic batch)."""
    out = _workdir() / "tiny-sigma-input.pt2"
    done = subprocess.run([sys.executable, "-m", "rrcm", "export", "aoti", "--model", str(tiny_checkpoint("sigmas")),
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "sigma input (sigma 0.25, 0.5 and 1)" in done.stdout and "argmax agreement 100.00%" in done.stdout, done.stdout
    return out


@functools.cache
def tiny_nan_package() -> Path:
    """The tiny classifier with a NaN in its head's bias, compiled by `export_aoti` (`rrcm export aoti` refuses such
    a model; the function compiles what it is given): a package whose logits are NaN for every input."""
    from rrcm import load_classifier
    from rrcm.export.aoti import export_aoti

    classifier = load_classifier(tiny_checkpoint())
    with torch.no_grad():
        classifier.classifier.linear_head.bias[0] = float("nan")
    return export_aoti(classifier, _workdir() / "tiny-nan.pt2")


def write_zip(path: Path, entries: dict[str, bytes], attrs: dict[str, int] | None = None,
              compression: int = zipfile.ZIP_STORED) -> Path:
    """A zip archive of `entries` (name: bytes), with Unix modes `attrs` (name: st_mode) where given."""
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = compression
            if attrs and name in attrs:
                info.external_attr = attrs[name] << 16
            z.writestr(info, data)
    return path


@functools.cache
def fashion_test_images(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` Fashion-MNIST test images (count, 1, 28, 28) in [0, 1] and their labels."""
    from rrcm.data import load_dataset

    return load_dataset("fashion-mnist", "test").batch(torch.arange(count))
