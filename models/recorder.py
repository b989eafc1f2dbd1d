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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import save_checkpoint
from models.normalization import Normalized

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "checkpoint.pt"

# ``(cpu state_dict, train step) -> checkpoint meta``: what the run knows about itself (models.checkpoint.build_meta).
Describe = Callable[[Mapping[str, torch.Tensor], int], dict[str, Any]]


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
    """Metrics lines and checkpoints of one run directory, written by rank 0 only (other ranks' calls do nothing)."""

    def __init__(self, run_dir: Path, is_main: bool, model: Normalized, describe: Describe,
                 start: dict[str, Any]) -> None:
        self.run_dir, self.is_main, self.model, self.describe = run_dir, is_main, model, describe
        self.metrics = run_dir / "metrics.jsonl"
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(run_dir)
            self.append(start)

    def append(self, record: dict[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl`` (rank 0 only)."""
        if self.is_main:
            with open(self.metrics, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def save(self, step: int, training: dict[str, Any] | None, reason: str, score: float | None = None,
             best: bool = False) -> None:
        """Write ``checkpoint.pt`` when ``best``, then ``last.pt``, each atomically (rank 0 only)."""
        if not self.is_main:
            return
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        meta = self.describe(state, step)
        if score is not None:
            meta["val_score"] = score
        if best:
            save_checkpoint(self.run_dir / BEST, self.model, meta, training)
            log.info("step %d: new best validation score %.4f → %s", step, score, self.run_dir / BEST)
        save_checkpoint(self.run_dir / LAST, self.model, meta, training)
        self.append({"event": "checkpoint", "step": step, "reason": reason, "best": best})
