"""What each rank holds privately between steps — RNG streams and DDP hook memories — and moving it to/from rank 0.

A checkpoint is written by rank 0 alone, so every rank's private state is gathered to rank 0 first
(:func:`gather_to_main`, a collective) and written in the same file as the weights: the set is
consistent by construction (one atomic rename). On resume rank 0 reads the file and broadcasts it.

Everything is converted to tensors and plain Python values so that ``torch.load(weights_only=True)``
can read it back (no pickled NumPy or PowerSGD objects).

**Hook memories and DDP buckets.** PowerSGD keys its error-feedback and warm-start memories by bucket
index, and both hooks see one flat buffer per bucket. DDP builds its buckets in parameter order and
rebuilds them once, after the first iteration, in gradient-ready order; a resumed process would
start in the first layout. :func:`prime_buckets` runs the two throw-away iterations (zero loss,
gradients discarded) that make DDP rebuild, so restored memories meet the layout they were saved
with. signSGD residuals are kept per parameter and saved by parameter name.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState

from models.comm_hooks import CommStats, SignSGDState
from models.ddp import comm_hook_states, gradient_buckets
from models.distributed import DistContext

log = logging.getLogger(__name__)

_POWERSGD_MEMORIES = ("error_dict", "p_memory_dict", "q_memory_dict")


# ---- RNG streams ---------------------------------------------------------------------------------

def _np_state_to_saved(state: tuple[Any, ...]) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _np_state_from_saved(saved: dict[str, Any]) -> tuple[Any, ...]:
    keys = saved["keys"].numpy().astype(np.uint32)
    return saved["name"], keys, saved["pos"], saved["has_gauss"], saved["cached"]


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG stream of this process: torch CPU, CUDA (if used), Python ``random`` and NumPy's global."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss],
                             "numpy": _np_state_to_saved(np.random.get_state())}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(_np_state_from_saved(state["numpy"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def reseed(seed: int, step: int, rank: int) -> int:
    """Seed every RNG from ``(seed, step, rank)`` (used when saved streams cannot map onto these ranks)."""
    value = ((seed * 1_000_003 + step) * 10_007 + rank) % 2**63
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)  # seeds CUDA too
    return value


# ---- DDP communication hook memories -------------------------------------------------------------

def _kind_and_state(ddp: nn.Module) -> tuple[str, Any, CommStats | None]:
    # Our counted wrappers keep torch's own hook state in ``.inner``.
    for state in comm_hook_states(ddp):
        if isinstance(state, SignSGDState):
            return "signsgd", state, state.stats
        inner, stats = getattr(state, "inner", None), getattr(state, "stats", None)
        if isinstance(inner, PowerSGDState):
            return "powersgd", inner, stats
        return "none", None, stats
    return "none", None, None


def bucket_layout(ddp: nn.Module, names: dict[int, str]) -> list[list[str]]:
    """Parameter names per DDP gradient bucket, in bucket order (what hook memories are laid out by)."""
    return [[names[id(p)] for p in bucket] for bucket in gradient_buckets(ddp)]


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def hook_state(ddp: nn.Module, names: dict[int, str]) -> dict[str, Any]:
    """This rank's hook memories and byte counters, keyed by parameter name or bucket index with the layout."""
    kind, state, stats = _kind_and_state(ddp)
    # Only PowerSGD's memories follow the bucket layout (and listing it allocates a zero copy of every bucket).
    out: dict[str, Any] = {"kind": kind, "layout": bucket_layout(ddp, names) if kind == "powersgd" else []}
    if stats is not None:
        out["stats"] = {"steps": stats.steps, "total_bytes": stats.total_bytes}
    if kind == "signsgd":
        out["residuals"] = {names[pid]: _to_cpu(t) for pid, t in state.residuals.items()}
    elif kind == "powersgd":
        slots = {slot: getattr(state, slot) for slot in PowerSGDState.__slots__ if slot not in ("process_group", "rng")}
        out["powersgd"] = _to_cpu(slots)
        out["powersgd_rng"] = _np_state_to_saved(state.rng.get_state())
    return out


def load_hook_state(ddp: nn.Module, saved: dict[str, Any], names: dict[int, str], device: torch.device) -> bool:
    """Put saved hook memories back (after :func:`prime_buckets`); False (and a reset) when they cannot fit."""
    kind, state, stats = _kind_and_state(ddp)
    if stats is not None and "stats" in saved:
        stats.steps, stats.total_bytes = saved["stats"]["steps"], saved["stats"]["total_bytes"]
    if kind != saved["kind"]:
        log.warning("train.comm_hook is %r but the checkpoint was written with %r: the hook starts afresh", kind,
                    saved["kind"])
        reset_hook_state(ddp, saved)
        return False
    if kind == "signsgd":
        by_name = {n: pid for pid, n in names.items()}
        state.residuals = {by_name[n]: t.to(device) for n, t in saved["residuals"].items()}
    elif kind == "powersgd":
        if saved["layout"] != bucket_layout(ddp, names):
            log.warning("DDP's gradient buckets differ from the checkpoint's: PowerSGD restarts its memories")
            reset_hook_state(ddp, saved)
            return False
        for slot, value in saved["powersgd"].items():
            setattr(state, slot, _to_device(value, device))
        state.rng.set_state(_np_state_from_saved(saved["powersgd_rng"]))
    return True


def reset_hook_state(ddp: nn.Module, saved: dict[str, Any] | None = None) -> None:
    """Forget hook memories: signSGD residuals; PowerSGD memories, with 2 plain all-reduce steps to re-bucket."""
    kind, state, _ = _kind_and_state(ddp)
    if kind == "signsgd":
        state.residuals = {}
    elif kind == "powersgd":
        for slot in _POWERSGD_MEMORIES:
            setattr(state, slot, {})
        done = int(saved["powersgd"]["iter"]) if saved and saved.get("kind") == "powersgd" else state.iter
        # Compressing resumes after two plain steps: DDP rebuilds its buckets after the first one.
        state.iter = done
        state.start_powerSGD_iter = max(state.start_powerSGD_iter, done + 2)


def prime_buckets(rollout: nn.Module, x0: torch.Tensor, steps: int) -> None:
    """Two throw-away DDP iterations (zero loss, gradients dropped) so DDP rebuilds its buckets as a fresh run does."""
    for _ in range(2):
        loss = rollout(x0, steps).float().sum() * 0.0
        loss.backward()
    for p in rollout.parameters():
        p.grad = None


# ---- moving per-rank objects ---------------------------------------------------------------------

def gather_to_main(obj: Any, ctx: DistContext) -> list[Any] | None:
    """Every rank's ``obj`` as a list on rank 0 (None elsewhere); a collective: all ranks must call it."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank; a collective."""
    if not ctx.distributed:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
