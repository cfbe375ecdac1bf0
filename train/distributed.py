"""Data parallelism under torchrun: gathered contrastive keys, shared draws, global BatchNorm.

Outside a process group (one process: see rrcm.distributed) every collective is the identity, so the
training code has one path.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def gather_keys(t: torch.Tensor) -> torch.Tensor:
    """Every process's (B, ...) stop-gradient keys, concatenated in rank order: (world * B, ...).

    This process's own keys sit at offset rank * B. Keys carry no gradient, so a plain all_gather
    suffices: each process differentiates its own queries, and DDP's gradient average then equals
    the gradient of the mean loss over the global batch.
    """
    t = t.detach().contiguous()
    if not _active():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean over processes (a copy; for logging)."""
    values = values.detach().clone()
    if _active():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose backward sums the incoming gradients the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are over the global batch (all processes).

    The projection head's BatchNorm must see the same batch as a single process would, or the
    data-parallel loss is not the loss of the global batch. torch's SyncBatchNorm is GPU-only;
    this one reduces (sum, sum of squares, count) with a differentiable all_reduce on any backend.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _active()):
            return super().forward(x)
        xf = x.float()
        stats = torch.cat([xf.sum(0), (xf * xf).sum(0), xf.new_tensor([len(xf)])])
        stats = _AllReduceSum.apply(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.num_batches_tracked += 1
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def global_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm1d replaced, in place, by a GlobalBatchNorm1d holding the same state.

    Call it before moving the module to its device.
    """
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            new = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            global_batchnorm(child)
    return module
