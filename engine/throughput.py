"""The measurements behind `rrcm bench` (engine/bench.py: the command and its configurations): FLOP per sample,
the reference loop, the engine through `Certifier`, matrix-product peaks, and the run that puts them together.

One run, on one device, times
- the reference loop: Cohen et al.'s `Smooth._sample_noise` (locuslab/smoothing, core.py), the way the public
  randomized-smoothing code samples: fp32 eager, `x.repeat` plus `randn_like * sigma`, argmax counted on the
  host, REFERENCE_BATCH samples per forward pass (on CUDA also with TF32 matrix products, "reference-tf32");
- each engine configuration of CONFIGS[device type] that applies here (a name -> `Certifier` options);
- the matrix-product peak of each dtype those use (the fastest of MATMUL_SIZES[device type]^3 products on random
  data: on a CPU the small products that stay in cache are the fast ones).
FLOP per sample are counted (`count_flops`: matrix products, convolutions and attention, on the meta device), so
a configuration's limit is peak(its dtype) / FLOP per sample, and its fraction of the limit is samples/s over that.

Each configuration runs a warm-up call of one batch (compilation, quantization, graph capture: reported apart),
a second batch that sizes the rounds, then ROUNDS calls of whole batches lasting about `seconds` together;
samples/s is the samples of one call over the median call time. Seconds per image at n are extrapolated: n
estimation samples at that rate (CERTIFY's n0 selection samples left out).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import importlib.util
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rrcm.cpu import cpu_info
from rrcm.engine.bench import CONFIGS, FP8, REFERENCE, REFERENCE_BATCH, REFERENCES
from rrcm.engine.fp8 import fp8_supported
from rrcm.errors import UserError, first_line
from rrcm.outputs import atomic_write, check_writable, make_folder

ROUNDS = 3
ALPHA = 0.001
PEAK_SECONDS = 1.0
MAX_SECONDS = 3600.0  # per configuration: an hour is already far more than a stable rate needs
MATMUL_SIZES = {"cpu": (256, 512, 1024), "cuda": (8192,)}
INT8_CALIBRATION_IMAGES = 64  # random images: the cost of int8 does not depend on what the scales are

# ---------------------------------------------------------------- what is measured
def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOP of one forward pass of one sample, as FlopCounterMode counts them (matrix products, convolutions,
    attention; no elementwise work). It runs on the model's device: build the model on "meta" to count for free."""
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *input_shape, device=device))
    return counter.get_total_flops()


def reference_sampler(model: nn.Module, x: torch.Tensor, sigma: float, num_classes: int,
                      batch: int = REFERENCE_BATCH) -> Callable[[int], np.ndarray]:
    """draw(num) -> class counts of `model` on num noisy copies of x (C, H, W), the public reference's way:
    repeat, `randn_like` noise, fp32 eager forward, argmax read back and counted in a Python loop."""
    def draw(num: int) -> np.ndarray:
        counts = np.zeros(num_classes, dtype=int)
        with torch.no_grad():
            for _ in range(math.ceil(num / batch)):
                size = min(batch, num)
                num -= size
                copies = x.repeat((size, 1, 1, 1))
                noise = torch.randn_like(copies) * sigma
                for label in model(copies + noise).argmax(1).cpu().numpy():
                    counts[label] += 1
        return counts

    return draw


def engine_sampler(certifier, x: torch.Tensor) -> Callable[[int], list[int]]:
    """draw(num) -> the engine's PREDICT of x (C, H, W) from num noisy samples: what `rrcm predict` runs per image."""
    seeds = itertools.count()
    return lambda num: certifier.predict_many(x[None], num, ALPHA, seeds=[next(seeds)])


@dataclass(frozen=True)
class Timing:
    samples_per_s: float
    warmup_s: float  # setup and the first batch: compilation, quantization, graph capture
    samples_per_call: int
    call_s: list[float]


def time_sampler(draw: Callable[[int], object], batch: int, seconds: float, device: torch.device,
                 setup_s: float = 0.0, rounds: int = ROUNDS) -> Timing:
    """Samples/s of draw(num): a warm-up batch, one batch to size the calls, then `rounds` calls of whole
    batches lasting about `seconds` together; the rate of the median call."""
    def timed(num: int) -> float:
        start = time.perf_counter()
        draw(num)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    warmup = timed(batch)
    batches = max(1, round(seconds / rounds / timed(batch)))
    calls = [timed(batches * batch) for _ in range(rounds)]
    return Timing(batches * batch / statistics.median(calls), setup_s + warmup, batches * batch, calls)


