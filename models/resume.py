"""Exact resume: the training state in ``last.pt``, checking it fits the run, and putting it back.

``last.pt`` is a checkpoint (``meta`` + ``model``) whose ``training`` dict holds everything else an
uninterrupted run would still have in memory: optimizer, learning-rate schedule, AMP loss scale,
:class:`Position` (step, epoch, global batches consumed in the epoch, wall time used, next
validation point, best score), non-finite guard counters, and per rank its RNG streams and DDP hook
memories (``rng`` and ``comm_hook``: one entry per rank, gathered to rank 0, so the whole set lands
in one atomic rename).

The data position is counted in *global* batches. ``DistributedSampler(shuffle, drop_last)`` deals
rank ``r`` the elements ``r, r+W, r+2W, …`` of the epoch's permutation (which depends on seed and
epoch only), so with ``b = B/W`` per rank the union of the ranks' ``j``-th batches is the permutation
slice ``[jB, (j+1)B)`` for every world size ``W`` dividing ``B``, and an epoch has ``⌊N/B⌋`` batches
whatever ``W`` is. A position written by 2 ranks therefore means the same samples on 1 or 4.
What cannot map across world sizes are per-rank streams: then each rank reseeds from
``(seed, step, rank)`` and hook memories restart, with a warning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from core.config import Config
from core.config_model import ModelConfig
from core.errors import ConfigError, DataContractError
from core.schema import validate_checkpoint_meta
from models.checkpoint import read_checkpoint, state_dict_sha256
from models.ddp import is_ddp
from models.distributed import DistContext
from models.guards import NonFiniteGuard
from models.rank_state import (
    broadcast_from_main,
    gather_to_main,
    hook_state,
    load_hook_state,
    prime_buckets,
    reseed,
    reset_hook_state,
    rng_state,
    set_rng_state,
)
from models.schedule import BudgetCosine
from models.sfno import complete_arch

log = logging.getLogger(__name__)

FORMAT = 1  # layout of the ``training`` dict; older files are refused with a clear message
HINT = "use a new train.run_name, or set train.resume=never to start this run over"


@dataclass
class Position:
    """Where the loop stands; saved with every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # global batches of the current epoch already consumed
    elapsed_s: float = 0.0  # training wall time of earlier attempts (the budget is their total)
    next_val: float = 0.1
    val_step: int = -1
    best: float = math.inf
    saved_step: int = field(default=-1, compare=False)  # this attempt only: the step of the newest checkpoint

    def as_dict(self, elapsed_s: float) -> dict[str, Any]:
        """JSON-ready state with the wall time used so far."""
        d = asdict(self)
        d.pop("saved_step")
        return {**d, "elapsed_s": float(elapsed_s)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Position:
        """Restore :meth:`as_dict`; the restored step counts as saved."""
        pos = cls(**d)
        pos.saved_step = pos.step
        return pos


class ResumableSampler(DistributedSampler):
    """``DistributedSampler(shuffle, drop_last)`` whose next epoch can start ``n`` batches in, loading nothing skipped."""

    def __init__(self, dataset: Dataset, ctx: DistContext, seed: int, per_rank_batch: int) -> None:
        super().__init__(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed, drop_last=True)
        self.per_rank_batch = per_rank_batch
        self._skip = 0

    def skip_batches(self, n: int) -> None:
        """Make the next iteration start after ``n`` batches (once)."""
        self._skip = n

    def __iter__(self) -> Iterator[int]:
        """This rank's indices of the epoch, minus the skipped batches' (slicing the index list only)."""
        indices = list(super().__iter__())
        skip, self._skip = self._skip * self.per_rank_batch, 0
        return iter(indices[skip:])


def data_signature(config: Config, train_windows: int) -> dict[str, Any]:
    """What fixes the order and content of the batches, and the weight averaging: a resumed run must see the same."""
    t = config.train
    return {"batch_size": t.batch_size, "seed": t.seed, "rollout_steps": t.rollout_steps,
            "train_start": t.train_start.isoformat(), "train_end": t.train_end.isoformat(),
            "train_windows": int(train_windows),
            "ema_decay": t.ema_decay, **({"ema_start": t.ema_start} if t.ema_decay > 0 else {})}


# What a last.pt written before a signature key existed had: an older file still resumes a run that does not average.
_SIGNATURE_DEFAULTS = {"ema_decay": 0.0}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list) and a and all(isinstance(v, float) for v in a + b):
        return len(a) == len(b) and bool(np.allclose(a, b, rtol=1e-6, atol=0.0))
    return a == b


