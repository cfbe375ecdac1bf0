"""Shared by the deployment tests (AOTInductor, C++, TensorRT): a tiny classifier checkpoint, its
AOTInductor package compiled once per test process, and Fashion-MNIST test images."""
from __future__ import annotations

import atexit
import functools
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from rrcm.checkpoint import save_checkpoint
from rrcm.model import Classifier
from rrcm.presets import get_preset

SIGMA = 0.25


@functools.cache
def _workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="rrcm-deploy-"))
    atexit.register(shutil.rmtree, path, True)
    return path


@functools.cache
def tiny_checkpoint() -> Path:
    """An untrained tiny classifier (a seed whose noisy predictions vary between classes and images) with a
    head of unit-scale logits, so that numerical differences between runtimes stay far below the logit gaps."""
    with torch.random.fork_rng():
        torch.manual_seed(2)
        cfg = get_preset("tiny")
        model = Classifier(cfg)
        torch.nn.init.normal_(model.linear_head.weight, std=0.5)
    return save_checkpoint(_workdir() / "tiny", model, cfg, kind="classifier", sigma=SIGMA, dataset="fashion-mnist")


@functools.cache
def tiny_package() -> Path:
    """The tiny checkpoint compiled by `rrcm export aoti` (dynamic batch, CPU)."""
    out = _workdir() / "tiny.pt2"
    done = subprocess.run([sys.executable, "-m", "rrcm", "export", "aoti", "--model", str(tiny_checkpoint()),
                           "--sigma", str(SIGMA), "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "argmax agreement 100.00%" in done.stdout, done.stdout
    return out


@functools.cache
def fashion_test_images(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` Fashion-MNIST test images (count, 1, 28, 28) in [0, 1] and their labels."""
    from rrcm.data import load_dataset

    return load_dataset("fashion-mnist", "test").batch(torch.arange(count))
