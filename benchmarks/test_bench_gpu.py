"""The parts of one certification batch on a CUDA GPU: the noise sampler and the counting (issue 5).

Throughput of whole configurations is `rrcm bench` (the reference loop, every engine configuration and the
matrix-product peak of the same run) and the DDS ratio is `benchmarks/dds_ratio.py`; `bash scripts/gpu_run.sh`
runs both. This suite times the two device-side steps around the model:

    python -m pytest benchmarks/test_bench_gpu.py --benchmark-only --benchmark-enable \
        --benchmark-json=benchmarks/results/gpu-h200-parts.json

extra_info: ms_per_batch, elements_per_s and written_gb_per_s for the sampler, us_per_batch for counting
(medians between CUDA events, `rrcm.engine.bench.cuda_seconds`). benchmarks/GPU.md holds the predictions.
"""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from rrcm.engine.throughput import cuda_seconds
from rrcm.kernels import count_predictions, noisy_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark suite: needs a CUDA device")

DEVICE = "cuda"
SIGMA, SEED = 0.5, 1234
SECONDS = 1.0


def _sampling():
    from rrcm.kernels import triton_counting, triton_sampling  # CUDA only: imported once a case runs

    return triton_sampling, triton_counting


def _sync_round(fn, calls: int):
    def run():
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_sampler(benchmark, path):
    """One rrcm-b-imagenet batch of inputs (1000 x 3 x 224 x 224, bf16) from two images."""
    sampling, _ = _sampling()
    batch, shape = 1000, (3, 224, 224)
    images = torch.rand(2, *shape, device=DEVICE)
    repeats = [batch // 2, batch // 2]
    if path == "torch":
        gen = torch.Generator(device=DEVICE).manual_seed(SEED)
        fn = lambda: noisy_inputs(images, repeats, SIGMA, gen, 1.6, -0.8, torch.bfloat16)  # noqa: E731
    else:
        out = torch.empty(batch, *shape, device=DEVICE, dtype=torch.bfloat16)
        rows = sampling.image_of_row(repeats, 2, DEVICE)
        offset = torch.zeros(1, dtype=torch.int64, device=DEVICE)
        fn = lambda: sampling.write_noisy_inputs(out, images, rows, SIGMA, SEED, offset, 1.6, -0.8)  # noqa: E731
    benchmark.pedantic(_sync_round(fn, 10), rounds=5, warmup_rounds=1)
    seconds = statistics.median(cuda_seconds(fn, SECONDS))
    elements = batch * math.prod(shape)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(), ms_per_batch=seconds * 1e3, elements_per_s=elements / seconds,
        written_gb_per_s=2 * elements / seconds / 1e9,
    )


@pytest.mark.parametrize("path", ["bincount", "count_predictions", "triton"])
def test_counting(benchmark, path):
    """Argmax and per-image counts of one batch of 1000 x 1000 bf16 logits over two images."""
    _, counting = _sampling()
    logits = torch.randn(1000, 1000, device=DEVICE, dtype=torch.bfloat16)
    ids = torch.repeat_interleave(torch.arange(2, device=DEVICE), 500)
    counts = torch.zeros(2, 1000, dtype=torch.int64, device=DEVICE)
    fns = {
        "bincount": lambda: counts.view(-1).add_(torch.bincount(ids * 1000 + logits.argmax(1), minlength=2000)),  # syncs twice
        "count_predictions": lambda: counts.add_(count_predictions(logits, ids, 2)),  # index_add_: no sync
        "triton": lambda: counting.count_predictions_triton(logits, ids, 2, counts),
    }
    benchmark.pedantic(_sync_round(fns[path], 20), rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(device=torch.cuda.get_device_name(),
                                us_per_batch=statistics.median(cuda_seconds(fns[path], SECONDS)) * 1e6)