def _differences(meta: dict[str, Any], data: dict[str, Any], expected: dict[str, Any],
                 signature: dict[str, Any]) -> Iterator[tuple[str, Any, Any]]:
    yield "task.channels", meta.get("channels"), expected["channels"]
    yield "grid", meta.get("grid"), expected["grid"]
    # The task first: a changed history, clock or static field is the reason the architecture's inputs differ.
    for section, label in (("task", "task.{}"), ("model", "model.{}"), ("arch", "model architecture {}")):
        old, new = meta.get(section, {}), expected[section]
        if section == "model":  # options added since that checkpoint took their defaults
            old = {**ModelConfig().model_dump(), **old}
        elif section == "arch":
            old = complete_arch(old)
        else:  # task fields added since that checkpoint (static_fields, time_features) took their defaults
            old = {"static_fields": [], "time_features": [], "pole_rows": "free", **old}
        for key in sorted(set(old) | set(new)):
            yield label.format(key), old.get(key), new.get(key)
    yield "pole_modes (the form of the training data's pole rows)", meta.get("pole_modes"), expected.get("pole_modes")
    yield "dataset_version", meta.get("dataset_version"), expected["dataset_version"]
    for key in ("mean", "std", "diff_std"):
        yield f"stats {key}", meta.get("stats", {}).get(key), expected["stats"][key]
    yield "stats period", meta.get("stats_period"), expected["stats_period"]
    for key, value in signature.items():
        old = data.get(key, _SIGNATURE_DEFAULTS.get(key))
        yield ("training windows" if key == "train_windows" else f"train.{key}"), old, value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 160 else text[:157] + "…"


def check_compatible(path: Path, meta: dict[str, Any], data: dict[str, Any], expected: dict[str, Any],
                     signature: dict[str, Any]) -> None:
    """ValueError naming the first field where the checkpoint and this run differ, with both values."""
    for name, old, new in _differences(meta, data, expected, signature):
        if not _same(old, new):
            raise ConfigError(f"cannot resume {path}: {name} is {_short(old)} in the checkpoint but {_short(new)} "
                              f"in this run's config and data; {HINT}")


def read_resumable(path: Path, expected: dict[str, Any], signature: dict[str, Any]) -> dict[str, Any]:
    """Load ``last.pt`` and check it can continue this run; ValueError (with a hint) otherwise."""
    try:
        obj = read_checkpoint(path)
    except ValueError as exc:
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        detail = f"{type(cause).__name__}: {str(cause).splitlines()[0][:120]}" if str(cause) else type(cause).__name__
        raise DataContractError(f"cannot resume {path}: the file is corrupt or unreadable ({detail}). Refusing to start "
                                f"over on top of it: move it away, {HINT}") from exc
    training = obj.get("training")
    if not isinstance(training, dict) or training.get("format") != FORMAT:
        found = training.get("format") if isinstance(training, dict) else None
        raise DataContractError(f"cannot resume {path}: it holds no training state of format {FORMAT} (found {found!r}); "
                                f"{HINT}")
    meta = dict(obj["meta"])
    validate_checkpoint_meta(meta, what=f"checkpoint {path}")
    if state_dict_sha256(obj["model"]) != meta["weights_sha256"]:
        raise DataContractError(f"cannot resume {path}: its weights do not match their weights_sha256 (corrupt); {HINT}")
    check_compatible(path, meta, training.get("data", {}), expected, signature)
    return obj


