"""Noise schedule and time conditioning (method.md section 2).

Pixel space is [0, 1]; the network sees images normalized with mean = std = 0.5, so a pixel-space
noise std `sigma` is the model-space time t = 2 sigma. `time_for_sigma` owns that mapping.
"""
from __future__ import annotations

import math

import torch

from rrcm.errors import UserError

T_MIN = 0.002
T_MAX = 80.0
RHO = 7.0
SIGMA_DATA = 0.5
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5
START_SCALES = 20
END_SCALES = 80
FINAL_SCALES = END_SCALES + 1  # the grid used for fine-tuning and certification after a full pre-training
PAPER_TOTAL_STEPS = 600_000  # the schedule length the paper's fine-tuning and certification derive N(k) with


def karras_times(num_scales: int, t_min: float = T_MIN, t_max: float = T_MAX, rho: float = RHO) -> torch.Tensor:
    """The Karras grid t_0 > t_1 > ... > t_{N-1} (float64), t_0 = t_max, t_{N-1} = t_min."""
    if num_scales < 2:
        raise ValueError("a Karras grid needs at least 2 points")
    i = torch.arange(num_scales, dtype=torch.float64, device="cpu")  # host numbers, whatever the default device
    lo, hi = t_min ** (1 / rho), t_max ** (1 / rho)
    return (hi + i / (num_scales - 1) * (lo - hi)) ** rho


def num_scales(step: int, total_steps: int, start: int = START_SCALES, end: int = END_SCALES) -> int:
    """The growing number of grid points N(k) of the 'icm' schedule (already +1)."""
    k_prime = math.ceil(total_steps / math.log2(math.ceil(end / start) + 1))
    doublings = math.ceil(step / max(k_prime, 1))
    return min(start * 2**doublings, end) + 1


def target_ema(step: int, total_steps: int, start: float = 0.99, end: float = 0.9999) -> float:
    """Target-network EMA rate rising from `start` to `end` along a sigmoid in step / total_steps."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    s = lambda u: 1.0 / (1.0 + math.exp(-12.0 * (u - 0.5)))  # noqa: E731
    frac = (s(progress) - s(0.0)) / (s(1.0) - s(0.0))
    return start + (end - start) * frac


def c_in(t: torch.Tensor | float) -> torch.Tensor | float:
    """Input scaling 1 / sqrt(t^2 + sigma_data^2)."""
    if isinstance(t, torch.Tensor):
        return torch.rsqrt(t**2 + SIGMA_DATA**2)
    return 1.0 / math.sqrt(t * t + SIGMA_DATA**2)


def time_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (cos half, then sin half) of tau(t) = 250 ln t; shape (B, dim), float32."""
    tau = 1000.0 * 0.25 * torch.log(t.float())
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = tau[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def time_for_sigma(sigma: float) -> float:
    """Model-space time of pixel-space noise std `sigma` (t = sigma / PIXEL_STD = 2 sigma)."""
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise UserError(f"sigma must be a positive number, got {sigma!r}")
    return float(sigma) / PIXEL_STD


def nearest_grid_times(t: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The point of `grid` nearest to each time in t (any shape), in grid's dtype: plain tensor ops, which
    training draws per image and exported graphs compute from their sigma input."""
    return grid[(grid - t.to(grid.dtype).unsqueeze(-1)).abs().argmin(-1)]


def nearest_time(t: float, num_points: int = FINAL_SCALES) -> float:
    """The grid point of the `num_points` Karras grid nearest to t."""
    return float(nearest_grid_times(torch.tensor(float(t), dtype=torch.float64, device="cpu"), karras_times(num_points)))


def grid_time_for_sigma(sigma: float, num_points: int = FINAL_SCALES) -> float:
    """The time a classifier for pixel noise `sigma` is conditioned on: the nearest point of its
    `num_points` grid (a checkpoint's `ModelConfig.grid_points`)."""
    return nearest_time(time_for_sigma(sigma), num_points)
