"""Sound noise for 8-bit images (Voracek & Hein, ICLR 2023): Gaussian noise rounded to the 1/255 grid.

For an image x on the grid (255 x an integer), round(255 (x + sigma z)) = 255 x + i, where the offset
i = round(255 sigma z) has P(i) = Phi((2i + 1) / (510 sigma)) - Phi((2i - 1) / (510 sigma)). The model is
fed (255 x + i) / 255 unclipped, values below 0 and above 1 included, as it saw Gaussian noise in
training: the Monte-Carlo estimate is one of exact Gaussian smoothing of the quantized classifier
x' -> f(round(255 x') / 255), a deterministic function of integer grid values with no floating-point noise
for an attacker to exploit.

Support: |i| <= M(sigma) = ceil(TAIL_Z * 255 * sigma), each tail folded into its end bin. The folded mass
P(|i| > M) = 2 Phi(-(2M + 1) / (510 sigma)) <= 2 Phi(-TAIL_Z) = 1.5e-23 is part of the error bound below.
(At 62 bits the bins beyond about 9.1 sigma round to empty: table rounding, also inside the bound.)

Sampling: inverse CDF over uniform integers u in [0, 2^62) against an integer table T_j = round(2^62 F(j)),
j = -M..M - 1, and T_M = 2^62, F computed with 128-bit mpmath (torch.randint reduces 64 random bits mod
2^62: exactly uniform on CPU and CUDA). A guide table over the top GUIDE_BITS bits of u answers most draws
with one comparison (below); the answer is always the binary search's. Each of the 2M rounded entries is
within half a unit (2^-63) of the true CDF, so the sampled law is within total variation
`tv_per_pixel(sigma)` = M 2^-62 + P(|i| > M) of the exact one per pixel (1.4e-16 at sigma 0.25,
5.5e-16 at sigma 1), and within num_pixels times that per noisy image: a certificate from n samples holds
for the exact smoothing after subtracting that from p_lower (8e-11 for a 224 x 224 x 3 image at sigma 1).
"""
from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import mpmath
import torch

from rrcm.errors import UserError
from rrcm.kernels.sampling import repeat_images

GRID = 255
TABLE_BITS = 62
GUIDE_BITS = 16
TAIL_Z = 10.0  # support: TAIL_Z standard deviations of the offset beyond every grid value
MAX_SIGMA = 16.0  # a table of 2 * TAIL_Z * 255 * sigma entries: 81,601 at the limit


def support(sigma: float) -> int:
    """M: offsets i are drawn from [-M, M], M >= TAIL_Z * 255 * sigma (and >= 1)."""
    return max(1, math.ceil(TAIL_Z * GRID * sigma))


@functools.lru_cache(maxsize=16)
def _cdf_values(sigma: float) -> list[int]:
    m = support(sigma)
    with mpmath.workprec(128):
        scale = mpmath.mpf(2 * GRID) * mpmath.mpf(sigma)
        cdf = [int(mpmath.nint(mpmath.ncdf((2 * i + 1) / scale) * 2**TABLE_BITS)) for i in range(-m, m)]
    return cdf + [2**TABLE_BITS]


@functools.lru_cache(maxsize=16)
def _tv_per_pixel(sigma: float) -> float:
    m = support(sigma)
    with mpmath.workprec(128):
        tail = 2 * mpmath.ncdf(-(2 * m + 1) / (mpmath.mpf(2 * GRID) * mpmath.mpf(sigma)))
        # 2m entries each within 1/2 + 2^-60 units of 2^62 F (128-bit evaluation, then rounding): the sampled
        # probabilities q_i = (T_i - T_(i-1)) / 2^62 move by at most sum_j |error_j| in total variation.
        table = 2 * m * (mpmath.mpf(1) / 2 + mpmath.mpf(2) ** -60) * mpmath.mpf(2) ** -TABLE_BITS
        bound = table + tail
    return math.nextafter(float(bound), math.inf)  # float() rounds to nearest: one step up bounds it


def _check_sigma(sigma: float) -> float:
    if not (isinstance(sigma, numbers.Real) and 0 < sigma <= MAX_SIGMA):
        raise UserError(f"sound sampling needs a sigma in (0, {MAX_SIGMA:g}], got {sigma!r}")
    return float(sigma)


