"""TensorRT plans (.plan): a classifier for one sigma built by TensorRT from the ONNX export.

A plan runs only on the GPU model and TensorRT version it was built with, and carries no metadata
of ours, so `F.plan.json` next to it records what a runtime needs (sigma, classes, input shape,
dataset, batch) plus the GPU and TensorRT version, checked when the plan is loaded. Like the ONNX
export, a plan takes pixel-space noisy images.
Precision is part of the graph (strongly typed networks; TensorRT 11 has no FP16/BF16 builder
flags): --fp16 / --bf16 export the network in that dtype with float32 inputs and logits.
Not run in this project's workplace (no TensorRT there); tested where `tensorrt` is importable.
"""
from __future__ import annotations

import argparse
import copy
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import rrcm
from rrcm.classifier import NoisyImageClassifier, load_classifier
from rrcm.device import resolve_device
from rrcm.errors import UserError
from rrcm.export.runtime import ModelInfo, backend_agreement, check_batch, run_in_chunks, runtime_sigma
from rrcm.outputs import OutputLock, atomic_write, check_writable, make_folder

INSTALL_HINT = ("TensorRT is not installed: 'pip install tensorrt' on a machine with an NVIDIA GPU and CUDA, "
                "or NVIDIA's packages (https://docs.nvidia.com/deeplearning/tensorrt/latest/installing-tensorrt/installing.html)")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def import_tensorrt():
    """The `tensorrt` module, or a UserError saying how to install it."""
    try:
        import tensorrt
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return tensorrt


def _gpu(device: torch.device) -> tuple[str, str]:
    if not torch.cuda.is_available():
        raise UserError("TensorRT needs a CUDA GPU and a torch build with CUDA")
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


@dataclass(frozen=True)
class PlanInfo:
    """The sidecar F.plan.json. `batch` is the largest batch (or the only one when `static`)."""

    sigma: float
    num_classes: int
    input_shape: tuple[int, int, int]
    dataset: str
    precision: str
    batch: int
    static: bool
    gpu: str
    compute_capability: str
    tensorrt_version: str
    version: str = rrcm.__version__

    @staticmethod
    def sidecar(plan: Path) -> Path:
        return plan.with_name(plan.name + ".json")

    def write(self, plan: Path) -> None:
        atomic_write(self.sidecar(plan), json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, plan: Path) -> "PlanInfo":
        path = cls.sidecar(plan)
        if not path.is_file():
            raise UserError(f"{plan}: no {path.name} next to it; build plans with 'rrcm export tensorrt'")
        try:
            d = json.loads(path.read_text())
            d["input_shape"] = tuple(d["input_shape"])
            return cls(**d)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, OSError) as e:
            raise UserError(f"{path}: corrupt plan metadata ({type(e).__name__})") from None


def onnx_for_tensorrt(classifier: NoisyImageClassifier, precision: str = "fp32", batch: int | None = None) -> bytes:
    """The ONNX export (pixel-space input) computed in `precision`: opset 17, or 22 for bf16 (the first
    opset whose Conv takes bfloat16). `batch` fixes the batch dimension."""
    from rrcm.export.onnx import export_onnx

    dtype = PRECISIONS[precision]
    model = classifier if dtype == torch.float32 else TypedClassifier(classifier, dtype)
    with warnings.catch_warnings():
        # The TorchScript exporter knows opsets up to 20; opsets 21 and 22 only widen operators' types
        # (22 adds bfloat16), so its opset-20 operators stamped 22 are valid, and onnx.checker agrees.
        warnings.filterwarnings("ignore", message="Exporting to ONNX opset version 22")
        return export_onnx(model, opset=22 if precision == "bf16" else 17, static_batch=batch)


