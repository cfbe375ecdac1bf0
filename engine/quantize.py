"""Static int8 quantization of a classifier for x86 CPUs: PT2E with torchao's X86InductorQuantizer,
compiled by Inductor with frozen weights, so matrix products run in oneDNN's int8 kernels (VNNI where the
CPU has it).

Activations are unsigned 8-bit where the CPU has VNNI (AVX512-VNNI, AVX-VNNI or AMX) and 7-bit elsewhere:
without VNNI, oneDNN multiplies u8 x s8 with vpmaddubsw, which adds two products into a saturating int16
(255 * 127 * 2 > 32767), so large activations clip. That cost the bundled sigma-0.25 classifier 6 points of
agreement with fp32 (94%) on an AVX2-only CPU; with 7-bit activations (127 * 128 * 2 < 32768) nothing
saturates and it agrees as well as with VNNI (99.3%).

Static: activation scales are fixed by calibration, so a sample's logits depend on that sample alone and
the Monte-Carlo samples of a certificate stay independent; dynamic quantization would scale every
activation by its whole batch. The certificate is for the quantized classifier;
`rrcm.export.runtime.backend_agreement` measures how often it agrees with the float one.
"""
from __future__ import annotations

import logging
import warnings
from typing import Callable

import torch
from torch import nn
from torch._inductor import config as inductor

from rrcm.cpu import CpuInfo, cpu_info
from rrcm.errors import UserError, first_line

CALIBRATION_IMAGES = 512


def activation_bits(cpu: CpuInfo | None = None) -> int:
    """Bits of the quantized activations on `cpu` (default this one): 8 with VNNI, 7 without (see above)."""
    return 8 if (cpu or cpu_info()).vnni else 7


def noisy_calibration(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """Pixel-space calibration inputs: `images` (k, C, H, W) in [0, 1] plus Gaussian noise of std `sigma`."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.as_tensor(images, dtype=torch.float32)
    return images + sigma * torch.randn(images.shape, generator=generator)


def dataset_calibration(dataset, sigma: float, count: int = CALIBRATION_IMAGES, seed: int = 0) -> torch.Tensor:
    """`noisy_calibration` of `count` images of `dataset` (an `rrcm.data.ImageDataset`) drawn at random."""
    picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    return noisy_calibration(torch.stack([dataset[int(i)][0] for i in picks]), sigma, seed)


def _torchao_pt2e():
    # torchao warns about each CUDA extension a CPU build cannot load, torch about torchao's pytree types
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError:
        raise UserError("int8 needs torchao: pip install 'rrcm[int8]'") from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return x86, prepare_pt2e, convert_pt2e


def quantize_int8(module: nn.Module, calibration: torch.Tensor, batch: int,
                  bits: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """`module` (model inputs -> logits) quantized to int8 on `calibration` model inputs (k, C, H, W) and
    compiled for batches of exactly `batch` rows, to be called under `torch.no_grad()`. `bits`: of the
    activations, 8 or 7 (default: `activation_bits()` of this CPU)."""
    bits = activation_bits() if bits is None else bits
    if bits not in (7, 8):
        raise UserError(f"int8 activations have 7 or 8 bits, got {bits!r}")
    x86, prepare_pt2e, convert_pt2e = _torchao_pt2e()
    if calibration.dim() != 4 or len(calibration) == 0 or not torch.isfinite(calibration).all():
        raise UserError(f"int8 calibration must be finite images (k, C, H, W), got shape {tuple(calibration.shape)}")
    # Calibration in chunks of exactly `batch` rows (the exported graph's batch), wrapping around.
    chunks = calibration[torch.arange(-(-len(calibration) // batch) * batch) % len(calibration)].split(batch)
    config = x86.get_default_x86_inductor_quantization_config(reduce_range=bits == 7)
    quantizer = x86.X86InductorQuantizer().set_global(config)
    try:
        with torch.no_grad():
            graph = torch.export.export(module.eval(), (chunks[0],)).module()
            prepared = prepare_pt2e(graph, quantizer)
            for chunk in chunks:
                prepared(chunk)
            quantized = torch.compile(convert_pt2e(prepared), dynamic=False)
            with inductor.patch(freezing=True), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Inductor's own deprecation notices while it lowers int8 ops
                quantized(chunks[0])  # compile now, once
    except Exception as e:  # export and Inductor raise many types for a model or inputs they cannot take
        shape = tuple(calibration.shape[1:])
        raise UserError(f"int8 quantization failed on calibration inputs of shape {shape}: {first_line(e)}") from None
    return quantized