def cuda_seconds(fn: Callable[[], object], seconds: float) -> list[float]:
    """Seconds of each fn() between CUDA events, after 3 warm-ups, for about `seconds` (5 to 50 calls)."""
    for _ in range(3):
        fn()
    times: list[float] = []
    while len(times) < 5 or (sum(times) < seconds and len(times) < 50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def _cpu_seconds(fn: Callable[[], object], seconds: float) -> list[float]:
    fn()
    times: list[float] = []
    while len(times) < 3 or sum(times) < seconds:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


@contextlib.contextmanager
def tf32(enabled: bool = True):
    """float32 matrix products in TensorFloat-32 inside the block (when enabled)."""
    before = torch.get_float32_matmul_precision()
    if enabled:
        torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def matmul_peak(device: torch.device, name: str, seconds: float = PEAK_SECONDS) -> float:
    """FLOP/s of the fastest of MATMUL_SIZES^3 matrix products of dtype `name` ("tf32", or a torch dtype's name) on
    random data: the median time on a GPU, the fastest on a CPU (where other work only slows products down). fp8
    through torch._scaled_mm, int8 through torch._int_mm."""
    return max(_matmul_rate(device, name, size, seconds / len(MATMUL_SIZES[device.type]))
               for size in MATMUL_SIZES[device.type])


def _matmul_rate(device: torch.device, name: str, size: int, seconds: float) -> float:
    dtype = torch.float32 if name == "tf32" else getattr(torch, name)
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(size, size, generator=g, device=device) for _ in range(2))
    if dtype == torch.int8:
        a, b = (t.clamp(-3, 3).mul(40).to(torch.int8) for t in (a, b))
        fn = lambda: torch._int_mm(a, b)  # noqa: E731
    elif dtype == torch.float8_e4m3fn:
        one = torch.ones((), device=device)
        a, b = a.to(dtype), b.to(dtype).t().contiguous().t()  # _scaled_mm wants the second operand column-major
        fn = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
    else:
        a, b = a.to(dtype), b.to(dtype)
        fn = lambda: a @ b  # noqa: E731
    with tf32(name == "tf32"):
        if device.type == "cuda":
            return 2 * size**3 / statistics.median(cuda_seconds(fn, seconds))
        return 2 * size**3 / min(_cpu_seconds(fn, seconds))


# ---------------------------------------------------------------- the machine and the model
def describe_device(device: torch.device) -> dict:
    """What the JSON records about the device: GPU name, capability and memory (and the host's CPU model), or
    the CPU's model, instruction sets as torch's kernels may use them (`rrcm.cpu`) and core count."""
    cpu = cpu_info()
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": p.name, "capability": f"{p.major}.{p.minor}",
                "memory_gib": round(p.total_memory / 2**30, 1), "multiprocessors": p.multi_processor_count,
                "cuda": torch.version.cuda, "host_cpu": cpu.model}
    return {"type": "cpu", "name": cpu.model, **cpu.to_dict(), "cores": os.cpu_count()}


def environment() -> dict:
    import rrcm

    return {"rrcm": rrcm.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "load_average": list(os.getloadavg())}


def bench_model(preset: str | None, model: str | None, sigma: float | None):
    """(NoisyImageClassifier on the CPU, its description): a preset with random weights, or a checkpoint."""
    from rrcm.classifier import NoisyImageClassifier, load_classifier
    from rrcm.model import Classifier
    from rrcm.presets import get_preset

    if preset is not None:
        cfg = get_preset(preset)
        sigma = 0.5 if sigma is None else sigma
        with torch.random.fork_rng():
            torch.manual_seed(0)
            classifier = NoisyImageClassifier(Classifier(cfg), sigma).eval()
        name, weights = preset, "random"
    else:
        if Path(model).suffix in (".onnx", ".pt2", ".plan"):
            raise UserError(f"{model}: rrcm bench times a checkpoint folder, a bundled model or a --preset, not an exported file")
        classifier = load_classifier(model, sigma)
        cfg, name, weights = classifier.cfg, model, "trained"
    with torch.device("meta"):
        counted = NoisyImageClassifier(Classifier(cfg), classifier.sigma)
    info = {"name": name, "weights": weights, "sigma": classifier.sigma, "input_shape": list(cfg.input_shape),
            "num_classes": cfg.num_classes, "parameters": sum(p.numel() for p in classifier.parameters()),
            "flop_per_sample": count_flops(counted, cfg.input_shape)}
    return classifier, info


# ---------------------------------------------------------------- configurations
def certifier_options(options: dict) -> dict:
    """A CONFIGS entry as Certifier keyword options (dtype names to torch dtypes)."""
    return {k: getattr(torch, v) if k == "dtype" else v for k, v in options.items()}


def config_dtype(name: str, device: torch.device) -> str:
    """The dtype of a configuration's matrix products: whose peak is its limit."""
    references = REFERENCES[device.type]
    return references[name] if name in references else CONFIGS[device.type][name].get("dtype", "float32")


