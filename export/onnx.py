"""ONNX export of a classifier for one sigma: pixel-space noisy images (N, C, H, W) in, logits out.

The graph is the classifier's `forward` (normalization and c_in folded in), so any ONNX runtime can
certify from pixel-space noise. It uses the TorchScript exporter (`dynamo=False`): on torch 2.11 to 2.13
it is the fast, stable path and emits only plain opset-17 operators (Conv, Gemm/MatMul, LayerNormalization,
Softmax, Erf, shape ops) that ONNX Runtime and TensorRT parse. What a runtime needs to know is recorded
in the model's metadata_props under "rrcm.*" keys.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rrcm.classifier import load_classifier
from rrcm.engine.backends import ModelInfo
from rrcm.errors import UserError, first_line
from rrcm.export.commands import add_model_arguments

PREFIX = "rrcm."
INPUT, OUTPUT = "x", "logits"


def to_metadata(info: ModelInfo) -> dict[str, str]:
    values = {
        "sigma": repr(float(info.sigma)),
        "num_classes": str(info.num_classes),
        "input_shape": ",".join(map(str, info.input_shape)),
        "dataset": info.dataset or "",
    }
    return {PREFIX + k: v for k, v in values.items()}


def from_metadata(metadata: dict[str, str], source: str) -> ModelInfo:
    """The ModelInfo recorded by `export_onnx`; all fields None for an ONNX file of other origin."""
    values = {k.removeprefix(PREFIX): v for k, v in metadata.items() if k.startswith(PREFIX)}
    if not values:
        return ModelInfo()
    try:
        info = ModelInfo(float(values["sigma"]), int(values["num_classes"]),
                         tuple(int(d) for d in values["input_shape"].split(",")), values["dataset"] or None)
    except (KeyError, ValueError) as e:
        raise UserError(f"{source}: corrupt rrcm metadata ({type(e).__name__}: {e})") from None
    if not (info.sigma > 0 and math.isfinite(info.sigma)) or info.num_classes < 2 or len(info.input_shape) != 3:
        raise UserError(f"{source}: corrupt rrcm metadata (impossible sigma, classes or input shape)")
    return info


def export_onnx(classifier: nn.Module, *, opset: int = 17, static_batch: int | None = None) -> bytes:
    """The serialized ONNX model of `classifier` (a NoisyImageClassifier, or any module with its `sigma`,
    `num_classes` and `input_shape` attributes), passed through `onnx.checker` with full shape inference.

    The batch dimension is dynamic unless `static_batch` fixes it.
    """
    import onnx

    if static_batch is not None and static_batch < 1:
        raise UserError(f"--static-batch must be >= 1, got {static_batch}")
    if opset < 17:
        raise UserError(f"opset must be >= 17 (LayerNormalization), got {opset}")
    info = ModelInfo(classifier.sigma, classifier.num_classes, tuple(classifier.input_shape),
                     getattr(getattr(classifier, "cfg", None), "dataset", None))
    device = next(classifier.parameters()).device
    example = torch.rand((static_batch or 2, *info.input_shape), device=device)
    dynamic = None if static_batch else {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter announces its successor
        try:
            torch.onnx.export(classifier.eval(), (example,), buffer, input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes=dynamic, opset_version=opset, dynamo=False)
        except (torch.onnx.errors.OnnxExporterError, ValueError, RuntimeError) as e:
            raise UserError(f"ONNX export failed at opset {opset}: {first_line(e)}") from None
    model = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(model, to_metadata(info))
    model.doc_string = f"rrcm classifier for sigma {info.sigma:g}: pixel-space noisy images in [0, 1] -> logits"
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def save_onnx(data: bytes, out: str | Path) -> None:
    """Write a serialized model to `out` through a temporary file, so `out` is never half-written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)


@dataclass(frozen=True)
class Agreement:
    max_logit_diff: float
    argmax_agreement: float  # fraction of inputs with the same top class
    samples: int


def backend_agreement(classifier: nn.Module, backend, samples: int = 256, seed: int = 0) -> Agreement:
    """An engine backend against `classifier` on random noisy images x + sigma * z, x uniform in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((samples, *classifier.input_shape), generator=g)
    x = x + classifier.sigma * torch.randn(x.shape, generator=g)
    with torch.no_grad():
        expected = classifier(x.to(next(classifier.parameters()).device)).float().to(backend.device)
    got = backend.forward((x * backend.input_scale + backend.input_shift).to(backend.device))
    return Agreement(float((got - expected).abs().max()), float((got.argmax(1) == expected.argmax(1)).double().mean()), samples)


def compare_with_torch(model: bytes | str | Path, classifier: nn.Module, samples: int = 512, seed: int = 0) -> Agreement:
    """ONNX Runtime (CPU) against `classifier` on random noisy images x + sigma * z, x uniform in [0, 1]."""
    from rrcm.engine.backends import OnnxRuntimeBackend

    return backend_agreement(classifier, OnnxRuntimeBackend(model, "cpu"), samples, seed)


class _ExportOnnx:
    help = "export a classifier for one sigma to ONNX (pixel-space input, dynamic batch), checked against torch"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        add_model_arguments(p)
        p.add_argument("--out", required=True, help="ONNX file to write (e.g. model.onnx)")
        p.add_argument("--opset", type=int, default=17, help="ONNX opset version, >= 17 (default 17)")
        p.add_argument("--static-batch", type=int, default=None, metavar="B",
                       help="fix the batch dimension to B (default: dynamic batch)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        classifier = load_classifier(args.model, args.sigma)
        data = export_onnx(classifier, opset=args.opset, static_batch=args.static_batch)
        check = compare_with_torch(data, classifier)
        if check.argmax_agreement < 0.99:
            raise UserError(f"ONNX Runtime disagrees with torch on {1 - check.argmax_agreement:.1%} of noisy inputs "
                            f"(max |logit diff| {check.max_logit_diff:.2e}); {args.out} not written")
        save_onnx(data, args.out)
        print(f"wrote {args.out} ({len(data) / 1e6:.1f} MB, opset {args.opset}, batch {args.static_batch or 'dynamic'}): "
              f"sigma {classifier.sigma:g}, {classifier.num_classes} classes, input {tuple(classifier.input_shape)}; "
              f"checked on {check.samples} noisy inputs: max |logit diff| {check.max_logit_diff:.2e}, "
              f"argmax agreement {check.argmax_agreement:.2%}")
        return 0


ONNX_COMMAND = _ExportOnnx()