def load_resumable(path: Path, expected: dict[str, Any], signature: dict[str, Any],
                   ctx: DistContext) -> dict[str, Any] | None:
    """Rank 0 reads and checks ``path``; every rank gets the checkpoint (None if absent) or the same ValueError."""
    payload: tuple[str, Any] = ("ok", None)
    if ctx.is_main and path.exists():
        try:
            payload = ("ok", read_resumable(path, expected, signature))
        except ValueError as exc:
            payload = ("error", str(exc))
    payload = broadcast_from_main(payload, ctx)
    if payload[0] == "error":
        raise DataContractError(payload[1])
    return payload[1]


@dataclass
class TrainingParts:
    """The live objects whose state a checkpoint carries."""

    ctx: DistContext
    model: nn.Module  # the Normalized model: parameter names come from here
    rollout: nn.Module  # what the loop calls (DDP-wrapped when distributed)
    optimizer: torch.optim.Optimizer
    schedule: BudgetCosine
    scaler: torch.amp.GradScaler | None
    guard: NonFiniteGuard
    signature: dict[str, Any]
    seed: int

    @property
    def names(self) -> dict[int, str]:
        """Parameter identity → stable name."""
        return {id(p): n for n, p in self.model.named_parameters()}


def capture(parts: TrainingParts, position: dict[str, Any]) -> dict[str, Any] | None:
    """The ``training`` dict (with ``position``, a :meth:`Position.as_dict`) on rank 0, None elsewhere; a collective."""
    ctx = parts.ctx
    distributed = ctx.distributed and is_ddp(parts.rollout)
    mine = {"rng": rng_state(ctx.device), "hook": hook_state(parts.rollout, parts.names) if distributed else None}
    ranks = gather_to_main(mine, ctx)
    if ranks is None:
        return None
    return {"format": FORMAT, "optimizer": parts.optimizer.state_dict(), "scheduler": parts.schedule.state_dict(),
            "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
            "position": position, "guard": {"skipped": parts.guard.skipped,
                                                          "in_a_row": parts.guard.in_a_row},
            "world_size": ctx.world_size, "rng": [r["rng"] for r in ranks],
            "comm_hook": [r["hook"] for r in ranks], "data": parts.signature}


def restore(parts: TrainingParts, training: dict[str, Any], prime_input: torch.Tensor, prime_steps: int) -> None:
    """Put a ``training`` dict back into the live objects; the loop reads its ``position`` itself.

    Model weights are loaded before DDP wraps the model (so every rank starts from rank 0's file).
    """
    ctx = parts.ctx
    parts.optimizer.load_state_dict(training["optimizer"])
    parts.schedule.load_state_dict(training["scheduler"])
    if parts.scaler is not None:
        if training.get("scaler"):
            parts.scaler.load_state_dict(training["scaler"])
        else:
            log.warning("the checkpoint has no AMP loss scale (written without fp16): the scale starts afresh")
    parts.guard.skipped, parts.guard.in_a_row = training["guard"]["skipped"], training["guard"]["in_a_row"]
    same_world = training["world_size"] == ctx.world_size
    if ctx.distributed and is_ddp(parts.rollout):
        saved_hook = training["comm_hook"][ctx.rank] if same_world else None
        if saved_hook is not None:
            if saved_hook["kind"] != "none":  # memories laid out by bucket: let DDP rebuild its buckets first
                prime_buckets(parts.rollout, prime_input, prime_steps)
            load_hook_state(parts.rollout, saved_hook, parts.names, ctx.device)
        else:
            reset_hook_state(parts.rollout, next((h for h in training["comm_hook"] if h), None))
    if same_world:
        set_rng_state(training["rng"][ctx.rank], ctx.device)
    else:
        value = reseed(parts.seed, int(training["position"]["step"]), ctx.rank)
        if ctx.is_main:
            log.warning("resuming %d-rank state on %d ranks: RNG streams reseeded from (seed, step, rank) (%d on "
                        "rank 0) and DDP hook memories restarted; the data position carries over exactly",
                        training["world_size"], ctx.world_size, value)
