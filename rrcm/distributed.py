"""Processes under torchrun: joining and leaving the process group, for every command that runs sharded.

Without torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) everything here describes a single
process, so training and certification have one path.
"""
from __future__ import annotations

import argparse
import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from rrcm.device import resolve_device
from rrcm.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str | torch.device | None = None, timeout: datetime.timedelta | None = None) -> DistEnv:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA, where each process takes the GPU of its
    LOCAL_RANK), or describe the single process. `timeout`: how long a collective waits (torch's default if None)."""
    device = resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistEnv(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started more processes on this machine than it has GPUs ({torch.cuda.device_count()}): "
                            "give --nproc-per-node at most that, or --device cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return DistEnv(rank, world_size, local_rank, device)


def teardown(finished: bool = True) -> None:
    """Leave the process group, if any. A process that `finished` its work waits for the others first."""
    if not dist.is_initialized():
        return
    # Leaving together: a process that tore its group down while rank 0 was still writing a checkpoint
    # has been seen to abort on exit. No barrier after an error: that process would wait for the others
    # forever, where leaving lets torchrun stop them.
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def on_rank_zero(rank: int, world_size: int, fn: Callable[[], Any]) -> Any:
    """fn() on rank 0; its result (or its UserError, raised again on every rank) is shared with every rank,
    so that a check made once refuses the whole job together."""
    if world_size == 1:
        return fn()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except UserError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise UserError(value)
    return value


def run_in_process_group(train: Callable[[argparse.Namespace, DistEnv], int], args: argparse.Namespace) -> int:
    """`train(args, env)` inside the process group of `setup(args.device)`, left again however it ends."""
    env = setup(args.device)
    finished = False
    try:
        status = train(args, env)
        finished = True
        return status
    finally:
        teardown(finished)
