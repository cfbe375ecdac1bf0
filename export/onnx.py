"""ONNX export of a classifier for one sigma: pixel-space noisy images (N, C, H, W) in, logits out.

The graph is the classifier's `forward` (normalization and c_in folded in), so any ONNX runtime can
certify from pixel-space noise. It uses the TorchScript exporter (`dynamo=False`): on torch 2.11 to 2.13
it is the fast, stable path and emits only plain opset-17 operators (Conv, Gemm/MatMul, LayerNormalization,
Softmax, Erf, shape ops) that ONNX Runtime and TensorRT parse. What a runtime needs to know is recorded
in the model's metadata_props under "rrcm.*" keys.

A classifier fine-tuned for several sigmas exports, without --sigma, to one graph for all of them: a
second input `sigma` (float, shape (1,)) from which the graph computes the grid time, the input scaling
and the time token (ArgMin over the Karras grid, Log, Cos, Sin: operators that TensorRT's ONNX parser
also lists); the metadata records the sigmas it serves, and its runtime is built for one of them.
"""
from __future__ import annotations

import argparse
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rrcm.checks import check_int
from rrcm.classifier import load_for_export
from rrcm.device import resolve_device
from rrcm.errors import UserError, first_line
from rrcm.export.runtime import (Agreement, ModelInfo, agreement_at_each_sigma, check_batch, exported_info, from_metadata,
                                 run_in_chunks, runtime_sigma, to_metadata)
from rrcm.outputs import OutputLock, atomic_write, check_writable, make_folder

INPUT, SIGMA, OUTPUT = "x", "sigma", "logits"


