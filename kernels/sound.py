"""Sound noise for 8-bit images (Voracek & Hein, ICLR 2023): Gaussian noise rounded to the 1/255 grid.

For an image x on the grid, round(x + sigma z) = x + delta with P(delta = i/255) =
Phi((2i + 1) / (510 sigma)) - Phi((2i - 1) / (510 sigma)). Sampling delta exactly and clipping x + delta to
[0, 1] makes the Monte-Carlo estimate one of exact Gaussian smoothing of the quantized classifier
x' -> f(clip(round(x'))): no floating-point noise for an attacker to exploit. The model sees a deterministic
function of the integer grid values.

Support: |i| <= 255 with each tail folded into its last bin. This is exact, not an approximation: for x in
[0, 255], clip(x + i) = 255 for every i >= 255 and 0 for every i <= -255.

Sampling: inverse CDF over uniform integers u in [0, 2^62) against an integer table T_i = round(2^62 F(i)),
F computed with 128-bit mpmath (torch.randint reduces 64 random bits mod 2^62: exactly uniform on CPU and CUDA).
A guide table over the top GUIDE_BITS bits of u answers most draws with one comparison (below); the
answer is always the binary search's. Each table entry is within 2^-63 of the true CDF, so the sampled
law is within total variation 510 * 2^-63 (= TV_PER_PIXEL, 5.5e-17) of the exact one per pixel, and within
num_pixels * TV_PER_PIXEL per noisy image: a certificate from n samples holds for the exact smoothing
after subtracting that from p_lower (8e-12 for a 224 x 224 x 3 image; a 2^31-level table would give 0.02).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import mpmath
import torch

from rrcm.errors import UserError
from rrcm.kernels.sampling import repeat_images

GRID = 255
TABLE_BITS = 62
GUIDE_BITS = 16
TV_PER_PIXEL = (2 * GRID) * 2.0 ** -(TABLE_BITS + 1)


@functools.lru_cache(maxsize=16)
def _cdf_values(sigma: float) -> list[int]:
    with mpmath.workprec(128):
        scale = mpmath.mpf(510) * mpmath.mpf(sigma)
        cdf = [int(mpmath.nint(mpmath.ncdf((2 * i + 1) / scale) * 2**TABLE_BITS)) for i in range(-GRID, GRID)]
    return cdf + [2**TABLE_BITS]


@dataclass(frozen=True)
class _Tables:
    cdf: torch.Tensor  # (511,) int64, T_i
    first: torch.Tensor  # (2^GUIDE_BITS,) int32: the answer for the lowest u of each guide bucket
    wide: torch.Tensor  # (2^GUIDE_BITS,) bool: the bucket holds two or more table boundaries


@functools.lru_cache(maxsize=16)
def _device_tables(sigma: float, device: torch.device) -> _Tables:
    cdf = torch.tensor(_cdf_values(sigma), dtype=torch.int64)
    width = 2 ** (TABLE_BITS - GUIDE_BITS)
    lowest = torch.arange(2**GUIDE_BITS, dtype=torch.int64) * width
    first = torch.searchsorted(cdf, lowest, right=True, out_int32=True)
    last = torch.searchsorted(cdf, lowest + (width - 1), right=True, out_int32=True)
    return _Tables(cdf.to(device), first.to(device), (last - first > 1).to(device))


def _tables(sigma: float, device: torch.device | str) -> _Tables:
    if not (sigma > 0 and sigma < float("inf")):
        raise UserError(f"sigma must be positive, got {sigma}")
    return _device_tables(float(sigma), torch.device(device))


def cdf_table(sigma: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """(511,) int64: entry j is 2^62 P(delta <= j - 255), rounded; the last is exactly 2^62."""
    return _tables(sigma, device).cdf.clone()


def inverse_cdf(u: torch.Tensor, sigma: float) -> torch.Tensor:
    """int32 offsets i for int64 uniforms u in [0, 2^62): the smallest i with u < T_i,
    so P(i) = (T_i - T_(i-1)) / 2^62 exactly."""
    tables = _tables(sigma, u.device)
    if u.is_cuda:  # a binary search costs the GPU less than the host synchronization of the masked fallback
        return torch.searchsorted(tables.cdf, u, right=True, out_int32=True).sub_(GRID)
    # Bucket b = u >> 46 starts at answer first[b]; a bucket crossed by at most one boundary T_j needs the
    # one comparison u >= T_first. A bucket crossed by more holds a whole bin rarer than 2^-16, so at most
    # 511 of the 2^16 buckets (under 1% of draws; the far tails) take the binary search.
    flat = u.reshape(-1)
    bucket = flat >> (TABLE_BITS - GUIDE_BITS)
    answer = tables.first.index_select(0, bucket)
    answer += (flat >= tables.cdf.index_select(0, answer)).to(torch.int32)
    wide = tables.wide.index_select(0, bucket).nonzero().squeeze(1)
    if len(wide):
        answer[wide] = torch.searchsorted(tables.cdf, flat[wide], right=True, out_int32=True)
    return answer.sub_(GRID).view(u.shape)


def sample_offsets(
    shape: tuple[int, ...], sigma: float, generator: torch.Generator | None, device: torch.device | str
) -> torch.Tensor:
    """int32 grid offsets i in [-255, 255] (delta = i / 255), drawn by inverse CDF on `device`."""
    u = torch.randint(0, 2**TABLE_BITS, shape, generator=generator, device=device, dtype=torch.int64)
    return inverse_cdf(u, sigma)


def to_grid(images: torch.Tensor) -> torch.Tensor:
    """uint8 grid values of images given as uint8, or as float32/float64 values k / 255 in [0, 1]."""
    if images.dtype == torch.uint8:
        return images
    if images.dtype not in (torch.float32, torch.float64):
        raise UserError(f"sound sampling needs uint8 images or float32/float64 ones on the 1/255 grid, got {images.dtype}")
    scaled = images.to(torch.float64) * GRID
    grid = scaled.round()
    if not bool(((scaled - grid).abs() <= 1e-2).all() & (grid >= 0).all() & (grid <= GRID).all()):
        raise UserError("sound sampling needs images on the 1/255 grid in [0, 1] (finite, k / 255 for integer k)")
    return grid.to(torch.uint8)


def sound_grid_values(
    images: torch.Tensor, repeats: Sequence[int] | torch.Tensor, sigma: float, generator: torch.Generator | None
) -> torch.Tensor:
    """uint8 clip(x + delta) in grid units for `repeats[i]` copies of each image x = images[i] (k, C, H, W)."""
    x = repeat_images(to_grid(images), repeats)
    offsets = sample_offsets(tuple(x.shape), sigma, generator, x.device)
    return offsets.add_(x).clamp_(0, GRID).to(torch.uint8)


def grid_to_model(
    values: torch.Tensor, scale: float = 1.0, shift: float = 0.0, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Model-space inputs scale * (values / 255) + shift: a fixed function of the integer grid values."""
    out = values.to(dtype or torch.get_default_dtype()) * (scale / GRID)
    return out.add_(shift) if shift != 0.0 else out


def sound_noisy_inputs(
    images: torch.Tensor,
    repeats: Sequence[int] | torch.Tensor,
    sigma: float,
    generator: torch.Generator | None,
    scale: float = 1.0,
    shift: float = 0.0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Drop-in for `noisy_inputs` with grid-rounded noise: scale * clip(x + delta) + shift, (sum(repeats), C, H, W).

    images: uint8 (k, C, H, W), or float pixel values on the 1/255 grid (then also the default output dtype).
    """
    if dtype is None and images.dtype.is_floating_point:
        dtype = images.dtype
    return grid_to_model(sound_grid_values(images, repeats, sigma, generator), scale, shift, dtype)