def not_applicable(options: dict, device: torch.device) -> str | None:
    """Why a configuration cannot run on this device and installation, or None when it can."""
    dtype = options.get("dtype")
    if options.get("backend") == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed (pip install 'rrcm[onnx]')"
    if dtype == "int8":
        if platform.machine().lower() not in ("x86_64", "amd64"):
            return "int8 runs on x86 CPUs"
        if importlib.util.find_spec("torchao") is None:
            return "int8 needs torchao (pip install 'rrcm[int8]')"
    if dtype == FP8 and not fp8_supported(device):
        return "fp8 needs FP8 tensor cores (compute capability 8.9 or newer)"
    return None


def select_configs(device: torch.device, names: str | None) -> list[str]:
    """The configurations to run: the reference loops, then CONFIGS[device], by default; else the listed ones."""
    known = [*REFERENCES[device.type], *CONFIGS[device.type]]
    if names is None:
        return known
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown or not chosen:
        raise UserError(f"unknown configuration(s) {', '.join(unknown) or repr(names)} on {device.type}; "
                        f"choose from {', '.join(known)}")
    return list(dict.fromkeys(chosen))


def make_certifier(classifier, options: dict, batch: int, device: torch.device):
    from rrcm.engine.certifier import Certifier

    options = certifier_options(options)
    if options.get("dtype") == torch.int8:
        from rrcm.engine.quantize import noisy_calibration

        images = torch.rand(INT8_CALIBRATION_IMAGES, *classifier.input_shape, generator=torch.Generator().manual_seed(1))
        options.update(calibration=noisy_calibration(images, classifier.sigma), static_batch=batch)
    if options.get("backend") == "onnxruntime":
        options["threads"] = torch.get_num_threads()  # as many as torch uses
    return Certifier(copy.deepcopy(classifier), classifier.num_classes, classifier.sigma, batch_size=batch,
                     device=device, **options)


def measure(name: str, classifier, image: torch.Tensor, batch: int, seconds: float, device: torch.device) -> dict:
    """One configuration's timing and what ran, as the JSON records it."""
    if "torch._dynamo" in sys.modules:  # something compiled before: this configuration compiles afresh,
        torch._dynamo.reset()           # never into another's cache entries (nor past their size limit)
    start = time.perf_counter()
    if name not in REFERENCES[device.type]:
        certifier = make_certifier(classifier, CONFIGS[device.type][name], batch, device)
        timing = time_sampler(engine_sampler(certifier, image), batch, seconds, device, time.perf_counter() - start)
        return {"batch": batch, "ran": certifier.describe(), **asdict(timing)}
    dtype = REFERENCES[device.type][name]
    with tf32(dtype == "tf32"):
        model = copy.deepcopy(classifier).to(device)
        draw = reference_sampler(model, image.to(device), classifier.sigma, classifier.num_classes, batch)
        timing = time_sampler(draw, batch, seconds, device, time.perf_counter() - start)
    ran = {"backend": "torch", "device": str(device), "dtype": dtype, "compile": False,
           "sampler": "randn_like, counts on the host", "cuda_graphs": False, "batch": batch}
    return {"batch": batch, "ran": ran, **asdict(timing)}


# ---------------------------------------------------------------- report
def add_ratios(result: dict) -> None:
    """Speedup over the reference, s/image at n, limit and fraction of it, for each measured configuration."""
    flop, peaks = result["model"]["flop_per_sample"], result["peak_flops"]
    reference = next((c for c in result["configurations"] if c["name"] == REFERENCE and "samples_per_s" in c), None)
    for c in result["configurations"]:
        if "samples_per_s" not in c:
            continue
        rate = c["samples_per_s"]
        c["s_per_image_at_n"] = result["n"] / rate
        c["speedup"] = rate / reference["samples_per_s"] if reference else None
        peak = peaks.get(c["dtype"])
        c["limit_samples_per_s"] = peak / flop if peak else None
        c["fraction_of_limit"] = rate / c["limit_samples_per_s"] if peak else None


