"""CPU certification throughput (issue 3): the engine's configurations against the public reference loop.

Run: python -m pytest benchmarks/test_bench_engine.py --benchmark-only --benchmark-enable \
       --benchmark-json benchmarks/results/engine-cpu.json
On a CPU shared with other jobs, wall-clock figures mostly measure the neighbours; per-core figures
are steadier: OMP_NUM_THREADS=1 ... --benchmark-timer time.process_time.

The measurements are `rrcm bench`'s (`rrcm.engine.bench`): its reference loop (Cohen et al.'s core.py: fp32
eager, `randn_like` noise, counts on the host, batch 400) and its CPU configurations (`CONFIGS["cpu"]`, batch
128, which keeps a batch's activations in cache), here with pytest-benchmark's rounds and on two models: the
fmnist-s classifier (2.7M parameters, 28 px, 51 tokens) with random weights, and the bundled sigma = 0.25
classifier (fmnist-xs, 0.15M parameters, 18 tokens), where per-batch overheads weigh more against the forward.
Each round draws SAMPLES noisy samples of one Fashion-MNIST test image (a PREDICT of that many samples).
extra_info: samples_per_s (best round: the others share these cores), speedup over the reference measured in
the same run, threads, load average (1 minute, at the end of the case).
"""
from __future__ import annotations

import os

import pytest
import torch

from rrcm.classifier import NoisyImageClassifier, load_classifier
from rrcm.data import load_dataset
from rrcm.engine import bench, throughput

SIGMA, SAMPLES, ROUNDS, BATCH = 0.25, 2000, 5, 128
CPU = torch.device("cpu")
RATES: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="module", params=["fmnist-s", "bundled"])
def classifier(request) -> NoisyImageClassifier:
    if request.param == "bundled":
        return load_classifier("fashion-mnist", SIGMA)
    return throughput.bench_model("fmnist-s", None, SIGMA)[0]


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return load_dataset("fashion-mnist", "test")[0][0]


def _record(benchmark, model: NoisyImageClassifier, name: str) -> float:
    rate = SAMPLES / benchmark.stats.stats.min
    key = f"{model.cfg.embed_dim}x{model.cfg.depth}/{model.cfg.patch_size}"
    RATES[key, name] = rate
    benchmark.extra_info.update(samples_per_s=rate, samples_per_round=SAMPLES, threads=torch.get_num_threads(),
                                load_average=os.getloadavg()[0], model=key)
    if (key, bench.REFERENCE) in RATES and name != bench.REFERENCE:
        benchmark.extra_info["speedup"] = rate / RATES[key, bench.REFERENCE]
    return rate


def test_reference_loop(benchmark, classifier, image):
    draw = throughput.reference_sampler(classifier, image, SIGMA, 10)
    counts = benchmark.pedantic(draw, args=(SAMPLES,), rounds=ROUNDS, warmup_rounds=1)
    assert counts.sum() == SAMPLES
    _record(benchmark, classifier, bench.REFERENCE)
    benchmark.extra_info.update(batch=bench.REFERENCE_BATCH)


@pytest.mark.parametrize("name", bench.CONFIGS["cpu"])
def test_engine(benchmark, classifier, image, name):
    options = bench.CONFIGS["cpu"][name]
    skip = throughput.not_applicable(options, CPU)
    if skip:
        pytest.skip(skip)
    certifier = throughput.make_certifier(classifier, options, BATCH, CPU)
    draw = throughput.engine_sampler(certifier, image)
    prediction = benchmark.pedantic(draw, args=(SAMPLES,), rounds=ROUNDS, warmup_rounds=1)
    assert len(prediction) == 1
    _record(benchmark, classifier, name)
    benchmark.extra_info.update(certifier.describe())
