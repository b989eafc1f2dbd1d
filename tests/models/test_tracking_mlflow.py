"""MLflow tracking through a real MLflow client and a real SQLite tracking store."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from models.tracking import Tracker
from models.tracking_mlflow import RUN_FILE, MlflowSink, flatten

RESULT = {"relative_error": {"6h": {"model": 0.3, "persistence": 0.4}},
          "rmse": {"6h": {"geopotential_500": 120.0}}, "persistence_rmse": {"6h": {"geopotential_500": 150.0}}}


def _sink(tmp_path: Path, resume: bool = False) -> MlflowSink:
    return MlflowSink(f"sqlite:///{tmp_path / 'mlflow.db'}", "spherecast-test", tmp_path / "run", "sfno-x",
                      {"train": {"lr": 0.002, "batch_size": 8}, "task": {"levels": [500]}},
                      {"dataset_version": "planet-1"}, resume)


def test_a_run_logs_params_step_and_validation_metrics_and_its_outcome(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    sink = _sink(tmp_path)
    tracker = Tracker(tmp_path / "run", enabled=False, mlflow=sink)
    for step in range(3):
        tracker.step(step, {"loss": 1.0 / (step + 1), "lr": 0.002})
    tracker.validation(3, RESULT)
    tracker.close({"checkpoint": "/x/checkpoint.pt", "best_score": "0.3"})
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "sfno-x"
    assert run.data.params == {"train.lr": "0.002", "train.batch_size": "8", "task.levels": "[500]"}
    assert run.data.tags["dataset_version"] == "planet-1" and run.data.tags["checkpoint"] == "/x/checkpoint.pt"
    assert [(m.step, m.value) for m in client.get_metric_history(sink.run_id, "train/loss")] == \
        [(0, 1.0), (1, 0.5), (2, 1.0 / 3)]
    assert run.data.metrics["val/relative_error_6h/model"] == 0.3
    assert run.data.metrics["val/rmse_6h/geopotential_500"] == 120.0
    assert json.loads((tmp_path / "run" / RUN_FILE).read_text())["run_id"] == sink.run_id


def test_a_resumed_training_continues_the_same_run_and_a_fresh_one_starts_another(tmp_path: Path) -> None:
    first = _sink(tmp_path)
    first.metrics(0, {"train/loss": 2.0})
    first.finish({}, failed=True)  # killed: the resumed run picks it up again
    again = _sink(tmp_path, resume=True)
    assert again.run_id == first.run_id
    assert again.client.get_run(again.run_id).info.status == "RUNNING"
    assert _sink(tmp_path, resume=False).run_id != first.run_id


def test_without_mlflow_installed_the_error_says_what_to_install(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what an absent package looks like to import
    with pytest.raises(ValueError, match="mlflow is not installed .pip install mlflow-skinny"):
        _sink(tmp_path)


def test_nested_config_is_flattened_to_strings() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x", "f": {}}) == \
        {"a.b": "1", "a.c.d": "[1, 2]", "e": "x", "f": "{}"}


def test_a_training_run_logs_to_mlflow_when_configured(tiny_data, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from models.train import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tiny_data(max_steps=6, tensorboard=False, mlflow_tracking_uri=uri, mlflow_experiment="tiny")
    checkpoint = train(config)
    run_id = json.loads((checkpoint.parent / RUN_FILE).read_text())["run_id"]
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["checkpoint"] == str(checkpoint)
    assert run.data.params["train.max_steps"] == "6" and run.data.tags["grid"] == "tiny"
    steps = [m.step for m in MlflowClient(uri).get_metric_history(run_id, "train/loss")]
    assert steps == list(range(6))
    assert "val/relative_error_24h/model" in run.data.metrics