def table(result: dict) -> str:
    """The printed report: one markdown row per configuration."""
    m, d = result["model"], result["device"]
    peaks = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in result["peak_flops"].items())
    lines = [
        f"rrcm bench: {m['name']} ({m['weights']} weights, {m['parameters']:,} parameters, "
        f"{m['flop_per_sample'] / 1e9:.4g} GFLOP/sample) on {d['name']}"
        f"{' (' + ', '.join(d['features']) + ')' if d.get('features') else ''}, torch {result['torch']}, "
        f"{result['threads']} threads",
        f"matrix-product peak (best of {', '.join(f'{s}^3' for s in MATMUL_SIZES[d['type']])}, measured now): {peaks}",
        "",
        f"| configuration | batch | samples/s | s/image at n={result['n']:,} | speedup | % of limit (dtype) | warm-up s |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in result["configurations"]:
        if "samples_per_s" in c:
            speedup = "-" if c["speedup"] is None else f"{c['speedup']:.2f}x"
            frac = "-" if c["fraction_of_limit"] is None else f"{100 * c['fraction_of_limit']:.1f}"
            lines.append(f"| {c['name']} | {c['batch']} | {c['samples_per_s']:,.0f} | {c['s_per_image_at_n']:.3g} | "
                         f"{speedup} | {frac} ({c['dtype']}) | {c['warmup_s']:.1f} |")
        else:
            lines.append(f"| {c['name']} | - | {'failed' if 'error' in c else 'not run'}: {c.get('error') or c['skipped']} "
                         f"| - | - | - | - |")
    lines += ["", f"s/image = n / samples/s, extrapolated from {ROUNDS} timed calls per configuration (warm-up "
                  "excluded; CERTIFY's n0 selection samples left out). Limit = peak FLOP/s of the dtype / FLOP per sample."]
    return "\n".join(lines)


def write_json(path: Path, result: dict) -> None:
    """Replace `path` at once, so that a run cut short leaves the last complete record."""
    atomic_write(path, json.dumps(result, indent=1) + "\n")


def run_bench(args: argparse.Namespace) -> int:
    """`rrcm bench`: every configuration timed, the table printed, the JSON written after each; exit 1 if one failed."""
    from rrcm.device import resolve_device

    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if args.batch is not None and args.batch < 1:
        raise UserError(f"--batch must be >= 1, got {args.batch}")
    if not (math.isfinite(args.seconds) and 0 < args.seconds <= MAX_SECONDS):
        raise UserError(f"--seconds must be a number in (0, {MAX_SECONDS:g}] (timed seconds per configuration), "
                        f"got {args.seconds}")
    if args.sigma is not None and not (math.isfinite(args.sigma) and args.sigma > 0):
        raise UserError(f"--sigma must be a positive number, got {args.sigma}")
    json_path = None if args.json is None else check_writable(args.json)
    if json_path is not None:
        make_folder(json_path.parent)
    device = resolve_device(args.device)
    names = select_configs(device, args.configs)
    classifier, model_info = bench_model(args.preset, args.model, args.sigma)
    batch = args.batch or (1000 if device.type == "cuda" else 128)
    image = torch.rand(classifier.input_shape, generator=torch.Generator().manual_seed(0))
    arguments = {k: v for k, v in vars(args).items() if k != "command" and not k.startswith("_")}
    result = {"arguments": arguments, "time": datetime.datetime.now().astimezone().isoformat(),
              "device": describe_device(device), **environment(), "model": model_info, "n": args.n,
              "seconds_per_configuration": args.seconds, "peak_flops": {}, "configurations": []}

    def log(text: str) -> None:
        print(f"rrcm bench: {text}", file=sys.stderr, flush=True)

    def save() -> None:
        add_ratios(result)
        if json_path is not None:
            write_json(json_path, result)

    references = REFERENCES[device.type]
    plan = {n: (CONFIGS[device.type].get(n, {}), None if n in references else not_applicable(CONFIGS[device.type][n], device))
            for n in names}
    for dtype in dict.fromkeys(config_dtype(n, device) for n, (_, skip) in plan.items() if skip is None):
        result["peak_flops"][dtype] = matmul_peak(device, dtype, min(PEAK_SECONDS, args.seconds))
        log(f"{dtype} matrix-product peak {result['peak_flops'][dtype] / 1e12:.3g} TFLOP/s")
    failed = 0
    for i, (name, (options, skip)) in enumerate(plan.items(), 1):
        entry = {"name": name, "dtype": config_dtype(name, device), "options": options}
        if skip is not None:
            entry["skipped"] = skip
            log(f"[{i}/{len(plan)}] {name}: not run ({skip})")
        else:
            log(f"[{i}/{len(plan)}] {name}: warming up, then about {args.seconds:g} s of timed calls")
            try:
                entry.update(measure(name, classifier, image, REFERENCE_BATCH if name in references else batch,
                                     args.seconds, device))
            except Exception as e:  # one configuration failing (out of memory, say) leaves the others' results
                entry["error"] = f"{type(e).__name__}: {first_line(e)}"
                failed += 1
                log(f"[{i}/{len(plan)}] {name}: failed: {entry['error']}")
            else:
                log(f"[{i}/{len(plan)}] {name}: {entry['samples_per_s']:,.0f} samples/s (warm-up {entry['warmup_s']:.1f} s)")
            if device.type == "cuda":  # the next configuration starts with the memory this one held
                gc.collect()
                torch.cuda.empty_cache()
        result["configurations"].append(entry)
        save()
    result["load_average_end"] = list(os.getloadavg())
    save()
    print(table(result))
    if json_path is not None:
        print(f"rrcm bench: wrote {json_path}")
    return 1 if failed else 0
