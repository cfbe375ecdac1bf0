"""The CUDA path of `rrcm.kernels.sound.sound_noisy_inputs`: grid-rounded noise, one Triton launch per batch.

Output element e of a call uses draw `offset + e` of the seed's integer stream: a uniform u in [0, 2^62)
made of two Philox words (`rrcm.kernels.philox.philox_uniform62` is the same stream in torch). The offset
i is the inverse CDF of u against the (2M + 1)-entry integer table of `rrcm.kernels.sound.cdf_table`, padded
with 2^62 to 2^STEPS - 1 entries and found by a STEPS-step binary search in the kernel, so the law is exactly
the torch path's for any support M. The output is grid_to_model(x + i), unclipped (the values the classifier
saw in training), as torch computes it on the CPU and on CUDA, bit for bit: x + i, scale / 255 and shift in
float32, product and sum each rounded to float32, then one rounding to the output dtype. The model sees a
fixed function of the integer grid values. (seed, offset), rows and tensor offsets work as in
`triton_sampling`.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from rrcm.errors import UserError
from rrcm.kernels.sound import GRID, TABLE_BITS, cdf_table, support, to_grid
from rrcm.kernels.triton_sampling import check_launch, check_number, empty_batch, image_of_row, launch_grid


@triton.jit
def _rounded(y, dtype: tl.constexpr):
    """float32 y rounded to the nearest (ties to even) value of dtype, kept in float32."""
    if dtype == tl.bfloat16:  # by hand: Triton's interpreter truncates float32 -> bfloat16
        bits = y.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return y.to(dtype).to(tl.float32)


@triton.jit
def _search(u, cdf_ptr, STEPS: tl.constexpr):
    """#{j : T_j <= u} for int64 u in [0, 2^62) and a table of 2^STEPS - 1 entries: the smallest j with
    u < T_j (the table's 2^62 entries, the last real one and the padding, keep it at most 2M)."""
    below = tl.zeros(u.shape, dtype=tl.int32)
    for k in tl.static_range(STEPS - 1, -1, -1):
        below += tl.where(tl.load(cdf_ptr + below + ((1 << k) - 1)) <= u, 1 << k, 0)
    return below


@triton.jit(do_not_specialize=["offset", "seed"])
def _sound_inputs_kernel(
    out_ptr, grid_ptr, image_of_row_ptr, cdf_ptr, offset, seed, num_images, chw, half_width, scale, shift,
    OFFSET_IN_MEMORY: tl.constexpr, QBLOCK: tl.constexpr, SEARCH_STEPS: tl.constexpr,
):
    # Program (row, chunk) covers 2 * QBLOCK consecutive draws from an even one: each randint4x call gives
    # two draws; the first and last chunk of a row mask what is not theirs.
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    if OFFSET_IN_MEMORY:
        base = tl.load(offset)
    else:
        base = offset.to(tl.int64)
    row_start = base + row * chw
    first_counter = row_start // 2 + chunk * QBLOCK
    w0, w1, w2, w3 = tl.randint4x(seed, first_counter + tl.arange(0, QBLOCK).to(tl.int64))
    even = (w0.to(tl.int64) << 30) | (w1 >> 2).to(tl.int64)  # uint32 words widen with zeros
    odd = (w2.to(tl.int64) << 30) | (w3 >> 2).to(tl.int64)
    u = tl.reshape(tl.join(even, odd), [2 * QBLOCK])  # draw 2c + j is lane j
    pos = (first_counter * 2 - row_start).to(tl.int32) + tl.arange(0, 2 * QBLOCK)
    in_row = (pos >= 0) & (pos < chw)
    below = _search(u, cdf_ptr, SEARCH_STEPS)
    image = tl.load(image_of_row_ptr + row).to(tl.int64)
    valid = (image >= 0) & (image < num_images)
    x = tl.load(grid_ptr + tl.where(valid, image, 0) * chw + pos, mask=in_row, other=0).to(tl.int32)
    value = (x + below - half_width).to(tl.float32)  # x + i, exact in float32 (|x + i| < 2^24)
    # Round after the product and after the shift, as grid_to_model's two torch ops do (no FMA: see launch).
    y = _rounded(value * scale + shift, out_ptr.dtype.element_ty)
    y = tl.where(valid, y, float("nan"))
    tl.store(out_ptr + row * chw + pos, y.to(out_ptr.dtype.element_ty), mask=in_row)


@functools.lru_cache(maxsize=16)
def padded_table(sigma: float, device: torch.device) -> tuple[torch.Tensor, int]:
    """(cdf_table(sigma) padded with 2^62 to 2^steps - 1 entries, steps): what `_search` takes."""
    table = cdf_table(sigma)
    steps = len(table).bit_length()  # 2^steps - 1 >= len(table)
    padding = torch.full((2**steps - 1 - len(table),), 2**TABLE_BITS, dtype=torch.int64)
    return torch.cat([table, padding]).to(device), steps


def _float32(x: float) -> float:
    """x rounded to float32, as torch rounds a Python scalar operand of an op on a float32 tensor."""
    return float(torch.tensor(x, dtype=torch.float64).to(torch.float32))


def write_sound_inputs(
    out: torch.Tensor,
    grid_images: torch.Tensor,
    image_of_row: torch.Tensor,
    sigma: float,
    seed: int,
    offset: int | torch.Tensor,
    scale: float = 1.0,
    shift: float = 0.0,
) -> torch.Tensor:
    """Fill out (R, C, H, W) with grid_to_model(x + i, scale, shift), x = grid_images[image_of_row[r]], unclipped.

    grid_images: uint8 (k, C, H, W) grid values; image_of_row: (R,) integer, on out's device. One launch,
    no host sync. Rows naming no image in [0, k) are NaN. `offset` as in `write_noisy_inputs`: an int, or
    a one-element int64 device tensor read by the kernel and advanced in place by out.numel().
    """
    if grid_images.dim() != 4 or grid_images.dtype != torch.uint8:
        shape, dtype = tuple(grid_images.shape), grid_images.dtype
        raise UserError(f"grid_images must be a uint8 (k, C, H, W) tensor, got {shape} {dtype}")
    seed, offset = check_launch(out, grid_images, image_of_row, seed, offset)
    in_memory = isinstance(offset, torch.Tensor)
    sigma = check_number("sigma", sigma)
    table, steps = padded_table(sigma, out.device)  # raises for sigma <= 0
    scale, shift = check_number("scale", scale), check_number("shift", shift)
    chw = grid_images[0].numel()
    if out.numel() == 0:
        return out
    aligned = not in_memory and offset % 2 == 0 and chw % 2 == 0
    qblock, _, grid = launch_grid(out.shape[0], chw, draws_per_counter=2, aligned=aligned)
    _sound_inputs_kernel[grid](
        out, grid_images.contiguous(), image_of_row, table, offset, seed, grid_images.shape[0], chw, support(sigma),
        _float32(scale / GRID), _float32(shift),
        OFFSET_IN_MEMORY=in_memory, QBLOCK=qblock, SEARCH_STEPS=steps,
        enable_fp_fusion=False,  # a fused multiply-add would round once where torch rounds twice
    )
    if in_memory:
        offset.add_(out.numel())
    return out


def sound_noisy_inputs_triton(
    images: torch.Tensor,
    repeats: torch.Tensor | list[int],
    sigma: float,
    seed: int,
    offset: int | torch.Tensor,
    scale: float = 1.0,
    shift: float = 0.0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """grid_to_model(x + i), unclipped, for `repeats[i]` copies of each image x = images[i], as one launch.

    The drop-in for `sound_noisy_inputs` with (seed, offset) instead of a generator (the next call should
    start at offset + result.numel(); a tensor offset is advanced in place). images: uint8 (k, C, H, W), or
    float values on the 1/255 grid (checked on the host: one sync on CUDA), whose dtype is then the default
    `dtype`; uint8 images default to torch's default dtype. Returns (sum(repeats), C, H, W).
    """
    if images.dim() != 4:
        raise UserError(f"images must be (k, C, H, W), got shape {tuple(images.shape)}")
    grid_images = to_grid(images)
    rows = image_of_row(repeats, images.shape[0], images.device)
    if dtype is None:
        dtype = images.dtype if images.is_floating_point() else torch.get_default_dtype()
    out = empty_batch(rows, images, dtype)
    return write_sound_inputs(out, grid_images, rows, sigma, seed, offset, scale, shift)
