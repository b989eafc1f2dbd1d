"""Optional MLflow tracking of a training run (rank 0): params, per-step and validation metrics, the result.

Enabled by ``train.mlflow_tracking_uri`` (e.g. ``sqlite:///mlflow.db`` or ``http://host:5000``);
``mlflow`` (the ``mlflow-skinny`` client is enough) is imported only then. One MLflow run per
spherecast run directory: its id is kept in ``<run_dir>/mlflow_run.json`` so a resumed training
keeps logging into the same MLflow run instead of starting a second one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.errors import ConfigError

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.1}}`` → ``{"train.lr": "0.1"}`` (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value, default=str) if not isinstance(value, str) else value
    return out


class MlflowSink:
    """Logs to one MLflow run; created on rank 0 only."""

    def __init__(self, tracking_uri: str, experiment: str, run_dir: Path, run_name: str,
                 params: Mapping[str, Any], tags: Mapping[str, str], resume: bool) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise ConfigError("train.mlflow_tracking_uri is set but mlflow is not installed "
                              "(pip install mlflow-skinny)") from exc
        self.client = MlflowClient(tracking_uri)
        record = Path(run_dir) / RUN_FILE
        previous = json.loads(record.read_text()) if resume and record.is_file() else None
        if previous and previous.get("tracking_uri") == tracking_uri:
            self.run_id = previous["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            log.info("MLflow: resuming run %s at %s", self.run_id, tracking_uri)
            return
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=(Path(run_dir) / "mlflow-artifacts").resolve().as_uri())
        run = self.client.create_run(exp_id, run_name=run_name, tags=dict(tags))
        self.run_id = run.info.run_id
        flat = flatten(params)
        # log_batch takes at most 100 params per call.
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"tracking_uri": tracking_uri, "run_id": self.run_id, "experiment": experiment}))
        log.info("MLflow: run %s in experiment %r at %s", self.run_id, experiment, tracking_uri)

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        """Log scalar metrics at ``step`` in one batch."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in values.items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def finish(self, tags: Mapping[str, str], failed: bool = False) -> None:
        """Record the outcome (checkpoint, best score…) as tags and close the run."""
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def open_sink(config: Any, run_dir: Path, dataset_version: str, code_version: str, resume: bool,
              is_main: bool) -> MlflowSink | None:
    """The MLflow sink a training config asks for, on the main rank only (None otherwise)."""
    t = config.train
    if not is_main or not t.mlflow_tracking_uri:
        return None
    from core.config import dump_config

    tags = {"dataset_version": dataset_version, "code_version": code_version, "grid": config.grid.preset,
            "spherecast.run_dir": str(Path(run_dir).resolve())}
    return MlflowSink(t.mlflow_tracking_uri, t.mlflow_experiment, run_dir, t.run_name, dump_config(config), tags,
                      resume)
