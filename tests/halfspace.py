"""Half-space classifiers: base classifiers whose smoothed class probability (hence true radius) is known exactly.

f(x) = 1[w . x + b > 0] with |w| = 1; at signed distance d from the boundary, P(f(x + sigma z) = 1) = Phi(d / sigma)
and the smoothed classifier's true radius is d.
"""
from __future__ import annotations

import torch
from torch import nn

from rrcm.kernels import count_predictions, noisy_inputs


class HalfSpace(nn.Module):
    """2-class logits (-s, s) with s = w . x + b."""

    def __init__(self, shape: tuple[int, ...], seed: int = 0, centred: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(int(torch.tensor(shape).prod()), generator=g)
        self.register_buffer("w", w / w.norm())
        self.register_buffer("b", torch.randn((), generator=g))
        if centred:  # the boundary through the grey image: points at distances below 1 stay in [0, 1] in few dimensions
            self.b = -0.5 * self.w.sum()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([-s, s], dim=1)

    def image_at_distance(self, d: float, seed: int = 1) -> torch.Tensor:
        """A point x (shape `shape`) with w . x + b = d, i.e. class 1 with true radius d when d > 0."""
        x = torch.randn(self.shape, generator=torch.Generator().manual_seed(seed)).flatten()
        x = x + (d - (x @ self.w + self.b)) * self.w
        return x.view(self.shape)


def point_at_distance(model: HalfSpace, d: float) -> torch.Tensor:
    """An image in [0, 1] at signed distance d from the boundary: class 1 with true radius d when d > 0."""
    c = torch.full(model.shape, 0.5).flatten()
    x = c + (d - (c @ model.w + model.b)) * model.w
    assert 0.0 <= x.min() and x.max() <= 1.0
    return x.view(model.shape)


class GaussianSampler:
    """draw(m): class counts of m noisy forward passes through the real noise path (noisy_inputs, count_predictions)."""

    def __init__(self, model: nn.Module, image: torch.Tensor, sigma: float, seed: int, chunk: int = 8192):
        self.model, self.image, self.sigma, self.chunk = model, image[None], sigma, chunk
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, m: int) -> torch.Tensor:
        counts = torch.zeros(2, dtype=torch.int64)
        for start in range(0, m, self.chunk):
            k = min(self.chunk, m - start)
            x = noisy_inputs(self.image, torch.tensor([k]), self.sigma, self.generator)
            counts += count_predictions(self.model(x), torch.zeros(k, dtype=torch.int64), 1)[0]
        return counts