def tv_per_pixel(sigma: float) -> float:
    """An upper bound on the total variation distance between the sampled offset law and the exact rounded
    Gaussian, per pixel: table rounding plus the folded tails, each bounded upward at 128 bits."""
    return _tv_per_pixel(_check_sigma(sigma))


@dataclass(frozen=True)
class _Tables:
    cdf: torch.Tensor  # (2M + 1,) int64, T_j
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
    return _device_tables(_check_sigma(sigma), torch.device(device))


def cdf_table(sigma: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """(2M + 1,) int64, M = support(sigma): entry j is 2^62 P(i <= j - M), rounded; the last is exactly 2^62."""
    return _tables(sigma, device).cdf.clone()


def inverse_cdf(u: torch.Tensor, sigma: float) -> torch.Tensor:
    """int32 offsets i in [-M, M] for int64 uniforms u in [0, 2^62): the smallest i with u < T_i,
    so P(i) = (T_i - T_(i-1)) / 2^62 exactly."""
    tables = _tables(sigma, u.device)
    m = support(sigma)
    if u.is_cuda:  # a binary search costs the GPU less than the host synchronization of the masked fallback
        return torch.searchsorted(tables.cdf, u, right=True, out_int32=True).sub_(m)
    # Bucket b = u >> 46 starts at answer first[b] (< 2M + 1: the last entry 2^62 exceeds every u); a bucket
    # crossed by at most one boundary T_j needs the one comparison u >= T_first. A bucket crossed by more
    # holds a whole bin rarer than 2^-16: the far tails, under 1% of draws for sigma <= 2.
    flat = u.reshape(-1)
    bucket = flat >> (TABLE_BITS - GUIDE_BITS)
    answer = tables.first.index_select(0, bucket)
    answer += (flat >= tables.cdf.index_select(0, answer)).to(torch.int32)
    wide = tables.wide.index_select(0, bucket).nonzero().squeeze(1)
    if len(wide):
        answer[wide] = torch.searchsorted(tables.cdf, flat[wide], right=True, out_int32=True)
    return answer.sub_(m).view(u.shape)


def sample_offsets(
    shape: tuple[int, ...], sigma: float, generator: torch.Generator | None, device: torch.device | str
) -> torch.Tensor:
    """int32 grid offsets i in [-M, M] (255 sigma z rounded), drawn by inverse CDF on `device`."""
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
    """int32 x + i in grid units, unclipped (in [-M, 255 + M]), for `repeats[i]` copies of each image
    x = images[i] (k, C, H, W)."""
    x = repeat_images(to_grid(images), repeats)
    offsets = sample_offsets(tuple(x.shape), sigma, generator, x.device)
    return offsets.add_(x)


def grid_to_model(
    values: torch.Tensor, scale: float = 1.0, shift: float = 0.0, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Model-space inputs scale * (values / 255) + shift: a fixed function of the integer grid values, the same on
    CPU and CUDA. Computed in float32 (float64 for a float64 dtype), as plain noise is, then rounded once to
    dtype (default: torch's): bf16 holds integers only up to 256, and unclipped grid values reach 255 + M."""
    dtype = dtype or torch.get_default_dtype()
    out = values.to(torch.float64 if dtype == torch.float64 else torch.float32) * (scale / GRID)
    if shift != 0.0:
        out = out.add_(shift)
    return out.to(dtype)


def sound_noisy_inputs(
    images: torch.Tensor,
    repeats: Sequence[int] | torch.Tensor,
    sigma: float,
    generator: torch.Generator | None,
    scale: float = 1.0,
    shift: float = 0.0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Drop-in for `noisy_inputs` with grid-rounded noise: scale * (x + i / 255) + shift, (sum(repeats), C, H, W).

    images: uint8 (k, C, H, W), or float pixel values on the 1/255 grid (then also the default output dtype).
    """
    if dtype is None and images.dtype.is_floating_point:
        dtype = images.dtype
    return grid_to_model(sound_grid_values(images, repeats, sigma, generator), scale, shift, dtype)
