"""AOTInductor packages (.pt2): a classifier for one sigma compiled ahead of time, run by the engine
(`AotiBackend`, `rrcm certify --model F.pt2`) and by C++ (`cpp/`, `torch::inductor::AOTIModelPackageLoader`).

The package maps model-space batches u = input_scale * x_noisy + input_shift (N, C, H, W) to logits
(N, num_classes), so the sampler writes u directly, as for the torch backend. The package metadata
(strings, `get_metadata()` in Python and C++) records under "rrcm.*" keys what a runtime needs:
sigma, num_classes, input_shape "C,H,W", dataset (the ONNX export's keys), input_scale, input_shift,
device, batch (0: any) and the rrcm and torch versions.
A package holds compiled native code: loading one runs it, so load only packages you trust.
"""
from __future__ import annotations

import argparse
import os
import zipfile
from pathlib import Path

import torch
from tqdm import tqdm

import rrcm
from rrcm.classifier import ModelInput, NoisyImageClassifier, load_classifier
from rrcm.device import resolve_device
from rrcm.engine.backends import ModelInfo
from rrcm.errors import UserError, first_line
from rrcm.export.onnx import PREFIX, backend_agreement, from_metadata, to_metadata
from rrcm.export.commands import add_model_arguments


def package_metadata(classifier: NoisyImageClassifier, device: str, batch: int | None) -> dict[str, str]:
    info = ModelInfo(classifier.sigma, classifier.num_classes, tuple(classifier.input_shape), classifier.cfg.dataset)
    extra = {
        "input_scale": repr(float(classifier.input_scale)),  # repr round-trips exactly, also through C++ std::stod
        "input_shift": repr(float(classifier.input_shift)),
        "device": device,
        "batch": str(batch or 0),
        "version": rrcm.__version__,
        "torch_version": torch.__version__,
    }
    return {**to_metadata(info), **{PREFIX + k: v for k, v in extra.items()}}


def export_aoti(classifier: NoisyImageClassifier, out: str | Path, device: str | torch.device = "cpu",
                batch: int | None = None) -> Path:
    """Compile `classifier` with torch.export + AOTInductor into the package `out` (.pt2).

    `batch` None exports a dynamic batch dimension; an int fixes it. The package is written next to
    `out` and renamed into place, so `out` is never half-written.
    """
    out = Path(out)
    if out.suffix != ".pt2":
        raise UserError(f"{out}: an AOTInductor package must end in .pt2")
    if batch is not None and batch < 1:
        raise UserError(f"--batch must be >= 1, got {batch}")
    device = resolve_device(device)
    metadata = package_metadata(classifier, device.type, batch)
    module = ModelInput(classifier).to(device).eval()
    example = torch.zeros((batch or 2, *classifier.input_shape), device=device)
    dynamic = None if batch else ({0: torch.export.Dim("batch", min=1)},)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.stem + ".partial.pt2")
    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes=dynamic)
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(partial), inductor_configs={"aot_inductor.metadata": metadata})
    os.replace(partial, out)
    return out


def row_major(t: torch.Tensor) -> torch.Tensor:
    """`t` with row-major strides. A compiled package reads its input with the strides it was exported
    with, unchecked; `is_contiguous()` also holds for other strides on size-1 dimensions (a one-channel
    batch in channels-last layout), which the package would misread."""
    strides, step = [], 1
    for size in reversed(t.shape):
        strides.append(step)
        step *= size
    return t if t.stride() == tuple(reversed(strides)) else t.clone(memory_format=torch.contiguous_format)


def run_in_chunks(run, batch: torch.Tensor, size: int | None, pad: bool) -> torch.Tensor:
    """run(chunk) over chunks of at most `size` rows (one call when size is None); with `pad`, a short
    last chunk is zero-padded to `size` rows (for static-batch runtimes) and the padding's rows dropped."""
    if size is None or len(batch) == size:
        return run(batch)
    chunks = []
    for chunk in batch.split(size):
        rows = len(chunk)
        if pad and rows < size:
            chunk = torch.cat([chunk, chunk.new_zeros((size - rows, *chunk.shape[1:]))])
        chunks.append(run(chunk)[:rows])
    return torch.cat(chunks)


