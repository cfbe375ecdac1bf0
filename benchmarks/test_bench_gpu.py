"""Certification throughput on one CUDA GPU (issue 5): samples/s and seconds per image at N = 100,000.

Each case runs a fixed number of batches per round (a few seconds), not a whole certification; the
suite should take 6 to 7 minutes on an H100, most of it torch.compile. Under a 10-minute limit per
command, run it as two commands (cases that need another case's figure measure it themselves):

    python -m pytest benchmarks/test_bench_gpu.py --benchmark-only --benchmark-enable \
        -k "not autotune and not denoised" --benchmark-json=benchmarks/results/gpu-h100-rrcm.json
    python -m pytest benchmarks/test_bench_gpu.py --benchmark-only --benchmark-enable \
        -k "autotune or denoised" --benchmark-json=benchmarks/results/gpu-h100-dds.json

extra_info of every case: samples_per_s, s_per_image_at_1e5, frac_of_limit (of the bf16 limit from
the 8192^3 matrix-product peak measured in the same run) and, for the rRCM configurations, speedup
over the fp32 reference loop measured in the same run. benchmarks/GPU.md holds the predictions.
"""
from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
import pytest
import torch

import gpu_models
from rrcm.classifier import NoisyImageClassifier
from rrcm.engine import Certifier
from rrcm.kernels import count_predictions, noisy_inputs
from rrcm.model import Classifier
from rrcm.presets import get_preset
from rrcm.schedule import grid_time_for_sigma

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark suite: needs a CUDA device")

DEVICE = "cuda"
N_CERT = 100_000
SIGMA = 0.5
SEED = 1234
REFERENCE_BATCH = 400
ENGINE_BATCH = {"rrcm-b-cifar": 4000, "rrcm-b-imagenet": 1000}
BATCHES_PER_ROUND = {"reference": 3, "engine": 8, "dds": 2}
RESULTS: dict[tuple[str, str], float] = {}  # (model, config) -> samples/s, shared between cases of one run


def _sampling():
    from rrcm.kernels import triton_counting, triton_sampling  # CUDA only: imported once a case runs

    return triton_sampling, triton_counting


def _sync_round(fn, batches: int):
    def run():
        for _ in range(batches):
            fn()
        torch.cuda.synchronize()

    return run


def _event_time(fn, repeats: int = 10, warmup: int = 3) -> float:
    """Median seconds of fn() between CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return float(np.median(times))


@functools.cache
def peak_flops() -> float:
    """bf16 matrix-product rate of this GPU, FLOP/s, from 8192^3 products on random data."""
    a, b = (torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / _event_time(lambda: a @ b, repeats=20)


@functools.cache
def flops_per_sample(name: str) -> float:
    return 2.0 * gpu_models.count_macs(name)[1]


def _record(benchmark, model: str, config: str, samples_per_round: int, **info) -> float:
    if benchmark.stats is None:
        pytest.skip("timings need --benchmark-enable")
    rate = samples_per_round / benchmark.stats.stats.median
    RESULTS[(model, config)] = rate
    limit = peak_flops() / flops_per_sample(model)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(), torch=torch.__version__, model=model, config=config,
        samples_per_s=rate, s_per_image_at_1e5=N_CERT / rate, limit_samples_per_s=limit,
        frac_of_limit=rate / limit, peak_tflops=peak_flops() / 1e12, **info,
    )
    return rate


@contextlib.contextmanager
def _tf32(enabled: bool):
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


# ---------------------------------------------------------------- the reference loop (Cohen et al.'s core.py)
def reference_step(name: str):
    """fp32 eager, batch 400: repeat, add torch noise, normalize, classify, argmax counted on the host."""
    cfg = get_preset(name)
    model = Classifier(cfg).to(DEVICE).eval()
    x = torch.rand(cfg.input_shape, device=DEVICE)
    t = torch.full((REFERENCE_BATCH,), grid_time_for_sigma(SIGMA), device=DEVICE)
    counts = np.zeros(cfg.num_classes, dtype=np.int64)

    @torch.inference_mode()
    def step():
        batch = x.repeat((REFERENCE_BATCH, 1, 1, 1))
        noise = torch.randn_like(batch) * SIGMA
        predictions = model((batch + noise - 0.5) / 0.5, t).argmax(1)
        counts[:] += np.bincount(predictions.cpu().numpy(), minlength=cfg.num_classes)

    return step


def reference_rate(name: str, tf32: bool = False) -> float:
    """The reference loop's samples/s in this run: from its case, or measured here if it did not run."""
    key = (name, "reference-tf32" if tf32 else "reference")
    if key not in RESULTS:
        with _tf32(tf32):
            RESULTS[key] = REFERENCE_BATCH / _event_time(reference_step(name), repeats=3, warmup=1)
    return RESULTS[key]


