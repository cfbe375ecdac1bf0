"""Noisy batches for Monte-Carlo smoothing, written straight in the model's input space."""
from __future__ import annotations

import torch


def noisy_inputs(
    images: torch.Tensor,
    repeats: torch.Tensor,
    sigma: float,
    generator: torch.Generator | None,
    scale: float = 1.0,
    shift: float = 0.0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """scale * (x + sigma * z) + shift for `repeats[i]` copies of each image x = images[i].

    images: (k, C, H, W) in pixel space; repeats: (k,) int64 on the same device; z ~ N(0, I) drawn
    from `generator` on the images' device. Returns (repeats.sum(), C, H, W) in `dtype`.
    """
    x = torch.repeat_interleave(images, repeats, dim=0)
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    out = torch.addcmul(x, z, torch.tensor(sigma, dtype=x.dtype, device=x.device))
    if scale != 1.0 or shift != 0.0:
        out = out.mul_(scale).add_(shift)
    return out if dtype is None else out.to(dtype)
