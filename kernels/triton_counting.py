"""Argmax and per-image counting in one Triton launch, accumulating into a counts buffer on the device.

One launch where `rrcm.kernels.count_predictions` takes four (argmax, index arithmetic, index_add_): it
adds each row's argmax into counts[image, class] with atomics, into a fixed output buffer, with no host
round trip, so it can be captured in a CUDA graph; rows of no image (padding) are skipped.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rrcm.errors import UserError
from rrcm.kernels.triton_sampling import INTERPRETED, check_triton_device

# Logits per program; the interpreter pays per program, not per element.
LOGITS_PER_PROGRAM = 2**20 if INTERPRETED else 4096
MAX_ROWS = 2**16 if INTERPRETED else 64


@triton.jit
def _count_kernel(counts_ptr, logits_ptr, image_ids_ptr, rows, num_images, num_classes, row_stride,
                  ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    k = tl.arange(0, BLOCK_K)
    in_rows = r < rows
    mask = in_rows[:, None] & (k[None, :] < num_classes)
    ptrs = logits_ptr + r[:, None].to(tl.int64) * row_stride + k[None, :]
    x = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)  # NaN wins, as in torch.argmax
    pred = tl.argmax(x, axis=1, tie_break_left=True)
    image = tl.load(image_ids_ptr + r, mask=in_rows, other=-1).to(tl.int64)
    counted = in_rows & (image >= 0) & (image < num_images)  # padding rows of a fixed-size batch name no image
    ones = tl.full([ROWS], 1, tl.int64)
    tl.atomic_add(counts_ptr + image * num_classes + pred, ones, mask=counted, sem="relaxed")


def count_predictions_triton(
    logits: torch.Tensor, image_ids: torch.Tensor, num_images: int, counts: torch.Tensor | None = None
) -> torch.Tensor:
    """(num_images, C) int64 counts of argmax(logits) per image, added into `counts` when given.

    logits: (B, C); image_ids: (B,) integers naming each row's image; rows whose id is outside [0, num_images)
    are not counted (the padding of a fixed-size batch). Ties go to the lowest class, as in torch.
    """
    if logits.dim() != 2 or not logits.is_floating_point():
        raise UserError(f"logits must be a floating (B, C) tensor, got {tuple(logits.shape)} {logits.dtype}")
    if image_ids.shape != logits.shape[:1] or image_ids.is_floating_point():
        raise UserError(f"image_ids must be an integer tensor of shape ({logits.shape[0]},)")
    rows, num_classes = logits.shape
    if counts is None:
        counts = torch.zeros(num_images, num_classes, dtype=torch.int64, device=logits.device)
    elif counts.shape != (num_images, num_classes) or counts.dtype != torch.int64 or not counts.is_contiguous():
        raise UserError(f"counts must be a contiguous ({num_images}, {num_classes}) int64 tensor")
    for t, what in ((logits, "logits"), (image_ids, "image_ids"), (counts, "counts")):
        check_triton_device(t, what)
        if t.device != logits.device:
            raise UserError(f"{what} is on {t.device}, logits on {logits.device}")
    if rows == 0:
        return counts
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    block_k = triton.next_power_of_2(num_classes)
    block_rows = max(1, min(triton.next_power_of_2(rows), MAX_ROWS, LOGITS_PER_PROGRAM // block_k))
    _count_kernel[(triton.cdiv(rows, block_rows),)](
        counts, logits, image_ids, rows, num_images, num_classes, logits.stride(0), ROWS=block_rows, BLOCK_K=block_k
    )
    return counts