@pytest.mark.parametrize("tf32", [False, True], ids=["fp32", "tf32"])
@pytest.mark.parametrize("name", list(ENGINE_BATCH))
def test_reference_loop(benchmark, name, tf32):
    step, batches = reference_step(name), BATCHES_PER_ROUND["reference"]
    with _tf32(tf32):
        benchmark.pedantic(_sync_round(step, batches), rounds=3, warmup_rounds=1)
    _record(benchmark, name, "reference-tf32" if tf32 else "reference", batches * REFERENCE_BATCH,
            batch=REFERENCE_BATCH, dtype="float32", tf32_matmul=tf32)


# ---------------------------------------------------------------- engine configurations
CONFIGS = {  # name: (weights dtype, fused sampler + device counts, torch.compile mode, CUDA graph)
    "bf16": (torch.bfloat16, False, None, False),
    "bf16-fused": (torch.bfloat16, True, None, False),
    "fp16-fused": (torch.float16, True, None, False),
    "bf16-fused-compile": (torch.bfloat16, True, "default", False),
    "bf16-fused-compile-graph": (torch.bfloat16, True, "default", True),
    # GEMM epilogues (bias, GELU) fused by Triton templates; minutes of autotuning, so ImageNet only.
    "bf16-fused-autotune-graph": (torch.bfloat16, True, "max-autotune-no-cudagraphs", True),
}
ENGINE_CASES = [(n, c) for n in ENGINE_BATCH for c in CONFIGS if "autotune" not in c or n == "rrcm-b-imagenet"]


@functools.cache
def rrcm_model(name: str, dtype: torch.dtype, compile_mode: str | None) -> torch.nn.Module:
    model, _ = gpu_models.build(name, SIGMA, device=DEVICE)
    model = model.to(dtype).eval()
    return model if compile_mode is None else torch.compile(model, mode=compile_mode)


