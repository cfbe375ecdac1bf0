"""The CUDA path of `rrcm.kernels.noisy_inputs`: one Triton launch writes a whole noisy batch.

Each output element is scale * (x + sigma * z) + shift cast to the model's dtype, with z drawn in the
kernel from Philox: output element e of a call uses draw `offset + e` of the seed's stream
(`rrcm.kernels.philox.philox_normal` is the same stream in torch). Advancing `offset` by the number of
elements after each call therefore never reuses a draw. Rows may come from many images: row r copies
image `image_of_row[r]`. With TRITON_INTERPRET=1 (set before this module is imported) it runs on CPU
tensors through Triton's interpreter.
"""
from __future__ import annotations

import math
from numbers import Integral

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from rrcm.errors import UserError
from rrcm.kernels.sampling import repeat_counts

INTERPRETED = isinstance(tl.randn4x, InterpretedFunction)  # TRITON_INTERPRET=1 was set before triton's import
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Draws per program are 4 * QBLOCK. The interpreter pays per program, not per element: give it long rows.
MAX_QBLOCK = 4096 if INTERPRETED else 512


@triton.jit(do_not_specialize=["offset", "seed"])
def _noisy_inputs_kernel(
    out_ptr, images_ptr, image_of_row_ptr, offset, seed, num_images, chw, sigma, scale, shift,
    OFFSET_IN_MEMORY: tl.constexpr, QBLOCK: tl.constexpr,
):
    # Program (row, chunk) covers 4 * QBLOCK consecutive draws starting at a multiple of 4, so that one
    # randn4x call yields all of them; the first and last chunk of a row mask what is not theirs.
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    if OFFSET_IN_MEMORY:
        base = tl.load(offset)
    else:
        base = offset.to(tl.int64)
    row_start = base + row * chw
    first_counter = row_start // 4 + chunk * QBLOCK
    z0, z1, z2, z3 = tl.randn4x(seed, first_counter + tl.arange(0, QBLOCK).to(tl.int64))
    z = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [4 * QBLOCK])  # draw 4c + j is lane j
    pos = (first_counter * 4 - row_start).to(tl.int32) + tl.arange(0, 4 * QBLOCK)
    in_row = (pos >= 0) & (pos < chw)
    image = tl.load(image_of_row_ptr + row).to(tl.int64)
    valid = (image >= 0) & (image < num_images)
    x = tl.load(images_ptr + tl.where(valid, image, 0) * chw + pos, mask=in_row).to(tl.float32)
    y = tl.where(valid, (x + sigma * z) * scale + shift, float("nan"))
    tl.store(out_ptr + row * chw + pos, y.to(out_ptr.dtype.element_ty), mask=in_row)


def check_triton_device(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cuda" and not (INTERPRETED and t.device.type == "cpu"):
        raise UserError(f"{what} is on {t.device}; Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")


def check_number(name: str, value: float, minimum: float | None = None) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value)) or (minimum is not None and value < minimum):
        raise UserError(f"{name} must be a finite number{'' if minimum is None else f' >= {minimum}'}, got {value!r}")
    return float(value)


def check_launch(
    out: torch.Tensor, images: torch.Tensor, image_of_row: torch.Tensor, seed: int, offset: int | torch.Tensor
) -> tuple[int, int | torch.Tensor]:
    """Validate the arguments a (seed, offset) sampler launch shares; returns (seed, offset) as int / tensor."""
    if out.dtype not in OUT_DTYPES or out.shape[1:] != images.shape[1:] or not out.is_contiguous():
        raise UserError(f"out must be a contiguous (R, {', '.join(map(str, images.shape[1:]))}) tensor of {OUT_DTYPES}")
    if image_of_row.shape != out.shape[:1] or image_of_row.is_floating_point() or image_of_row.is_complex():
        raise UserError(f"image_of_row must be an integer tensor of shape ({out.shape[0]},)")
    for t, what in ((out, "out"), (images, "images"), (image_of_row, "image_of_row")):
        check_triton_device(t, what)
        if t.device != out.device:
            raise UserError(f"{what} is on {t.device}, out on {out.device}")
    if not isinstance(seed, Integral) or not 0 <= seed < 2**63:
        raise UserError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    in_memory = isinstance(offset, torch.Tensor)
    if in_memory:
        if offset.numel() != 1 or offset.dtype != torch.int64 or offset.device != out.device:
            raise UserError(f"an offset tensor must hold one int64 on {out.device}")
    elif not isinstance(offset, Integral) or not 0 <= offset < 2**62:
        raise UserError(f"offset must be an integer in [0, 2**62), got {offset!r}")
    return int(seed), offset if in_memory else int(offset)


