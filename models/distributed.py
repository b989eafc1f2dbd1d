"""torchrun plumbing: each rank's device, the process group from the environment, thread budget, rank-0 decisions.

torchrun sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``. A process started by
torchrun always joins a process group — nccl on CUDA, gloo on the CPU — also as the only rank, so one
GPU trains through the same DDP and nccl path as eight. Without those variables the process is a world
of one and no process group is created (plain in-process training).
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from core.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None = None  # of the process group this rank joined (nccl or gloo); None without one

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that logs, validates the stop decision and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is in use: under torchrun (any world size), or with more than one rank."""
        return self.backend is not None or self.world_size > 1


TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")


def launched_by_torchrun() -> bool:
    """True when torchrun's variables are set: this process is a rank of a job and joins its process group."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when absent)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """Split the global batch over ranks; ``ValueError`` if it does not divide evenly."""
    if global_batch % world_size:
        raise ConfigError(f"train.batch_size {global_batch} is not divisible by the world size {world_size}; "
                          f"use a multiple of {world_size}")
    return global_batch // world_size


def device_kind(requested: str = "auto") -> str:
    """``cuda`` or ``cpu`` for a ``train.device`` setting; ValueError for ``cuda`` where CUDA is absent."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device is {requested!r}; use auto, cpu or cuda")
    if requested == "cpu":
        return "cpu"  # even where CUDA exists: no CUDA call is made for this run
    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        why = ("this torch build has no CUDA" if torch.version.cuda is None
               else f"torch (CUDA {torch.version.cuda}) sees no GPU (check the driver and CUDA_VISIBLE_DEVICES)")
        raise ConfigError(f"train.device is 'cuda' but {why}; use train.device cpu or auto (cuda where it exists)")
    return "cpu"


def check_gpu_ranks(ranks_per_node: int, setting: str = "train.nproc_per_node", device: str = "auto") -> None:
    """ValueError when ranks train on CUDA (``device``: a ``train.device`` setting) and outnumber the visible GPUs."""
    if device_kind(device) != "cuda":
        return  # CPU ranks: gloo runs any number of processes
    visible = torch.cuda.device_count()
    if ranks_per_node > visible:
        raise ConfigError(f"{setting} is {ranks_per_node} but {visible} GPU(s) are visible here (after "
                          f"CUDA_VISIBLE_DEVICES); each rank trains on its own GPU, so use 1..{visible} ranks per node")


def wait_for_endpoint(endpoint: str, timeout_s: float) -> None:
    """Return once ``endpoint`` (host:port) accepts a TCP connection; ConfigError naming it after ``timeout_s``."""
    host, _, port = endpoint.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout_s)):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ConfigError(f"rendezvous endpoint {endpoint} (train.rdzv_endpoint) did not answer within "
                                  f"{timeout_s:g} s (train.rdzv_timeout_s): {exc.strerror or exc}; start node 0 "
                                  "(--node-rank 0) on that host first, or fix the host:port") from None
        time.sleep(0.5)


def select_device(requested: str = "auto") -> torch.device:
    """This rank's device for ``train.device`` — ``cuda:LOCAL_RANK``, made the current CUDA device — or the CPU."""
    if device_kind(requested) == "cpu":
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # torchrun sets LOCAL_WORLD_SIZE; a rank without a GPU of its own would fail later inside CUDA or nccl.
    check_gpu_ranks(int(os.environ.get("LOCAL_WORLD_SIZE", str(local_rank + 1))), "torchrun --nproc-per-node")
    device = torch.device("cuda", local_rank)
    # The only set_device of a run: nccl, autocast, pinned memory and bare .cuda() calls all use the current device.
    torch.cuda.set_device(device)
    return device


def backend_for(device: torch.device) -> str:
    """The process-group backend for ranks on ``device``: nccl for CUDA, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group under torchrun (or with ``WORLD_SIZE > 1``), backend from ``device``; this rank's context."""
    world = world_size_from_env()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = None
    # A lone torchrun rank joins too: DDP and nccl then run on one GPU exactly as on many.
    if world > 1 or launched_by_torchrun():
        if not dist.is_initialized():
            dist.init_process_group(backend=backend_for(device), timeout=timedelta(minutes=10))
            log.info("rank %d/%d joined the %s process group", rank, world, backend_for(device))
        backend = str(dist.get_backend())
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)


def check_nodes_agree(ctx: DistContext, nnodes: int, node_rank: int) -> None:
    """Fail on every rank, before anything is written, unless all nodes were started for the world that formed."""
    nodes = os.environ.get("GROUP_WORLD_SIZE")
    if not ctx.distributed or nodes is None:
        return
    # torchrun's c10d rendezvous completes as soon as the joiner that fills *its own* --nnodes arrives, so a
    # node started with --nnodes 2 beside one started with 3 forms a world of 2: compare before training.
    mine = torch.tensor([nnodes, node_rank], dtype=torch.int64, device=ctx.device)
    every = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(every, mine)
    said = sorted({(int(n), int(g)) for n, g in (t.tolist() for t in every)}, key=lambda x: x[1])
    if any(n != int(nodes) for n, _ in said):
        started = ", ".join(f"node {r} with --nnodes {n}" for n, r in said)  # --node-rank, as the user set it
        raise ConfigError(f"nodes disagree on train.nnodes: the rendezvous formed a world of {nodes} nodes from "
                          f"{started}; start every node with the same --nnodes")
    ranks = sorted({r for _, r in said})
    if len(ranks) != int(nodes):  # two node 0s would both write config.yaml and register the checkpoint
        raise ConfigError(f"nodes share a --node-rank: a world of {nodes} nodes holds only node ranks {ranks}; give "
                          f"each node its own --node-rank in 0..{int(nodes) - 1}")


def shutdown_distributed(ctx: DistContext, clean: bool = True) -> None:
    """Leave the process group; after a barrier when ``clean`` (on errors peers may never arrive)."""
    if ctx.distributed and dist.is_initialized():
        if clean:
            dist.barrier()
        # DDP wrappers sit in reference cycles, so they are freed at some later collection; free them
        # now, while their group exists: a wrapper torn down after its group can abort a caller that
        # lives on (an in-process train() in a test session; a pytest run once died so, SIGABRT).
        gc.collect()
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