def export_onnx(classifier: nn.Module, *, opset: int = 17, static_batch: int | None = None) -> bytes:
    """The serialized ONNX model of `classifier` (a NoisyImageClassifier, or any module with its `sigma`,
    `num_classes` and `input_shape` attributes; or a SigmaInputClassifier: a graph with the second input
    `sigma`), passed through `onnx.checker` with full shape inference.

    The batch dimension is dynamic unless `static_batch` fixes it.
    """
    import onnx

    check_int("--opset", opset, 17, onnx.defs.onnx_opset_version())  # 17: the first with LayerNormalization
    info = exported_info(classifier)
    device = next(classifier.parameters()).device
    if static_batch is not None:
        check_batch("--static-batch", static_batch, info.input_shape, device)
    example = (torch.rand((static_batch or 2, *info.input_shape), device=device),)
    names = [INPUT]
    if info.serves is not None:
        example += (torch.tensor(info.serves.representatives()[:1], dtype=torch.float32, device=device),)
        names.append(SIGMA)
    dynamic = None if static_batch else {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter announces its successor
        try:
            torch.onnx.export(classifier.eval(), example, buffer, input_names=names, output_names=[OUTPUT],
                              dynamic_axes=dynamic, opset_version=opset, dynamo=False)
        except (torch.onnx.errors.OnnxExporterError, ValueError, RuntimeError) as e:
            raise UserError(f"ONNX export failed at opset {opset}: {first_line(e)}") from None
    model = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(model, to_metadata(info))
    takes = "" if info.serves is None else f" and their noise level (input '{SIGMA}', shape (1,))"
    model.doc_string = f"rrcm classifier for {info.noise_levels()}: pixel-space noisy images in [0, 1]{takes} -> logits"
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def save_onnx(data: bytes, out: str | Path) -> None:
    """Write a serialized model to `out` through a temporary file, so `out` is never half-written."""
    atomic_write(make_folder(Path(out).parent) / Path(out).name, data)


class OnnxRuntimeBackend:
    """An ONNX model (a file, its bytes, or a module exported on the fly) in an ONNX Runtime session.

    `rrcm export onnx` graphs take pixel-space input, so the sampler's affine map is the identity.
    On a CUDA device the CUDA execution provider reads and writes torch tensors in place (IO binding).
    A graph with a static batch size gets any batch in chunks of that size, the last one padded.
    A graph with a sigma input runs at `sigma`, which must be one it serves (`info.sigma` is then that
    sigma); for a graph of one sigma, `sigma` may be given and must be its own.
    """

    name = "onnxruntime"

    def __init__(self, model: str | Path | bytes | nn.Module, device: str | torch.device = "cpu", *,
                 threads: int | None = None, sigma: float | None = None):
        import onnxruntime as ort

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
        recorded = from_metadata(self.session.get_modelmeta().custom_metadata_map, source)
        wanted = "one float input of shape (N, C, H, W)" + ("" if recorded.serves is None else " and a float sigma of shape (1,)")
        if (len(inputs) != 1 + (recorded.serves is not None) or len(outputs) < 1 or inputs[0].type != "tensor(float)"
                or len(inputs[0].shape) != 4 or any(i.type != "tensor(float)" or i.shape != [1] for i in inputs[1:])):
            raise UserError(f"{source}: expected {wanted}, got {[(i.name, i.type, i.shape) for i in inputs]}")
        self.sigma = runtime_sigma(recorded, sigma, source)
        self.sigma_feed = {i.name: np.array([self.sigma], dtype=np.float32) for i in inputs[1:]}
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        batch, *dims = inputs[0].shape
        self.static_batch = batch if isinstance(batch, int) else None
        graph_shape = tuple(dims) if all(isinstance(d, int) for d in dims) else None
        if recorded.input_shape and graph_shape and recorded.input_shape != graph_shape:
            raise UserError(f"{source}: graph input {graph_shape} contradicts the recorded input shape {recorded.input_shape}")
        width = outputs[0].shape[-1] if len(outputs[0].shape) == 2 else None
        self.info = ModelInfo(self.sigma, recorded.num_classes or (width if isinstance(width, int) else None),
                              recorded.input_shape or graph_shape, recorded.dataset, recorded.serves)
        if self.device.type == "cuda" and self.info.num_classes is None:
            raise UserError(f"{source}: the output width (number of classes) must be static to run on CUDA")

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.contiguous()
        if self.device.type == "cpu":
            return torch.from_numpy(self.session.run([self.output_name], {self.input_name: batch.numpy(), **self.sigma_feed})[0])
        binding = self.session.io_binding()
        index = self.device.index or 0
        binding.bind_input(self.input_name, "cuda", index, np.float32, tuple(batch.shape), batch.data_ptr())
        for name, value in self.sigma_feed.items():
            binding.bind_cpu_input(name, value)
        logits = torch.empty((len(batch), self.info.num_classes), device=self.device)
        binding.bind_output(self.output_name, "cuda", index, np.float32, tuple(logits.shape), logits.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # the session reads the batch on its own stream
        self.session.run_with_iobinding(binding)
        return logits

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return run_in_chunks(self._run, batch, self.static_batch).float()


def compare_with_torch(model: bytes | str | Path, classifier: nn.Module, samples: int = 512, seed: int = 0) -> Agreement:
    """ONNX Runtime (CPU) against `classifier` on random noisy images x + sigma * z, x uniform in [0, 1]; a graph
    with a sigma input at each sigma that stands for those it serves (`agreement_at_each_sigma`)."""
    return agreement_at_each_sigma(classifier, lambda sigma: OnnxRuntimeBackend(model, "cpu", sigma=sigma), samples, seed)


def run_export(args: argparse.Namespace) -> int:
    """`rrcm export onnx` (its options: rrcm.export.commands)."""
    with OutputLock(check_writable(args.out)):
        classifier = load_for_export(args.model, args.sigma)
        data = export_onnx(classifier, opset=args.opset, static_batch=args.static_batch)
        check = compare_with_torch(data, classifier)
        if check.argmax_agreement < 0.99:
            raise UserError(f"ONNX Runtime disagrees with torch on {1 - check.argmax_agreement:.1%} of noisy inputs "
                            f"(max |logit diff| {check.max_logit_diff:.2e}); {args.out} not written")
        save_onnx(data, args.out)
    print(f"wrote {args.out} ({len(data) / 1e6:.1f} MB, opset {args.opset}, batch {args.static_batch or 'dynamic'}): "
          f"{exported_info(classifier).noise_levels()}, {classifier.num_classes} classes, input {tuple(classifier.input_shape)}; "
          f"checked on {check.samples} noisy inputs: max |logit diff| {check.max_logit_diff:.2e}, "
          f"argmax agreement {check.argmax_agreement:.2%}")
    return 0
