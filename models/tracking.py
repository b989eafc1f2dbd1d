"""TensorBoard logging of a training run (rank 0 only; the other ranks get a no-op).

Per step: loss, learning rate, gradient norm, throughput (samples/s over all ranks) and peak
memory. Per validation: relative error of the model and of persistence at each lead, and each
channel's RMSE beside persistence's — the same figures as ``metrics.jsonl``, browsable with
``tensorboard --logdir <runs>``. The same scalars also go to MLflow when a sink is given
(:mod:`models.tracking_mlflow`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from models.tracking_mlflow import MlflowSink

log = logging.getLogger(__name__)


class Tracker:
    """Writes scalars to ``<run_dir>/tensorboard`` when enabled on the main rank, and to MLflow if given."""

    def __init__(self, run_dir: Path, enabled: bool, mlflow: MlflowSink | None = None,
                 resumed_step: int | None = None) -> None:
        self.writer = None
        self.mlflow = mlflow
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run drops what a killed attempt logged after its checkpoint (those steps are redone).
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=resumed_step)

    def step(self, step: int, values: dict[str, float]) -> None:
        """Record per-step scalars under ``train/``."""
        if self.mlflow is not None:
            self.mlflow.metrics(step, {f"train/{k}": v for k, v in values.items()})
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"train/{name}", value, step)

    def validation(self, step: int, result: dict[str, Any]) -> None:
        """Record relative errors per lead and per-channel RMSE of model and persistence."""
        if self.mlflow is not None:
            flat = {f"val/relative_error_{lead}/{k}": float(v)
                    for lead, rel in result["relative_error"].items() for k, v in rel.items()}
            flat.update({f"val/rmse_{lead}/{ch}": float(v) for lead, per in result["rmse"].items() for ch, v in per.items()})
            self.mlflow.metrics(step, flat)
        if self.writer is None:
            return
        for lead, rel in result["relative_error"].items():
            self.writer.add_scalars(f"val/relative_error_{lead}", {k: float(v) for k, v in rel.items()}, step)
        for lead, per_channel in result["rmse"].items():
            for channel, value in per_channel.items():
                self.writer.add_scalars(f"val/rmse_{lead}/{channel}", {
                    "model": float(value), "persistence": float(result["persistence_rmse"][lead][channel])}, step)
        self.writer.flush()

    def close(self, outcome: dict[str, str] | None = None, failed: bool = False) -> None:
        """Flush and close the event files; end the MLflow run with ``outcome`` as tags."""
        if self.mlflow is not None:
            self.mlflow.finish(outcome or {}, failed)
        if self.writer is not None:
            self.writer.close()
