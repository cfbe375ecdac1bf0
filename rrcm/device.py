"""The torch device a command, trainer or backend runs on, checked before anything is put on it."""
from __future__ import annotations

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