def engine_step(name: str, dtype: torch.dtype, fused: bool, compile_mode: str | None, graph: bool):
    """One batch of `ENGINE_BATCH[name]` rows, split over two images, in model space."""
    cfg = get_preset(name)
    batch = ENGINE_BATCH[name]
    model = rrcm_model(name, dtype, compile_mode)
    scale, shift = gpu_models.rrcm_input_affine(SIGMA)
    images = torch.rand(2, *cfg.input_shape, device=DEVICE)
    repeats = [batch // 2, batch - batch // 2]
    if not fused:  # today's torch path: rrcm.kernels.noisy_inputs, counts read back per batch
        gen = torch.Generator(device=DEVICE).manual_seed(SEED)
        rows = torch.repeat_interleave(torch.arange(2), torch.tensor(repeats)).numpy()
        counts = np.zeros((2, cfg.num_classes), dtype=np.int64)

        @torch.inference_mode()
        def step():
            x_in = noisy_inputs(images, repeats, SIGMA, gen, scale, shift, dtype)
            pred = model(x_in).argmax(1).cpu().numpy()
            np.add.at(counts, (rows, pred), 1)

        return step
    sampling, counting = _sampling()
    rows = sampling.image_of_row(repeats, 2, DEVICE)
    x_in = torch.empty(batch, *cfg.input_shape, device=DEVICE, dtype=dtype)
    offset = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    counts = torch.zeros(2, cfg.num_classes, dtype=torch.int64, device=DEVICE)

    @torch.inference_mode()
    def step():
        sampling.write_noisy_inputs(x_in, images, rows, SIGMA, SEED, offset, scale, shift)
        counting.count_predictions_triton(model(x_in), rows, 2, counts)

    if not graph:
        return step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        step()
    return cuda_graph.replay


@pytest.mark.parametrize("name, config", ENGINE_CASES, ids=[f"{n}-{c}" for n, c in ENGINE_CASES])
def test_engine(benchmark, name, config):
    batches = BATCHES_PER_ROUND["engine"]
    dtype, fused, compile_mode, graph = CONFIGS[config]
    step = engine_step(name, dtype, fused, compile_mode, graph)
    benchmark.pedantic(_sync_round(step, batches), rounds=3, warmup_rounds=1)
    rate = _record(benchmark, name, config, batches * ENGINE_BATCH[name], batch=ENGINE_BATCH[name],
                   dtype=str(dtype).removeprefix("torch."), compile_mode=compile_mode, cuda_graph=graph)
    benchmark.extra_info.update(speedup=rate / reference_rate(name), speedup_vs_tf32_reference=rate / reference_rate(name, True))


# ---------------------------------------------------------------- the shipped engine: Certifier on the GPU
CERTIFIER_CONFIGS = {"fp32": {}, "bf16": {"dtype": torch.bfloat16}, "bf16-compile": {"dtype": torch.bfloat16, "compile": True}}


@pytest.mark.parametrize("config", CERTIFIER_CONFIGS)
@pytest.mark.parametrize("name", list(ENGINE_BATCH))
def test_certifier(benchmark, name, config):
    """What `rrcm certify --device cuda` runs: Certifier (torch sampler, counts on the device, one host
    synchronization per call), PREDICT of two images sharing each batch."""
    cfg = get_preset(name)
    classifier = NoisyImageClassifier(Classifier(cfg), SIGMA)
    batch = ENGINE_BATCH[name]
    certifier = Certifier(classifier, cfg.num_classes, SIGMA, batch_size=batch, device=DEVICE, **CERTIFIER_CONFIGS[config])
    images, samples = torch.rand(2, *cfg.input_shape), BATCHES_PER_ROUND["engine"] * batch
    benchmark.pedantic(certifier.predict_many, args=(images, samples // 2, 0.001), kwargs={"seeds": [0, 1]},
                       rounds=3, warmup_rounds=1)
    rate = _record(benchmark, name, f"certifier-{config}", samples, batch=batch, **{k: str(v) for k, v in CERTIFIER_CONFIGS[config].items()})
    benchmark.extra_info.update(speedup=rate / reference_rate(name))


# ---------------------------------------------------------------- the 85x claim: diffusion-denoised smoothing
DDS_BATCH = 32


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("name", ["dds-vit-l16-224", "dds-vit-l16-512"])
def test_denoised_smoothing(benchmark, name, channels_last):
    """Carlini et al.'s pipeline through the same engine as rRCM's bf16-fused case: bf16 weights, eager,
    fused sampler (pixels to [-1, 1] plus noise), device counts. Ratio: its s/sample over rRCM-B's."""
    sampling, counting = _sampling()
    model, shape = gpu_models.build(name, SIGMA, device=DEVICE)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(torch.bfloat16, memory_format=fmt).eval()
    images = torch.rand(2, *shape, device=DEVICE)
    rows = sampling.image_of_row([DDS_BATCH // 2, DDS_BATCH // 2], 2, DEVICE)
    x_in = torch.empty(DDS_BATCH, *shape, device=DEVICE, dtype=torch.bfloat16)
    counts = torch.zeros(2, 1000, dtype=torch.int64, device=DEVICE)
    offset = torch.zeros(1, dtype=torch.int64, device=DEVICE)

    @torch.inference_mode()
    def step():
        sampling.write_noisy_inputs(x_in, images, rows, SIGMA, SEED, offset, 2.0, -1.0)
        counting.count_predictions_triton(model(x_in.contiguous(memory_format=fmt)), rows, 2, counts)

    old, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, True
    try:
        batches = BATCHES_PER_ROUND["dds"]
        benchmark.pedantic(_sync_round(step, batches), rounds=3, warmup_rounds=1)
    finally:
        torch.backends.cudnn.benchmark = old
    rate = _record(benchmark, name, "bf16-fused" + ("-channels-last" if channels_last else ""), batches * DDS_BATCH,
                   batch=DDS_BATCH, dtype="bfloat16")
    rrcm = "rrcm-b-imagenet"
    if (rrcm, "bf16-fused") not in RESULTS:
        step = engine_step(rrcm, *CONFIGS["bf16-fused"])
        RESULTS[(rrcm, "bf16-fused")] = ENGINE_BATCH[rrcm] / _event_time(step, 5, 2)
    benchmark.extra_info.update(
        ratio_to_rrcm=RESULTS[(rrcm, "bf16-fused")] / rate,
        ratio_by_macs=flops_per_sample(name) / flops_per_sample(rrcm),
        ratio_to_best_rrcm=max(v for (m, _), v in RESULTS.items() if m == rrcm) / rate,
    )


# ---------------------------------------------------------------- parts: matrix peak, sampler, counting
def test_matmul_peak(benchmark):
    a, b = (torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    benchmark.pedantic(_sync_round(lambda: a @ b, 10), rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(), tflops_events=peak_flops() / 1e12,
        tflops_wall=10 * 2 * 8192**3 / benchmark.stats.stats.median / 1e12 if benchmark.stats else None,
    )


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_sampler(benchmark, path):
    """One rrcm-b-imagenet batch of inputs (1000 x 3 x 224 x 224, bf16) from two images."""
    sampling, _ = _sampling()
    batch, shape = ENGINE_BATCH["rrcm-b-imagenet"], (3, 224, 224)
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
    seconds = _event_time(fn)
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
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), us_per_batch=_event_time(fns[path], 50) * 1e6)
