"""The torch device a command, trainer or backend runs on, checked before anything is put on it."""
from __future__ import annotations

import contextlib

import torch

from rrcm.errors import UserError


def resolve_device(name: str | torch.device | None) -> torch.device:
    """'auto' / None -> cuda when torch sees a GPU, else cpu. Otherwise cpu, cuda or cuda:N, which must exist."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {name!r} (cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r} is not supported (cpu, cuda or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for, but this torch sees no CUDA GPU; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r} asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor `t` on `device`; to a GPU through pinned memory without blocking, so that the copy does not
    wait for the work already queued there."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@contextlib.contextmanager
def full_fp32():
    """float32 matrix products and convolutions in full float32 on CUDA (no TF32), whatever the global settings:
    the classifier a user trained, not a TF32 approximation of it (cuDNN convolutions default to TF32)."""
    if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision"):
        flags = [(torch.backends.cuda.matmul, "fp32_precision", "ieee"), (torch.backends.cudnn.conv, "fp32_precision", "ieee")]
    else:  # torch before 2.9
        flags = [(torch.backends.cuda.matmul, "allow_tf32", False), (torch.backends.cudnn, "allow_tf32", False)]
    saved = [getattr(owner, name) for owner, name, _ in flags]
    for owner, name, value in flags:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(flags, saved):
            setattr(owner, name, value)
