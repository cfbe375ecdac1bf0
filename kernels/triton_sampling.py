"""The CUDA path of `rrcm.kernels.noisy_inputs`: one Triton launch writes a whole noisy batch.

Each output element is scale * (x + sigma * z) + shift cast to the model's dtype, with z drawn in the
kernel from Philox (`rrcm.kernels.philox.philox_normal` is the same stream in torch). Every row names its
own stream: row r copies image `image_of_row[r]` and takes draws `row_start[r] ..` of seed `row_seed[r]`'s
stream, so the certifier gives each image its own seeds and rows of many images share one launch without
their noise depending on one another (`write_noisy_rows`). `write_noisy_inputs` is the one-stream form:
output element e of a call uses draw `offset + e`, and advancing `offset` by the number of elements after
each call never reuses a draw. With TRITON_INTERPRET=1 (set before this module is imported) it runs on
CPU tensors through Triton's interpreter.
"""
from __future__ import annotations

import math
from numbers import Integral

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from rrcm.device import upload
from rrcm.errors import UserError
from rrcm.kernels.sampling import repeat_counts

INTERPRETED = isinstance(tl.randn4x, InterpretedFunction)  # TRITON_INTERPRET=1 was set before triton's import
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Draws per program row are 4 * QBLOCK, and a program takes several short rows. The interpreter pays per
# program, not per element: give it long blocks.
MAX_QBLOCK = 4096 if INTERPRETED else 512
MIN_QBLOCK = 1 if INTERPRETED else 16
DRAWS_PER_PROGRAM = 65536 if INTERPRETED else 2048


@triton.jit
def _noisy_rows_kernel(
    out_ptr, images_ptr, image_of_row_ptr, row_start_ptr, row_seed_ptr, rows, num_images, chw, sigma, scale, shift,
    ROWS: tl.constexpr, QBLOCK: tl.constexpr,
):
    # Program (block, chunk) covers, for each of ROWS rows, 4 * QBLOCK consecutive draws of that row's stream
    # starting at a multiple of 4, so that one randn4x call yields all of them; the first and last chunk of a
    # row mask what is not theirs.
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    chunk = tl.program_id(1)
    live = r < rows
    start = tl.load(row_start_ptr + r, mask=live, other=0).to(tl.int64)
    seed = tl.load(row_seed_ptr + r, mask=live, other=0).to(tl.int64)
    first_counter = start // 4 + chunk * QBLOCK
    counters = first_counter[:, None] + tl.arange(0, QBLOCK).to(tl.int64)[None, :]
    z0, z1, z2, z3 = tl.randn4x(seed[:, None], counters)
    z = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [ROWS, 4 * QBLOCK])  # draw 4c + j is lane j
    pos = (first_counter * 4 - start).to(tl.int32)[:, None] + tl.arange(0, 4 * QBLOCK)[None, :]
    in_row = live[:, None] & (pos >= 0) & (pos < chw)
    image = tl.load(image_of_row_ptr + r, mask=live, other=-1).to(tl.int64)
    valid = (image >= 0) & (image < num_images)
    x = tl.load(images_ptr + tl.where(valid, image, 0)[:, None] * chw + pos, mask=in_row).to(tl.float32)
    y = tl.where(valid[:, None], (x + sigma * z) * scale + shift, float("nan"))
    tl.store(out_ptr + r[:, None] * chw + pos, y.to(out_ptr.dtype.element_ty), mask=in_row)


def check_triton_device(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cuda" and not (INTERPRETED and t.device.type == "cpu"):
        raise UserError(f"{what} is on {t.device}; Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")


def check_number(name: str, value: float, minimum: float | None = None) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value)) or (minimum is not None and value < minimum):
        raise UserError(f"{name} must be a finite number{'' if minimum is None else f' >= {minimum}'}, got {value!r}")
    return float(value)


def check_rows(out: torch.Tensor, images: torch.Tensor, image_of_row: torch.Tensor) -> None:
    """out: a contiguous (R, C, H, W) batch of images' shape; image_of_row: (R,) integers; all on one Triton device."""
    if out.dtype not in OUT_DTYPES or out.shape[1:] != images.shape[1:] or not out.is_contiguous():
        raise UserError(f"out must be a contiguous (R, {', '.join(map(str, images.shape[1:]))}) tensor of {OUT_DTYPES}")
    if image_of_row.shape != out.shape[:1] or image_of_row.is_floating_point() or image_of_row.is_complex():
        raise UserError(f"image_of_row must be an integer tensor of shape ({out.shape[0]},)")
    for t, what in ((out, "out"), (images, "images"), (image_of_row, "image_of_row")):
        check_triton_device(t, what)
        if t.device != out.device:
            raise UserError(f"{what} is on {t.device}, out on {out.device}")


