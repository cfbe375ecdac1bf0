"""Noisy batches for Monte-Carlo smoothing, written straight in the model's input space."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from rrcm.errors import UserError


def repeat_counts(repeats: Sequence[int] | torch.Tensor, num_images: int) -> list[int]:
    """`repeats` as num_images host integers, checked. Integers cost no device synchronization, a CUDA tensor one."""
    counts = torch.as_tensor(repeats).cpu()
    integral = counts.numel() == 0 or not (counts.is_floating_point() or counts.is_complex())  # [] reads as float
    if counts.shape != (num_images,) or not integral or bool((counts < 0).any()):
        raise UserError(f"repeats must be {num_images} non-negative counts (integers), one per image, "
                        f"got {counts.tolist()} ({counts.dtype})")
    return [int(r) for r in counts.tolist()]


def repeat_images(images: torch.Tensor, repeats: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """(sum(repeats), C, H, W): repeats[i] copies of images[i] (k, C, H, W), as broadcast views where possible."""
    counts = repeat_counts(repeats, len(images))
    pieces = [image.expand(r, *image.shape[1:]) for image, r in zip(images.split(1), counts) if r > 0]
    if not pieces:
        return images[:0]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def noisy_inputs(
    images: torch.Tensor,
    repeats: Sequence[int] | torch.Tensor,
    sigma: float,
    generator: torch.Generator | None,
    scale: float = 1.0,
    shift: float = 0.0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """scale * (x + sigma * z) + shift for `repeats[i]` copies of each image x = images[i].

    images: (k, C, H, W) in pixel space; repeats: k counts (see `repeat_images`); z ~ N(0, I) drawn
    from `generator` on the images' device. Returns (sum(repeats), C, H, W) in `dtype`.
    """
    x = repeat_images(images, repeats)
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    out = torch.addcmul(x, z, x.new_full((), sigma))  # a device scalar: no host-to-device copy
    if scale != 1.0 or shift != 0.0:
        out = out.mul_(scale).add_(shift)
    return out if dtype is None else out.to(dtype)
