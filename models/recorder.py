"""Rank 0's side effects during training: ``metrics.jsonl`` lines and the two checkpoint files.

``metrics.jsonl`` is append-only: every attempt of a run starts with a ``start`` record (fresh) or
a ``resume`` record (continuing ``last.pt``), so lines of a killed attempt stay visible and the
records after the last ``start`` describe the current run. Each checkpoint write appends a
``checkpoint`` record once the file is in place.

Files: ``checkpoint.pt`` holds the best validation score (the inference file the pipeline
registers), ``last.pt`` the newest state (always resumable). A new best is written *before*
``last.pt``: if the process dies in between, ``last.pt`` still points before that validation and
the resumed run repeats it, so the best file is never older than the best score ``last.pt`` records.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from core.config import dump_config
from models.checkpoint import build_meta, save_checkpoint

if TYPE_CHECKING:
    from models.resume import Position
    from models.train import Setup

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "checkpoint.pt"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this rank so far: CUDA allocator peak on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def remove_stale_temps(run_dir: Path) -> list[Path]:
    """Delete temp files a killed checkpoint write left behind (``.last.pt.<pid>.tmp``)."""
    stale = [p for name in (LAST, BEST) for p in run_dir.glob(f".{name}.*.tmp")]
    for p in stale:
        p.unlink(missing_ok=True)
        log.info("removed %s left by an interrupted checkpoint write", p)
    return stale


class Recorder:
    """Metrics lines and checkpoints, written by rank 0 only (other ranks' calls do nothing)."""

    def __init__(self, s: Setup, start: dict[str, Any]) -> None:
        self.s = s
        self.metrics = s.run_dir / "metrics.jsonl"
        if s.ctx.is_main:
            s.run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(s.run_dir)
            self.append({**start, "world_size": s.ctx.world_size, "grid": s.grid.describe(),
                         "train_windows": len(s.train_ds), "val_windows": len(s.val_ds),
                         "dataset_version": s.dataset_version, "config": dump_config(s.config)})

    def append(self, record: dict[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl`` (rank 0 only)."""
        if self.s.ctx.is_main:
            with open(self.metrics, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def save(self, step: int, training: dict[str, Any] | None, reason: str, score: float | None = None,
             best: bool = False) -> None:
        """Write ``checkpoint.pt`` when ``best``, then ``last.pt``, each atomically (rank 0 only)."""
        if not self.s.ctx.is_main:
            return
        model = self.s.model
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        meta = build_meta(self.s.config, self.s.stats, self.s.grid, model.core.arch, state, step, self.s.dataset_version)
        if score is not None:
            meta["val_score"] = score
        if best:
            save_checkpoint(self.s.run_dir / BEST, model, meta, training)
            log.info("step %d: new best validation score %.4f → %s", step, score, self.s.run_dir / BEST)
        save_checkpoint(self.s.run_dir / LAST, model, meta, training)
        self.append({"event": "checkpoint", "step": step, "reason": reason, "best": best})


def start_record(s: Setup, pos: Position) -> dict[str, Any]:
    """The first metrics line of an attempt: ``start`` for a fresh run, ``resume`` with where it continues."""
    if s.resume is None:
        return {"event": "start", "resume": s.config.train.resume}
    log.info("resuming %s at step %d (epoch %d, batch %d, %.0f s of budget used); written by %d rank(s), now %d",
             s.run_dir / LAST, pos.step, pos.epoch, pos.batch, pos.elapsed_s, s.resume["world_size"], s.ctx.world_size)
    return {"event": "resume", "step": pos.step, "epoch": pos.epoch, "batch_in_epoch": pos.batch,
            "elapsed_s": round(pos.elapsed_s, 2), "previous_world_size": s.resume["world_size"]}
