"""Runtimes that turn one batch of noisy model inputs into logits: one small class per runtime.

Every backend has `forward(batch) -> logits` (float32, (B, num_classes), on `device`) and tells the
sampler what to feed it: `input_scale`, `input_shift` (the affine map from pixel space that the
sampler applies while it adds noise), `input_dtype`, and `info` (what the model records about itself).
`make_backend` picks one by name from BACKENDS.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rrcm.classifier import ModelInput
from rrcm.device import resolve_device
from rrcm.errors import UserError, first_line


@dataclass(frozen=True)
class ModelInfo:
    """What a model records about itself; None where it does not say."""

    sigma: float | None = None
    num_classes: int | None = None
    input_shape: tuple[int, int, int] | None = None
    dataset: str | None = None


def run_padded(run, batch: torch.Tensor, size: int | None) -> torch.Tensor:
    """`run` on chunks of exactly `size` rows, the last one zero-padded: for graphs built for one batch size."""
    if size is None or len(batch) == size:
        return run(batch)
    chunks = []
    for chunk in batch.split(size):
        rows = len(chunk)
        if rows < size:
            chunk = torch.cat([chunk, chunk.new_zeros((size - rows, *chunk.shape[1:]))])
        chunks.append(run(chunk)[:rows])
    return torch.cat(chunks)


class TorchBackend:
    """A torch module in eager mode or through `torch.compile`, in float32, a lower float `dtype`, or int8.

    A model with `forward_model_input` and `input_scale` / `input_shift` (NoisyImageClassifier) gets
    model-space inputs, so normalization happens while the noise is written; any other module is
    called on pixel-space noisy images. On a CPU, compiled graphs freeze the weights (Inductor's
    `freezing`: constant folding and oneDNN weight prepacking).
    dtype=torch.int8 (x86 CPUs, needs torchao): static int8 quantization (`rrcm.engine.quantize`)
    calibrated on `calibration`, noisy pixel-space images (k, C, H, W), always compiled, for
    batches of `static_batch` rows (others are split and padded).
    """

    name = "torch"

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", *, compile: bool = False,
                 dtype: torch.dtype = torch.float32, calibration: torch.Tensor | None = None, static_batch: int = 128):
        if isinstance(model, (str, Path)):
            raise UserError(f"{model}: the torch backend runs a loaded model; use the onnxruntime backend for .onnx files")
        self.device = resolve_device(device)
        int8 = dtype == torch.int8
        if int8 and self.device.type != "cpu":
            raise UserError("int8 runs on x86 CPUs; on a GPU use bf16")
        if int8 and calibration is None:
            raise UserError("int8 needs calibration: noisy images (k, C, H, W), e.g. quantize.noisy_calibration(...)")
        if int8 and (isinstance(static_batch, bool) or not isinstance(static_batch, int) or static_batch < 1):
            raise UserError(f"batch size must be an integer >= 1, got {static_batch!r}")
        self.input_dtype = torch.float32 if int8 else dtype
        if isinstance(model, nn.Module):
            if dtype not in (torch.float32, torch.int8):
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
        else:
            self._context = contextlib.nullcontext
        if int8:
            from rrcm.engine.quantize import quantize_int8

            calibration = torch.as_tensor(calibration, dtype=torch.float32) * self.input_scale + self.input_shift
            self._fn = quantize_int8(fn, calibration, static_batch)
        else:
            self._fn = torch.compile(fn) if compile else fn

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self._context():  # not inference_mode: compiled graphs would recompile for its tensors
            return run_padded(self._fn, batch, self.static_batch).float()


class OnnxRuntimeBackend:
    """An ONNX model (a file, its bytes, or a module exported on the fly) in an ONNX Runtime session.

    `rrcm export onnx` graphs take pixel-space input, so the sampler's affine map is the identity.
    On a CUDA device the CUDA execution provider reads and writes torch tensors in place (IO binding).
    A graph with a static batch size gets any batch in chunks of that size, the last one padded.
    """

    name = "onnxruntime"

    def __init__(self, model: str | Path | bytes | nn.Module, device: str | torch.device = "cpu", *,
                 threads: int | None = None):
        import onnxruntime as ort

        from rrcm.export.onnx import export_onnx, from_metadata

        self.device = resolve_device(device)
        self.input_dtype = torch.float32
        self.input_scale, self.input_shift = 1.0, 0.0
        if isinstance(model, nn.Module):
            if not all(hasattr(model, a) for a in ("sigma", "num_classes", "input_shape")):
                raise UserError("the onnxruntime backend exports a module only if it has sigma, num_classes and "
                                "input_shape (like load_classifier's); export it yourself with torch.onnx")
            model = export_onnx(model)
        source = "ONNX model" if isinstance(model, bytes) else str(model)
        if not isinstance(model, bytes) and not Path(model).is_file():
            raise UserError(f"{model}: no such ONNX file")
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UserError("this onnxruntime has no CUDA provider: install onnxruntime-gpu, or use --device cpu")
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index or 0}))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own types for unreadable, invalid and unsupported files
            raise UserError(f"{source}: not a usable ONNX model ({first_line(e)})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1 or inputs[0].type != "tensor(float)" or len(inputs[0].shape) != 4:
            raise UserError(f"{source}: expected one float input of shape (N, C, H, W), got "
                            f"{[(i.name, i.type, i.shape) for i in inputs]}")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        batch, *dims = inputs[0].shape
        self.static_batch = batch if isinstance(batch, int) else None
        recorded = from_metadata(self.session.get_modelmeta().custom_metadata_map, source)
        graph_shape = tuple(dims) if all(isinstance(d, int) for d in dims) else None
        if recorded.input_shape and graph_shape and recorded.input_shape != graph_shape:
            raise UserError(f"{source}: graph input {graph_shape} contradicts the recorded input shape {recorded.input_shape}")
        width = outputs[0].shape[-1] if len(outputs[0].shape) == 2 else None
        self.info = ModelInfo(recorded.sigma, recorded.num_classes or (width if isinstance(width, int) else None),
                              recorded.input_shape or graph_shape, recorded.dataset)
        if self.device.type == "cuda" and self.info.num_classes is None:
            raise UserError(f"{source}: the output width (number of classes) must be static to run on CUDA")

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.contiguous()
        if self.device.type == "cpu":
            return torch.from_numpy(self.session.run([self.output_name], {self.input_name: batch.numpy()})[0])
        import numpy as np

        binding = self.session.io_binding()
        index = self.device.index or 0
        binding.bind_input(self.input_name, "cuda", index, np.float32, tuple(batch.shape), batch.data_ptr())
        logits = torch.empty((len(batch), self.info.num_classes), device=self.device)
        binding.bind_output(self.output_name, "cuda", index, np.float32, tuple(logits.shape), logits.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # the session reads the batch on its own stream
        self.session.run_with_iobinding(binding)
        return logits

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return run_padded(self._run, batch, self.static_batch).float()


BACKENDS = {
    "torch": TorchBackend,
    "onnxruntime": OnnxRuntimeBackend,
    "aoti": "rrcm.export.aoti:AotiBackend",  # imported on use: they build on this module
    "tensorrt": "rrcm.export.tensorrt:TensorRTBackend",
}
SUFFIXES = {".onnx": "onnxruntime", ".pt2": "aoti", ".plan": "tensorrt"}


def make_backend(model, device: str | torch.device = "cpu", name: str | None = None, **options):
    """The backend `name` for `model` (default: by file suffix for a path, onnxruntime for bytes, torch for a module)."""
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
    return backend(model, device, **options)