def build_plan(onnx_model: bytes, input_shape: tuple[int, int, int], batch: int, static: bool) -> bytes:
    """A serialized TensorRT engine of `onnx_model` for batches up to `batch` (exactly `batch` if static)."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Precision comes from the graph's types: required on TensorRT 11, opt-in on 10.x.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_model):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse the ONNX export: {errors.splitlines()[0] if errors else 'unknown error'}")
    config = builder.create_builder_config()
    if not static:
        profile = builder.create_optimization_profile()
        profile.set_shape(network.get_input(0).name, (1, *input_shape), (batch, *input_shape), (batch, *input_shape))
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError("TensorRT failed to build an engine from the ONNX export (see its log above)")
    return bytes(plan)


class TypedClassifier(nn.Module):
    """A classifier computing in `dtype` with float32 pixel-space inputs and logits, for the ONNX export."""

    def __init__(self, classifier: NoisyImageClassifier, dtype: torch.dtype):
        super().__init__()
        self.classifier = copy.deepcopy(classifier).to(dtype)
        self.dtype = dtype
        self.sigma, self.num_classes, self.input_shape, self.cfg = (
            classifier.sigma, classifier.num_classes, classifier.input_shape, classifier.cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x.to(self.dtype)).float()


class TensorRTBackend:
    """A plan written by `rrcm export tensorrt`, for the engine: `forward(x)` gives float32 logits of
    pixel-space noisy images on the plan's GPU, in chunks of at most the plan's batch (static plans: padded).
    Plans are for one sigma (a classifier of several is exported with --sigma); a given `sigma` must be the plan's.
    """

    name = "tensorrt"

    def __init__(self, model: str | Path, device: str | torch.device = "cuda", *, sigma: float | None = None):
        trt = import_tensorrt()
        if not isinstance(model, (str, Path)):
            raise UserError("the tensorrt backend runs a .plan file written by 'rrcm export tensorrt'")
        path = Path(model)
        if not path.is_file():
            raise UserError(f"{path}: no such TensorRT plan")
        device = resolve_device(device)
        if device.type != "cuda":
            raise UserError(f"TensorRT plans run on a CUDA device, not {device}")
        plan = PlanInfo.read(path)
        runtime_sigma(ModelInfo(plan.sigma), sigma, str(path))
        gpu, capability = _gpu(device)
        if capability != plan.compute_capability:
            raise UserError(f"{path}: built for {plan.gpu} (compute capability {plan.compute_capability}), this GPU is "
                            f"{gpu} ({capability}); build the plan again on this GPU")
        if plan.tensorrt_version != trt.__version__:
            raise UserError(f"{path}: built with TensorRT {plan.tensorrt_version}, this is {trt.__version__}; build it again")
        # The logger and runtime must outlive the engine.
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(device):
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise UserError(f"{path}: TensorRT cannot load this plan (corrupt, or built for another GPU or version)")
            self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        modes = {n: engine.get_tensor_mode(n) for n in names}
        self.input_name = next(n for n in names if modes[n] == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if modes[n] == trt.TensorIOMode.OUTPUT)
        self.engine, self.plan, self.path, self.device = engine, plan, path, device
        self.info = ModelInfo(plan.sigma, plan.num_classes, plan.input_shape, plan.dataset)
        self.input_scale, self.input_shift, self.input_dtype = 1.0, 0.0, torch.float32

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.empty((len(x), self.plan.num_classes), device=self.device)
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, logits.data_ptr())
        # On torch's current stream, so the plan is ordered after the sampler and before the counting.
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"{self.path}: TensorRT execution failed")
        return logits

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if tuple(batch.shape[1:]) != self.plan.input_shape:
            raise UserError(f"{self.path}: input of shape {tuple(batch.shape)} does not fit the plan's {self.plan.input_shape}")
        return run_in_chunks(self._run, batch.to(self.device, torch.float32).contiguous(), self.plan.batch, self.plan.static)


def run_export(args: argparse.Namespace) -> int:
    """`rrcm export tensorrt` (its options: rrcm.export.commands)."""
    trt = import_tensorrt()
    out = Path(args.out)
    if out.suffix != ".plan":
        raise UserError(f"{out}: a TensorRT plan must end in .plan")
    device = resolve_device(args.device)
    gpu, capability = _gpu(device)
    with OutputLock(check_writable(out)), tqdm(total=3, desc="export tensorrt", unit="step") as progress:
        classifier = load_classifier(args.model, args.sigma, device=device)
        shape = tuple(classifier.input_shape)
        static = args.batch is not None
        batch = check_batch("--batch" if static else "--max-batch", args.batch if static else args.max_batch,
                            shape, device)
        onnx_model = onnx_for_tensorrt(classifier, args.precision, args.batch)
        progress.update()
        progress.set_postfix_str("building the TensorRT engine")
        with torch.cuda.device(device):
            plan = build_plan(onnx_model, shape, batch, static)
        info = PlanInfo(classifier.sigma, classifier.num_classes, shape, classifier.cfg.dataset,
                        args.precision, batch, static, gpu, capability, trt.__version__)
        make_folder(out.parent)
        info.write(out)
        atomic_write(out, plan)
        progress.update()
        progress.set_postfix_str("checking against torch")
        check = backend_agreement(classifier, TensorRTBackend(out, device))
        progress.update()
    print(f"wrote {out} ({len(plan) / 1e6:.1f} MB, {args.precision}, batch {batch}{'' if args.batch else ' max'}, "
          f"{gpu}, TensorRT {trt.__version__}): sigma {classifier.sigma:g}, {classifier.num_classes} classes; checked on "
          f"{check.samples} noisy inputs: max |logit diff| {check.max_logit_diff:.2e}, argmax agreement {check.argmax_agreement:.2%}")
    return 0
