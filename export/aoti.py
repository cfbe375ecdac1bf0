"""AOTInductor packages (.pt2): a classifier for one sigma compiled ahead of time, run by the engine
(`AotiBackend`, `rrcm certify --model F.pt2`) and by C++ (`cpp/`, `torch::inductor::AOTIModelPackageLoader`).

The package maps model-space batches u = input_scale * x_noisy + input_shift (N, C, H, W) to logits
(N, num_classes), so the sampler writes u directly, as for the torch backend. The package metadata
(strings, `get_metadata()` in Python and C++) records under "rrcm.*" keys what a runtime needs:
sigma, num_classes, input_shape "C,H,W", dataset (the ONNX export's keys), input_scale, input_shift,
device, batch (0: any) and the rrcm and torch versions.
A classifier fine-tuned for several sigmas compiles, without --sigma, to a package with a second input,
sigma (float32, shape (1,)), that records the sigmas it serves ("sigmas" or "sigma_range") instead of
"sigma". Its first input is the pixel-space noisy batch (input_scale 1, input_shift 0): the scaling
depends on sigma and is computed inside, from the input, like the time token.
A package holds compiled native code: loading one runs it, so load only packages you trust.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from tqdm import tqdm

import rrcm
from rrcm.classifier import ModelInput, NoisyImageClassifier, SigmaInputClassifier, load_for_export
from rrcm.device import resolve_device
from rrcm.archive import check_zip
from rrcm.errors import UserError, first_line
from rrcm.export.runtime import (PREFIX, agreement_at_each_sigma, check_batch, exported_info, from_metadata, run_in_chunks,
                                 runtime_sigma, to_metadata)
from rrcm.outputs import OutputLock, check_writable, publish, write_error


def package_metadata(classifier: NoisyImageClassifier | SigmaInputClassifier, device: str, batch: int | None) -> dict[str, str]:
    info = exported_info(classifier)
    sigma_input = info.serves is not None  # pixel-space input
    extra = {
        # repr round-trips exactly, also through C++ std::stod
        "input_scale": repr(1.0 if sigma_input else float(classifier.input_scale)),
        "input_shift": repr(0.0 if sigma_input else float(classifier.input_shift)),
        "device": device,
        "batch": str(batch or 0),
        "version": rrcm.__version__,
        "torch_version": torch.__version__,
    }
    return {**to_metadata(info), **{PREFIX + k: v for k, v in extra.items()}}


def package_path(out: str | Path) -> Path:
    """`out` as the path of a package: it must end in .pt2."""
    if Path(out).suffix != ".pt2":
        raise UserError(f"{out}: an AOTInductor package must end in .pt2")
    return Path(out)


def export_aoti(classifier: NoisyImageClassifier | SigmaInputClassifier, out: str | Path, device: str | torch.device = "cpu",
                batch: int | None = None) -> Path:
    """Compile `classifier` with torch.export + AOTInductor into the package `out` (.pt2).

    `batch` None exports a dynamic batch dimension; an int fixes it. The package is written next to
    `out` and renamed into place, so `out` is never half-written.
    """
    out = package_path(out)
    device = resolve_device(device)
    if batch is not None:
        batch = check_batch("--batch", batch, tuple(classifier.input_shape), device)
    metadata = package_metadata(classifier, device.type, batch)
    sigma_input = isinstance(classifier, SigmaInputClassifier)
    module = (classifier if sigma_input else ModelInput(classifier)).to(device).eval()
    example = (torch.zeros((batch or 2, *classifier.input_shape), device=device),)
    if sigma_input:
        example += (torch.tensor(classifier.trained.representatives()[:1], dtype=torch.float32, device=device),)
    dynamic = None if batch else ({0: torch.export.Dim("batch", min=1)}, *([None] if sigma_input else []))
    partial = out.with_name(out.stem + ".partial.pt2")
    with OutputLock(check_writable(out)):
        try:
            with torch.no_grad():
                program = torch.export.export(module, example, dynamic_shapes=dynamic)
                torch._inductor.aoti_compile_and_package(
                    program, package_path=str(partial), inductor_configs={"aot_inductor.metadata": metadata})
        except BaseException as e:
            partial.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise write_error(out, e) from None
            raise
        publish(partial, out)
    return out


def load_package(path: Path, device: torch.device):
    """torch's AOTInductor loader for the package `path`, checked first with `check_zip` and for the layout
    `export_aoti` writes (a compiled library: a package without one would be compiled by commands it names).

    The loader unpacks the package into a folder it makes under TMPDIR and leaves it behind when the load
    fails; here TMPDIR is a private folder, removed after a failed load and when the returned runner's
    owner calls the returned cleanup (a `weakref.finalize`-able function).
    """
    entries = check_zip(path, "AOTInductor package")
    names = [e.filename for e in entries]
    prefixes = {name.split("/", 1)[0] for name in names}
    library = [n for n in names if n.split("/", 1)[-1].startswith("data/aotinductor/model/") and n.endswith(".so")]
    if len(names) < 2 or len(prefixes) != 1 or not library:
        raise UserError(f"{path}: cannot load AOTInductor package (not the layout 'rrcm export aoti' writes: "
                        "one folder holding a compiled model library)")
    private = Path(tempfile.mkdtemp(prefix="rrcm-aoti-"))
    cleanup = lambda: shutil.rmtree(private, ignore_errors=True)  # noqa: E731
    unpacked = sum(e.file_size for e in entries)
    if shutil.disk_usage(private).free < unpacked:
        cleanup()
        raise UserError(f"{path}: cannot load AOTInductor package: it unpacks to {unpacked / 2**20:,.0f} MiB, more "
                        f"than the free space in {private.parent}")
    previous = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(private)
    try:
        # The loader behind torch._inductor.aoti_load_package (and the C++ API). The Python wrapper
        # adds a device check that only warns, and costs child processes probing the CPU's
        # vector ISA: seconds per process, more on a busy machine.
        runner = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1,
                                                       -1 if device.index is None else device.index)
        metadata = runner.get_metadata()
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        cleanup()
        raise UserError(f"{path}: cannot load AOTInductor package ({first_line(e)}); it needs the torch version "
                        f"and device type it was compiled for") from None
    finally:
        if previous is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous
    return runner, metadata, cleanup


def row_major(t: torch.Tensor) -> torch.Tensor:
    """`t` with row-major strides. A compiled package reads its input with the strides it was exported
    with, unchecked; `is_contiguous()` also holds for other strides on size-1 dimensions (a one-channel
    batch in channels-last layout), which the package would misread."""
    strides, step = [], 1
    for size in reversed(t.shape):
        strides.append(step)
        step *= size
    return t if t.stride() == tuple(reversed(strides)) else t.clone(memory_format=torch.contiguous_format)


class AotiBackend:
    """An `rrcm export aoti` package, for the engine: `forward(u)` gives float32 logits of model-space
    inputs. A static-batch package gets any batch in chunks of its size, the last one padded.
    A package with a sigma input runs at `sigma`, which must be one it serves (`info.sigma` is then that
    sigma); for a package of one sigma, `sigma` may be given and must be its own.
    """

    name = "aoti"

    def __init__(self, model: str | Path, device: str | torch.device = "cpu", *, sigma: float | None = None):
        if not isinstance(model, (str, Path)):
            raise UserError("the aoti backend runs a .pt2 package file written by 'rrcm export aoti'")
        path = Path(model)
        if not path.is_file():
            raise UserError(f"{path}: no such AOTInductor package")
        device = resolve_device(device)
        self.runner, metadata, cleanup = load_package(path, device)
        weakref.finalize(self, cleanup)
        recorded = from_metadata(metadata, str(path))
        values = {k.removeprefix(PREFIX): v for k, v in metadata.items() if k.startswith(PREFIX)}
        if recorded.sigma is None and recorded.serves is None:
            raise UserError(f"{path}: not an rrcm package (no rrcm metadata); export it with 'rrcm export aoti'")
        self.info = dataclasses.replace(recorded, sigma=runtime_sigma(recorded, sigma, str(path)))
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
        self.sigma_input = [] if recorded.serves is None else [torch.tensor([self.info.sigma], device=device)]

    def _run(self, u: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.runner.run([u, *self.sigma_input])[0]

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if tuple(batch.shape[1:]) != self.info.input_shape:
            raise UserError(f"{self.path}: input of shape {tuple(batch.shape)} does not fit the package's {self.info.input_shape}")
        return run_in_chunks(self._run, row_major(batch.to(self.device, torch.float32)), self.static_batch, pad=True).float()


def run_export(args: argparse.Namespace) -> int:
    """`rrcm export aoti` (its options: rrcm.export.commands)."""
    device = resolve_device(args.device)  # before anything is loaded
    out = check_writable(package_path(args.out))
    # Compiled and checked under another name: `out` changes only to a package that passed the check.
    staged = out.with_name(out.stem + ".check.pt2")
    with OutputLock(out), tqdm(total=3, desc="export aoti", unit="step") as progress:
        classifier = load_for_export(args.model, args.sigma, device=device)
        progress.update()
        progress.set_postfix_str("torch.export + AOTInductor compile")
        export_aoti(classifier, staged, device, args.batch)
        progress.update()
        progress.set_postfix_str("checking against torch")
        try:
            check = agreement_at_each_sigma(classifier, lambda sigma: AotiBackend(staged, device, sigma=sigma))
            if check.argmax_agreement < 0.99:
                raise UserError(f"the compiled package disagrees with torch on {1 - check.argmax_agreement:.1%} of "
                                f"noisy inputs (max |logit diff| {check.max_logit_diff:.2e}); {out} not written")
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        publish(staged, out)
        progress.update()
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {args.device}, batch {args.batch or 'any'}): "
          f"{exported_info(classifier).noise_levels()}, {classifier.num_classes} classes, input {tuple(classifier.input_shape)}; "
          f"checked on {check.samples} noisy inputs: max |logit diff| {check.max_logit_diff:.2e}, "
          f"argmax agreement {check.argmax_agreement:.2%}")
    return 0
