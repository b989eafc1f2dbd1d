"""torchrun plumbing: process group from the environment, thread budget, and rank-0 decisions.

torchrun sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``; without them the
process is a world of one and no process group is created (plain in-process training).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that logs, validates the stop decision and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is in use."""
        return self.world_size > 1


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when absent)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """Split the global batch over ranks; ``ValueError`` if it does not divide evenly."""
    if global_batch % world_size:
        raise ValueError(f"train.batch_size {global_batch} is not divisible by the world size {world_size}; "
                         f"use a multiple of {world_size}")
    return global_batch // world_size


def init_distributed() -> DistContext:
    """Join the torchrun process group if ``WORLD_SIZE > 1`` (nccl with CUDA, else gloo)."""
    world = world_size_from_env()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=10))
        log.info("rank %d/%d joined the %s process group", rank, world, backend)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shutdown_distributed(ctx: DistContext, clean: bool = True) -> None:
    """Leave the process group; after a barrier when ``clean`` (on errors peers may never arrive)."""
    if ctx.distributed and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def set_threads(requested: int, world_size: int) -> int:
    """Set torch intra-op threads: ``requested``, or the usable cores shared over the local ranks."""
    if requested > 0:
        n = requested
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
        n = max(1, cores // max(1, local))
    torch.set_num_threads(n)
    return n


def broadcast_floats(values: list[float], ctx: DistContext) -> list[float]:
    """Rank 0's ``values`` on every rank (so all ranks take the same decisions)."""
    if not ctx.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.broadcast(t, src=0)
    return t.tolist()


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a tensor over ranks in place and return it."""
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