def launch_grid(rows: int, chw: int, offset: int | torch.Tensor, draws_per_counter: int) -> tuple[int, tuple[int, int]]:
    """(QBLOCK, grid) for a kernel whose program (row, chunk) takes draws_per_counter * QBLOCK consecutive
    draws starting at a multiple of draws_per_counter (one Philox counter gives that many draws)."""
    if chw >= 2**31 - draws_per_counter:
        raise UserError(f"an image of {chw} elements is too large for the sampler")
    qblock = min(MAX_QBLOCK, max(16, triton.next_power_of_2(-(-chw // draws_per_counter))))
    # Unless the offset is known and rows start on a counter boundary, a row's draws may straddle one more chunk.
    aligned = not isinstance(offset, torch.Tensor) and offset % draws_per_counter == 0 and chw % draws_per_counter == 0
    return qblock, (rows, triton.cdiv(chw + (0 if aligned else draws_per_counter - 1), draws_per_counter * qblock))


def write_noisy_inputs(
    out: torch.Tensor,
    images: torch.Tensor,
    image_of_row: torch.Tensor,
    sigma: float,
    seed: int,
    offset: int | torch.Tensor,
    scale: float = 1.0,
    shift: float = 0.0,
) -> torch.Tensor:
    """Fill out (R, C, H, W) with scale * (images[image_of_row[r]] + sigma * z) + shift; one launch, no host sync.

    images: (k, C, H, W) floating; image_of_row: (R,) integer, on the same device. Rows naming no
    image in [0, k) are filled with NaN. `offset` is an int, or a one-element int64 tensor on the
    device: then the kernel reads it and it is advanced in place by out.numel() afterwards, so the
    call can be captured in a CUDA graph whose replays never reuse a draw.
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise UserError(f"images must be a floating (k, C, H, W) tensor, got {tuple(images.shape)} {images.dtype}")
    seed, offset = check_launch(out, images, image_of_row, seed, offset)
    in_memory = isinstance(offset, torch.Tensor)
    sigma = check_number("sigma", sigma, 0.0)
    scale, shift = check_number("scale", scale), check_number("shift", shift)
    chw = images[0].numel()
    if out.numel() == 0:
        return out
    qblock, grid = launch_grid(out.shape[0], chw, offset, draws_per_counter=4)
    _noisy_inputs_kernel[grid](
        out, images.contiguous(), image_of_row, offset, seed, images.shape[0], chw, sigma, scale, shift,
        OFFSET_IN_MEMORY=in_memory, QBLOCK=qblock,
    )
    if in_memory:
        offset.add_(out.numel())
    return out


def image_of_row(repeats: torch.Tensor | list[int], num_images: int, device: torch.device | str) -> torch.Tensor:
    """(sum(repeats),) int64 row -> image map on `device`; built on the host (a CUDA `repeats` costs one sync)."""
    counts = torch.tensor(repeat_counts(repeats, num_images), dtype=torch.int64)
    rows = torch.repeat_interleave(torch.arange(num_images), counts)
    device = torch.device(device)
    if device.type == "cuda":
        return rows.pin_memory().to(device, non_blocking=True)
    return rows.to(device)


def empty_batch(rows: torch.Tensor, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The uninitialized (len(rows), C, H, W) output of a sampler launch, in one of OUT_DTYPES."""
    if dtype not in OUT_DTYPES:
        raise UserError(f"dtype must be one of {OUT_DTYPES}, got {dtype}")
    return torch.empty((rows.numel(), *images.shape[1:]), dtype=dtype, device=images.device)


def noisy_inputs_triton(
    images: torch.Tensor,
    repeats: torch.Tensor | list[int],
    sigma: float,
    seed: int,
    offset: int | torch.Tensor,
    scale: float = 1.0,
    shift: float = 0.0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """scale * (x + sigma * z) + shift for `repeats[i]` copies of each image x = images[i], as one launch.

    The drop-in for `rrcm.kernels.noisy_inputs` with (seed, offset) instead of a generator: output
    element e uses draw offset + e, so the next call should start at offset + result.numel() (a tensor
    offset is advanced in place). Returns (sum(repeats), C, H, W) in `dtype` (default images.dtype).
    """
    if images.dim() != 4:
        raise UserError(f"images must be (k, C, H, W), got shape {tuple(images.shape)}")
    rows = image_of_row(repeats, images.shape[0], images.device)
    out = empty_batch(rows, images, images.dtype if dtype is None else dtype)
    return write_noisy_inputs(out, images, rows, sigma, seed, offset, scale, shift)
