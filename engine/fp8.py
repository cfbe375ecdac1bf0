"""FP8 matrix products for GPUs with FP8 tensor cores (compute capability 8.9 and up: Ada, Hopper): the
transformer's linear layers run as `torch._scaled_mm` on float8_e4m3fn operands, everything else in bfloat16.

Scales are per row and per output channel: each token of each sample gets its own activation scale (its
absolute maximum over the features, mapped to e4m3's largest value 448), each weight row its own, so a
sample's logits depend on that sample alone, as the binomial bound needs (one scale for the whole batch
would mix the samples). The certificate is for this classifier; the engine measures its argmax agreement
with float32 before it certifies with it.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

E4M3_MAX = 448.0


def _row_scaled(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) as float8_e4m3fn rows and the float32 (M, 1) scales that map them back."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / E4M3_MAX
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


class Fp8Linear(nn.Module):
    """nn.Linear with float8 weights (a scale per output channel) and float8 inputs (a scale per row)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight, scale = _row_scaled(linear.weight.detach())
        self.register_buffer("weight", weight)  # (out, in)
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, out)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, scale = _row_scaled(x.reshape(-1, x.shape[-1]))
        out = torch._scaled_mm(rows, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, out_dtype=torch.bfloat16)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])


def to_fp8(model: nn.Module) -> nn.Module:
    """A bfloat16 copy of `model` whose linear layers inside transformer blocks run in FP8.

    The classifier head and the patch embedding stay in bfloat16 (small, and first and last to touch the
    logits); FP8 matrix products need both dimensions to be multiples of 16.
    """
    model = copy.deepcopy(model).to(torch.bfloat16)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if (isinstance(child, nn.Linear) and ".blocks." in f".{full}." and child.in_features % 16 == 0
                    and child.out_features % 16 == 0):
                setattr(module, child_name, Fp8Linear(child))
    return model


def fp8_supported(device: torch.device) -> bool:
    """Does this CUDA device have FP8 tensor cores (compute capability 8.9 or newer)?"""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
