"""TensorBoard logging of a training run (rank 0 only; the other ranks get a no-op).

Per step: loss, learning rate, gradient norm, throughput (samples/s over all ranks) and peak
memory. Per validation: relative error of the model and of persistence at each lead, and each
channel's RMSE beside persistence's — the same figures as ``metrics.jsonl``, browsable with
``tensorboard --logdir <runs>``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Tracker:
    """Writes scalars to ``<run_dir>/tensorboard`` when enabled on the main rank."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def step(self, step: int, values: dict[str, float]) -> None:
        """Record per-step scalars under ``train/``."""
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"train/{name}", value, step)

    def validation(self, step: int, result: dict[str, Any]) -> None:
        """Record relative errors per lead and per-channel RMSE of model and persistence."""
        if self.writer is None:
            return
        for lead, rel in result["relative_error"].items():
            self.writer.add_scalars(f"val/relative_error_{lead}", {k: float(v) for k, v in rel.items()}, step)
        for lead, per_channel in result["rmse"].items():
            for channel, value in per_channel.items():
                self.writer.add_scalars(f"val/rmse_{lead}/{channel}", {
                    "model": float(value), "persistence": float(result["persistence_rmse"][lead][channel])}, step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event files."""
        if self.writer is not None:
            self.writer.close()
