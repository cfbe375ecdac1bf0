"""CPU certification throughput (issue 3): the engine's backends against the public reference loop.

Run: python -m pytest benchmarks/test_bench_engine.py --benchmark-only --benchmark-enable \
       --benchmark-json benchmarks/results/engine-cpu.json
On a CPU shared with other jobs, wall-clock figures mostly measure the neighbours; per-core figures
are steadier: OMP_NUM_THREADS=1 ... --benchmark-timer time.process_time.

Models: the fmnist-s classifier (2.7M parameters, 28 px, 51 tokens) with random weights, and the bundled
sigma = 0.25 classifier (fmnist-xs, 0.15M parameters, 18 tokens), where the reference loop's per-batch
overheads weigh more against the forward; one Fashion-MNIST test image. Each round is one CERTIFY of n0 + n = SAMPLES noisy samples.
The reference is written the way Cohen et al.'s core.py works: repeat the image, `randn_like * sigma`,
fp32 eager forward of the pixel-space classifier, argmax, counts in a Python loop, batch 500.
Engines: fp32, bf16 and int8 (static quantization calibrated on 512 noisy training images) certify the
classifier at that precision; torch.compile on a CPU freezes the weights.
extra_info: samples_per_s (best round: the others share these cores), speedup over the reference
measured in the same run, threads, load average (1 minute, at the end of the case).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from rrcm.classifier import NoisyImageClassifier, load_classifier
from rrcm.data import load_dataset
from rrcm.engine import Certifier
from rrcm.engine.quantize import dataset_calibration
from rrcm.model import Classifier
from rrcm.presets import get_preset

SIGMA, N0, SAMPLES, ROUNDS = 0.25, 100, 2000, 5
REFERENCE_BATCH = 500
RATES: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="module", params=["fmnist-s", "bundled"])
def classifier(request) -> NoisyImageClassifier:
    if request.param == "bundled":
        return load_classifier("fashion-mnist", SIGMA)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Classifier(get_preset("fmnist-s"))
        torch.nn.init.normal_(model.linear_head.weight, std=0.5)  # random weights: the cost does not depend on them
    return NoisyImageClassifier(model, SIGMA).eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return load_dataset("fashion-mnist", "test")[0][0]


def reference_certify(model, x: torch.Tensor, num_classes: int = 10) -> np.ndarray:
    """Selection then estimation counts, the public reference's way."""
    def sample_noise(num: int) -> np.ndarray:
        counts = np.zeros(num_classes, dtype=int)
        with torch.no_grad():
            remaining = num
            while remaining > 0:
                this = min(REFERENCE_BATCH, remaining)
                remaining -= this
                batch = x.repeat((this, 1, 1, 1))
                noise = torch.randn_like(batch) * SIGMA
                for idx in model(batch + noise).argmax(1).numpy():
                    counts[idx] += 1
        return counts
    sample_noise(N0)
    return sample_noise(SAMPLES - N0)


def _record(benchmark, model: NoisyImageClassifier, name: str) -> float:
    rate = SAMPLES / benchmark.stats.stats.min
    key = f"{model.cfg.embed_dim}x{model.cfg.depth}/{model.cfg.patch_size}"
    RATES[key, name] = rate
    benchmark.extra_info.update(samples_per_s=rate, samples_per_round=SAMPLES, threads=torch.get_num_threads(),
                                load_average=os.getloadavg()[0], model=key)
    if (key, "reference") in RATES and name != "reference":
        benchmark.extra_info["speedup"] = rate / RATES[key, "reference"]
    return rate


def test_reference_loop(benchmark, classifier, image):
    counts = benchmark.pedantic(reference_certify, args=(classifier, image), rounds=ROUNDS, warmup_rounds=1)
    assert counts.sum() == SAMPLES - N0
    _record(benchmark, classifier, "reference")


ENGINES = {  # name: (batch size, Certifier options); 128 keeps a batch's activations in cache
    "torch-eager-b500": (500, {}),
    "torch-eager": (128, {}),
    "torch-compile": (128, {"compile": True}),
    "onnxruntime": (128, {"backend": "onnxruntime"}),
    "torch-bf16": (128, {"dtype": torch.bfloat16}),
    "torch-compile-bf16": (128, {"compile": True, "dtype": torch.bfloat16}),
    "torch-int8": (128, {"dtype": torch.int8}),
}


@pytest.mark.parametrize("name", ENGINES)
def test_engine(benchmark, classifier, image, name):
    batch, options = ENGINES[name]
    if options.get("backend") == "onnxruntime":
        options = {**options, "threads": torch.get_num_threads()}  # as many as torch uses (OMP_NUM_THREADS)
    if options.get("dtype") == torch.int8:
        pytest.importorskip("torchao")
        calibration = dataset_calibration(load_dataset("fashion-mnist", "train"), SIGMA)
        options = {**options, "calibration": calibration, "static_batch": batch}
    certifier = Certifier(classifier, 10, SIGMA, batch_size=batch, **options)
    result = benchmark.pedantic(certifier.certify, args=(image, N0, SAMPLES - N0, 0.001), kwargs={"seed": 0},
                                rounds=ROUNDS, warmup_rounds=1)
    assert result.counts.sum() == SAMPLES - N0
    _record(benchmark, classifier, name)
    benchmark.extra_info.update(batch=batch, backend=certifier.backend.name,
                                dtype=str(options.get("dtype", torch.float32)), compile=options.get("compile", False))

