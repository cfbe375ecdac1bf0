"""Memory: how much a device has available, and whether a batch can fit in it, asked before the work starts.

The estimates are lower bounds (what a batch needs at the least), so a batch that is refused could not have
run; one that passes may still run out, and the commands turn that into a one-line error too.
"""
from __future__ import annotations

import os

import torch

from rrcm.errors import UserError
from rrcm.presets import ModelConfig

FLOAT_BYTES = 4


def _cgroup_room() -> int | None:
    """Memory left under this process's cgroup (v2) limit, if it has one."""
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current").read())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(int(limit) - used, 0)


def available_memory(device: str | torch.device) -> int | None:
    """Bytes available for new allocations on `device` (free GPU memory, or the host's MemAvailable within
    any cgroup limit); None where it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    room = []
    try:
        with open("/proc/meminfo") as f:
            room += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
            room.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    cgroup = _cgroup_room()
    if cgroup is not None:
        room.append(cgroup)
    return min(room) if room else None


def check_fits(need_bytes: int, what: str, device: str | torch.device, hint: str) -> None:
    """Refuse `what` when it needs more than `device` has available; `hint` says what to change."""
    free = available_memory(device)
    if free is not None and need_bytes > free:
        raise UserError(f"{what} needs at least {need_bytes / 2**30:,.1f} GiB of memory, {device} has "
                        f"{free / 2**30:,.1f} GiB available: {hint}")


def vit_training_bytes(cfg: ModelConfig, samples: int, parameters: int) -> int:
    """At least what training on `samples` images per step keeps in memory: the activations every block
    stores for the backward pass (float32; attention through fused kernels, so no tokens x tokens terms),
    and the parameters with their gradients and two AdamW moments."""
    tokens = cfg.num_patches + 2
    per_block = tokens * (6 * cfg.embed_dim + 2 * int(cfg.embed_dim * cfg.mlp_ratio))
    return FLOAT_BYTES * (samples * cfg.depth * per_block + 4 * parameters)
