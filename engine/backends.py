"""Runtimes that turn one batch of noisy model inputs into logits: one small class per runtime.

Every backend has `forward(batch) -> logits` (float32, (B, num_classes), on `device`) and tells the
sampler what to feed it: `input_scale`, `input_shift` (the affine map from pixel space that the
sampler applies while it adds noise), `input_dtype`, and `info` (what the model records about itself).
The torch backend lives here; each exported format's runtime lives with its exporter in rrcm.export
(the engine imports export, never the other way round). `make_backend` picks one by name from BACKENDS.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import warnings
from pathlib import Path

import torch
from torch import nn

from rrcm.classifier import ModelInput
from rrcm.cpu import cpu_info
from rrcm.device import full_fp32, resolve_device
from rrcm.engine.fp8 import fp8_supported, to_fp8
from rrcm.engine.timing import best_rates
from rrcm.errors import PerformanceWarning, UserError
from rrcm.export.runtime import ModelInfo, run_in_chunks


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn,
              "int8": torch.int8}  # the dtypes of `rrcm certify --precision`
DTYPES = tuple(PRECISIONS.values())


class TorchBackend:
    """A torch module in eager mode or through `torch.compile`, in float32, a lower float `dtype`, or int8.

    A model with `forward_model_input` and `input_scale` / `input_shift` (NoisyImageClassifier) gets
    model-space inputs, so normalization happens while the noise is written; any other module is
    called on pixel-space noisy images. On a CPU, compiled graphs freeze the weights (Inductor's
    `freezing`: constant folding and oneDNN weight prepacking).
    dtype=torch.int8 (x86 CPUs, needs torchao): static int8 quantization (`rrcm.engine.quantize`)
    calibrated on `calibration`, noisy pixel-space images (k, C, H, W), always compiled, for
    batches of `static_batch` rows (others are split and padded).
    dtype=torch.float8_e4m3fn (CUDA, compute capability >= 8.9): FP8 matrix products (`rrcm.engine.fp8`).
    bf16 on a CPU without native bf16 (AVX512-BF16 or AMX) is timed against fp32 for about a second, with a
    PerformanceWarning that gives the measured cost when it is the slower one (emulated bf16 on an AVX2-only
    CPU runs several times slower).
    float32 on CUDA runs without TF32: the classifier as trained.
    """

    name = "torch"
    activation_bits: int | None = None  # int8: 8, or 7 on CPUs without VNNI (`rrcm.engine.quantize`)

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", *, compile: bool = False,
                 dtype: torch.dtype = torch.float32, calibration: torch.Tensor | None = None, static_batch: int = 128):
        if isinstance(model, (str, Path)):
            raise UserError(f"{model}: the torch backend runs a loaded model; use the onnxruntime backend for .onnx files")
        self.device = resolve_device(device)
        if dtype not in DTYPES:
            raise UserError(f"the torch backend runs {', '.join(map(str, DTYPES))}, not {dtype}")
        int8, fp8 = dtype == torch.int8, dtype == torch.float8_e4m3fn
        if int8 and self.device.type != "cpu":
            raise UserError("int8 runs on x86 CPUs; on a GPU use bf16")
        if fp8 and not fp8_supported(self.device):
            raise UserError(f"fp8 needs a CUDA GPU with FP8 tensor cores (compute capability 8.9 or newer), not {self.device}")
        if int8 and calibration is None:
            raise UserError("int8 needs calibration: noisy images (k, C, H, W), e.g. quantize.noisy_calibration(...)")
        if int8 and (isinstance(static_batch, bool) or not isinstance(static_batch, int) or static_batch < 1):
            raise UserError(f"batch size must be an integer >= 1, got {static_batch!r}")
        self.dtype, self.compiled = dtype, bool(compile or int8)
        self.input_dtype = {torch.int8: torch.float32, torch.float8_e4m3fn: torch.bfloat16}.get(dtype, dtype)
        float_model = model
        if isinstance(model, nn.Module):
            if fp8:
                model = to_fp8(model)
            elif dtype not in (torch.float32, torch.int8):
                model = copy.deepcopy(model).to(dtype)  # leave the caller's module as it was
            model = model.to(self.device).eval()
        shape = getattr(model, "input_shape", None)
        self.info = ModelInfo(getattr(model, "sigma", None), getattr(model, "num_classes", None),
                              None if shape is None else tuple(shape),
                              getattr(getattr(model, "cfg", None), "dataset", None))
        if hasattr(model, "forward_model_input") and hasattr(model, "input_scale"):
            self.input_scale, self.input_shift = float(model.input_scale), float(model.input_shift)
            fn = ModelInput(model)
        else:
            self.input_scale, self.input_shift = 1.0, 0.0
            fn = model
        self.static_batch = static_batch if int8 else None
        if (compile or int8) and self.device.type == "cpu":
            from torch._inductor import config as inductor

            self._context = lambda: inductor.patch(freezing=True)
        elif dtype == torch.float32 and self.device.type == "cuda":
            self._context = full_fp32
        else:
            self._context = contextlib.nullcontext
        if int8:
            from rrcm.engine.quantize import activation_bits, quantize_int8

            calibration = torch.as_tensor(calibration, dtype=torch.float32) * self.input_scale + self.input_shift
            self.activation_bits = activation_bits()
            self._fn = quantize_int8(fn, calibration, static_batch, self.activation_bits)
        else:
            self._fn = torch.compile(fn) if compile else fn
        self._eager = fn
        if dtype == torch.bfloat16 and self.device.type == "cpu" and not cpu_info().native_bf16:
            _warn_if_bf16_is_slow(ModelInput(float_model) if isinstance(fn, ModelInput) else float_model, fn,
                                  self.info.input_shape, self.input_scale, self.input_shift)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self._context():  # not inference_mode: compiled graphs would recompile for its tensors
            return run_in_chunks(self._fn, batch, self.static_batch).float()

    def probe(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits of the model as loaded (float for int8), not compiled: a check of shapes that costs no compilation."""
        with torch.no_grad():
            return self._eager(batch.float() if self.dtype == torch.int8 else batch).float()


