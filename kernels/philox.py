"""The Gaussian stream of the Triton sampler, in plain torch: the oracle for its noise, on any device.

Draw number `a` of seed `s` is lane `a % 4` of Box-Muller applied to Philox4x32-10 with key `s` and
counter `a // 4`, exactly as `triton.language.randn4x(s, a // 4)` computes it. So (seed, offset) names
every draw, and a call that uses draws offset .. offset + n - 1 shares none with one that starts at
offset + n.

The integer stream of the sound sampler (`rrcm.kernels.triton_sound`) takes two words per draw: draw `a`
is u = (hi << 30) | (lo >> 2) with (hi, lo) = words (0, 1) of counter a // 2 for even a, words (2, 3) for
odd a. That is the 64-bit (hi << 32) | lo shifted right by 2: uniform on [0, 2^62).
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_ROUNDS = 10
_INT_TO_UNIT = 4.6566127342e-10  # Triton's scale from a 31-bit integer to [0, 1)


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for a < 2**32 and int64 b in [0, 2**32), without int64 overflow."""
    t_hi, t_lo = a * (b >> 16), a * (b & 0xFFFF)
    return (t_hi + (t_lo >> 16)) >> 16, (((t_hi & 0xFFFF) << 16) + t_lo) & _M32


def philox4x32(seed: int, counters: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Four int64 tensors of uint32 words: Philox4x32-10 of the 64-bit counters (c0 = low, c1 = high word)."""
    c0, c1 = counters & _M32, (counters >> 32) & _M32
    c2 = c3 = torch.zeros_like(counters)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul32(_ROUND_B, c2)
        hi_a, lo_a = _mul32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def _uniform(word: torch.Tensor) -> torch.Tensor:
    """Triton's uint32 -> [0, 1): fold the sign of the int32 reading onto 31 bits, then scale in float32."""
    folded = torch.where(word >= 2**31, _M32 - word, word)
    return folded.to(torch.float32) * torch.tensor(_INT_TO_UNIT, dtype=torch.float32)


def _box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.sqrt(-2.0 * torch.log(u1.clamp_min(1e-7)))
    theta = 6.283185307179586 * u2
    return r * torch.cos(theta), r * torch.sin(theta)


def philox_normal(seed: int, offset: int, numel: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Draws offset .. offset + numel - 1 of seed's N(0, 1) stream, as a (numel,) float32 tensor."""
    first, last = offset // 4, (offset + numel + 3) // 4
    words = philox4x32(seed, torch.arange(first, last, dtype=torch.int64, device=device))
    n0, n1 = _box_muller(_uniform(words[0]), _uniform(words[1]))
    n2, n3 = _box_muller(_uniform(words[2]), _uniform(words[3]))
    lanes = torch.stack([n0, n1, n2, n3], dim=-1).flatten()
    return lanes[offset % 4 : offset % 4 + numel]


def philox_uniform62(seed: int, offset: int, numel: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Draws offset .. offset + numel - 1 of seed's integer stream, as a (numel,) int64 tensor in [0, 2^62)."""
    first, last = offset // 2, (offset + numel + 1) // 2
    w0, w1, w2, w3 = philox4x32(seed, torch.arange(first, last, dtype=torch.int64, device=device))
    lanes = torch.stack([(w0 << 30) | (w1 >> 2), (w2 << 30) | (w3 >> 2)], dim=-1).flatten()
    return lanes[offset % 2 : offset % 2 + numel]