def check_launch(
    out: torch.Tensor, images: torch.Tensor, image_of_row: torch.Tensor, seed: int, offset: int | torch.Tensor
) -> tuple[int, int | torch.Tensor]:
    """Validate the arguments a (seed, offset) sampler launch shares; returns (seed, offset) as int / tensor."""
    check_rows(out, images, image_of_row)
    if not isinstance(seed, Integral) or not 0 <= seed < 2**63:
        raise UserError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    in_memory = isinstance(offset, torch.Tensor)
    if in_memory:
        if offset.numel() != 1 or offset.dtype != torch.int64 or offset.device != out.device:
            raise UserError(f"an offset tensor must hold one int64 on {out.device}")
    elif not isinstance(offset, Integral) or not 0 <= offset < 2**62:
        raise UserError(f"offset must be an integer in [0, 2**62), got {offset!r}")
    return int(seed), offset if in_memory else int(offset)


def launch_grid(rows: int, chw: int, draws_per_counter: int, aligned: bool = False,
                block_rows: bool = False) -> tuple[int, int, tuple[int, int]]:
    """(QBLOCK, ROWS, grid) for a kernel whose program (block, chunk) takes, for each of ROWS rows,
    draws_per_counter * QBLOCK consecutive draws starting at a multiple of draws_per_counter (one Philox
    counter gives that many draws). `aligned`: every row starts on a counter boundary. `block_rows`: several
    short rows per program (else ROWS is 1)."""
    if chw >= 2**31 - draws_per_counter:
        raise UserError(f"an image of {chw} elements is too large for the sampler")
    qblock = min(MAX_QBLOCK, max(MIN_QBLOCK, triton.next_power_of_2(-(-chw // draws_per_counter))))
    per_program = DRAWS_PER_PROGRAM // (draws_per_counter * qblock) if block_rows else 1
    rows_per_program = max(1, min(triton.next_power_of_2(rows), per_program))
    # Unless rows start on a counter boundary, a row's draws may straddle one more chunk.
    chunks = triton.cdiv(chw + (0 if aligned else draws_per_counter - 1), draws_per_counter * qblock)
    return qblock, rows_per_program, (triton.cdiv(rows, rows_per_program), chunks)


def write_noisy_rows(
    out: torch.Tensor,
    images: torch.Tensor,
    image_of_row: torch.Tensor,
    row_start: torch.Tensor,
    row_seed: torch.Tensor,
    sigma: float,
    scale: float = 1.0,
    shift: float = 0.0,
    aligned: bool = False,
) -> torch.Tensor:
    """Fill out (R, C, H, W): row r is scale * (images[image_of_row[r]] + sigma * z) + shift, z being draws
    row_start[r] .. row_start[r] + C*H*W - 1 of seed row_seed[r]'s stream. One launch, no host sync.

    images: (k, C, H, W) floating; image_of_row, row_start, row_seed: (R,) int64 on the same device (starts
    in [0, 2**62), seeds in [0, 2**63): not checked on the device). Rows naming no image in [0, k) are
    filled with NaN: padding rows of a fixed-size batch. `aligned`: the caller knows that every start and
    C*H*W are multiples of 4 (one chunk less per row where that matters).
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise UserError(f"images must be a floating (k, C, H, W) tensor, got {tuple(images.shape)} {images.dtype}")
    check_rows(out, images, image_of_row)
    for t, what in ((row_start, "row_start"), (row_seed, "row_seed")):
        if t.shape != out.shape[:1] or t.dtype != torch.int64 or t.device != out.device:
            raise UserError(f"{what} must be an int64 tensor of shape ({out.shape[0]},) on {out.device}")
    sigma = check_number("sigma", sigma, 0.0)
    scale, shift = check_number("scale", scale), check_number("shift", shift)
    chw = images[0].numel()
    if out.numel() == 0:
        return out
    qblock, rows_per_program, grid = launch_grid(out.shape[0], chw, draws_per_counter=4, aligned=aligned and chw % 4 == 0,
                                                 block_rows=True)
    _noisy_rows_kernel[grid](
        out, images.contiguous(), image_of_row, row_start, row_seed, out.shape[0], images.shape[0], chw,
        sigma, scale, shift, ROWS=rows_per_program, QBLOCK=qblock,
    )
    return out


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
    """`write_noisy_rows` with one stream: element e of out uses draw offset + e of seed's stream.

    `offset` is an int, or a one-element int64 tensor on the device: then it is read on the device and
    advanced in place by out.numel() afterwards, so the call can be captured in a CUDA graph whose replays
    never reuse a draw. No host sync.
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise UserError(f"images must be a floating (k, C, H, W) tensor, got {tuple(images.shape)} {images.dtype}")
    seed, offset = check_launch(out, images, image_of_row, seed, offset)
    rows = out.shape[0]
    row_start = torch.arange(rows, dtype=torch.int64, device=out.device) * images[0].numel() + offset
    aligned = not isinstance(offset, torch.Tensor) and offset % 4 == 0
    write_noisy_rows(out, images, image_of_row, row_start, torch.full_like(row_start, seed), sigma, scale, shift, aligned)
    if isinstance(offset, torch.Tensor):
        offset.add_(out.numel())
    return out


def image_of_row(repeats: torch.Tensor | list[int], num_images: int, device: torch.device | str) -> torch.Tensor:
    """(sum(repeats),) int64 row -> image map on `device`; built on the host (a CUDA `repeats` costs one sync)."""
    counts = torch.tensor(repeat_counts(repeats, num_images), dtype=torch.int64)
    return upload(torch.repeat_interleave(torch.arange(num_images), counts), torch.device(device))


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