class AotiBackend:
    """An `rrcm export aoti` package, for the engine: `forward(u)` gives float32 logits of model-space
    inputs. A static-batch package gets any batch in chunks of its size, the last one padded.
    """

    name = "aoti"

    def __init__(self, model: str | Path, device: str | torch.device = "cpu"):
        if not isinstance(model, (str, Path)):
            raise UserError("the aoti backend runs a .pt2 package file written by 'rrcm export aoti'")
        path = Path(model)
        if not path.is_file():
            raise UserError(f"{path}: no such AOTInductor package")
        if not zipfile.is_zipfile(path):
            raise UserError(f"{path}: corrupt AOTInductor package (not a zip archive)")
        device = resolve_device(device)
        try:
            # The loader behind torch._inductor.aoti_load_package (and the C++ API). The Python wrapper
            # adds a device check that only warns, and costs child processes probing the CPU's
            # vector ISA: seconds per process, more on a busy machine.
            self.runner = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1,
                                                                -1 if device.index is None else device.index)
            metadata = self.runner.get_metadata()
        except (RuntimeError, OSError, ValueError, KeyError) as e:
            raise UserError(f"{path}: cannot load AOTInductor package ({first_line(e)}); it needs the torch version "
                            f"and device type it was compiled for") from None
        self.info = from_metadata(metadata, str(path))
        values = {k.removeprefix(PREFIX): v for k, v in metadata.items() if k.startswith(PREFIX)}
        if self.info.sigma is None:
            raise UserError(f"{path}: not an rrcm package (no rrcm metadata); export it with 'rrcm export aoti'")
        try:
            self.input_scale, self.input_shift = float(values["input_scale"]), float(values["input_shift"])
            self.static_batch = int(values["batch"]) or None
            compiled_for = values["device"]
        except (KeyError, ValueError) as e:
            raise UserError(f"{path}: corrupt rrcm metadata ({type(e).__name__}: {e})") from None
        if compiled_for != device.type:
            raise UserError(f"{path}: compiled for {compiled_for}, not {device.type}; run it with --device {compiled_for} "
                            f"or export it again with --device {device.type}")
        self.device = device
        self.input_dtype = torch.float32
        self.path = path

    def _run(self, u: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.runner.run([u])[0]

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if tuple(batch.shape[1:]) != self.info.input_shape:
            raise UserError(f"{self.path}: input of shape {tuple(batch.shape)} does not fit the package's {self.info.input_shape}")
        return run_in_chunks(self._run, row_major(batch.to(self.device, torch.float32)), self.static_batch, pad=True).float()


class _ExportAoti:
    help = "compile a classifier for one sigma into an AOTInductor package (.pt2) for Python or C++"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        add_model_arguments(p)
        p.add_argument("--out", required=True, help="package file to write, ending in .pt2")
        p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                       help="device the package runs on; compiled code is device-specific (default cpu)")
        p.add_argument("--batch", type=int, default=None, metavar="B",
                       help="fix the batch size to B (default: any batch size)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        device = resolve_device(args.device)  # before anything is loaded
        with tqdm(total=3, desc="export aoti", unit="step") as progress:
            classifier = load_classifier(args.model, args.sigma, device=device)
            progress.update()
            progress.set_postfix_str("torch.export + AOTInductor compile")
            out = export_aoti(classifier, args.out, device, args.batch)
            progress.update()
            progress.set_postfix_str("checking against torch")
            check = backend_agreement(classifier, AotiBackend(out, device))
            progress.update()
        if check.argmax_agreement < 0.99:
            out.unlink()
            raise UserError(f"the compiled package disagrees with torch on {1 - check.argmax_agreement:.1%} of noisy inputs "
                            f"(max |logit diff| {check.max_logit_diff:.2e}); removed {out}")
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {args.device}, batch {args.batch or 'any'}): "
              f"sigma {classifier.sigma:g}, {classifier.num_classes} classes, input {tuple(classifier.input_shape)}; "
              f"checked on {check.samples} noisy inputs: max |logit diff| {check.max_logit_diff:.2e}, "
              f"argmax agreement {check.argmax_agreement:.2%}")
        return 0


AOTI_COMMAND = _ExportAoti()