BF16_SLOWER = 1.2  # warn when emulated bf16 takes more than this many times fp32's time


def _warn_if_bf16_is_slow(float_fn, bf16_fn, shape: tuple[int, ...] | None, scale: float, shift: float) -> None:
    """Time eager `bf16_fn` against `float_fn` on 64 noisy inputs of `shape` for a second; warn with the
    measured cost when bf16 is more than BF16_SLOWER times slower (without `shape`: warn that it may be)."""
    cpu = cpu_info()
    why = f"{cpu.model} has no AVX512-BF16 or AMX, so bf16 is emulated"
    if shape is None:
        warnings.warn(f"{why} and may run several times slower than fp32", PerformanceWarning, stacklevel=3)
        return
    u = (0.5 + 0.25 * torch.randn(64, *shape, generator=torch.Generator().manual_seed(0))) * scale + shift
    rates = best_rates({"fp32": (float_fn, u), "bf16": (bf16_fn, u.bfloat16())}, seconds=0.5, rounds=2)
    if rates["fp32"] > BF16_SLOWER * rates["bf16"]:
        warnings.warn(f"bf16 runs {rates['fp32'] / rates['bf16']:.1f}x slower than fp32 here ({why}; measured "
                      f"{rates['bf16']:,.0f} vs {rates['fp32']:,.0f} samples/s); the certificate is for the bf16 "
                      "classifier either way, and fp32 is faster on this CPU", PerformanceWarning, stacklevel=3)


BACKENDS = {  # the exported formats' runtimes are imported on use: onnxruntime and tensorrt are optional
    "torch": TorchBackend,
    "onnxruntime": "rrcm.export.onnx:OnnxRuntimeBackend",
    "aoti": "rrcm.export.aoti:AotiBackend",
    "tensorrt": "rrcm.export.tensorrt:TensorRTBackend",
}
SUFFIXES = {".onnx": "onnxruntime", ".pt2": "aoti", ".plan": "tensorrt"}


def make_backend(model, device: str | torch.device = "cpu", name: str | None = None, *, sigma: float | None = None,
                 **options):
    """The backend `name` for `model` (default: by file suffix for a path, onnxruntime for bytes, torch for a module).

    `sigma`: the noise level an exported model with a sigma input runs at (required for one; a model for one sigma
    refuses another). The torch backend's module has its own sigma, checked by the Certifier.
    """
    if name is None:
        if isinstance(model, (str, Path)):
            name = SUFFIXES.get(Path(model).suffix, "onnxruntime")
        else:
            name = "onnxruntime" if isinstance(model, bytes) else "torch"
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    backend = BACKENDS[name]
    if isinstance(backend, str):
        module, attr = backend.split(":")
        backend = getattr(importlib.import_module(module), attr)
    if backend is not TorchBackend:
        options["sigma"] = sigma
    return backend(model, device, **options)
