"""Lineage of a published run: dataset version → stats → checkpoint → forecast run → scores.

The chain is built by the project's own code on the tiny grid: a training run (in-process, with its
``config.yaml`` and ``inputs.json`` as the pipeline writes them), its registration, its promotion, a
forecast streamed to a staging directory, its manifest and its publication by rename.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import xarray as xr
import yaml

from core.config import Config, dump_config
from core.lineage import format_lineage, lineage, record_training_inputs
from core.runs import publish as publish_run
from core.runs import run_name, sha256_file, staging_dir, write_manifest
from models.checkpoint import register_checkpoint
from models.data import open_analysis
from models.forecast import load_forecaster, stream_forecast
from models.promotion import compare_checkpoints, promote
from models.train import train
from tests.models.conftest import moving_planet, tiny_config, write_data

INIT = "2000-01-17T06"


def publish_forecast(config: Config, init: str) -> str:
    """Forecast 12 h from ``init`` with the config's checkpoint and publish it with forecast provenance."""
    checkpoint = config.checkpoint_path()
    model, meta = load_forecaster(checkpoint)
    name = run_name(init)
    staging = staging_dir(config.paths.forecasts, name)
    stream_forecast(model, meta, open_analysis(config.paths.analysis_store), init, 12, staging)
    write_manifest(staging, init, {"checkpoint": str(checkpoint), "checkpoint_sha256": sha256_file(checkpoint),
                                   "weights_sha256": meta["weights_sha256"], "dataset_version": meta["dataset_version"],
                                   "code_version": meta["code_version"], "lead_hours": 12})
    publish_run(staging, config.paths.forecasts / name)
    return name


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, str, Path]:
    root = tmp_path_factory.mktemp("lineage")
    write_data(root, moving_planet())
    config = tiny_config(root, max_steps=4, run_name="sfno-20000120T18")
    record_training_inputs(config)
    run_dir = config.paths.runs / config.train.run_name
    (run_dir / "config.yaml").write_text(yaml.safe_dump(dump_config(config), sort_keys=False))
    checkpoint = train(config)
    register_checkpoint(checkpoint, config.paths.runs / "registry.jsonl")
    comparison = compare_checkpoints(checkpoint, None, config.paths.analysis_store,
                                     (config.train.val_start, config.train.val_end), [6])
    assert promote(config.paths.runs, checkpoint, comparison)
    forecast_config = config.model_copy(deep=True)
    forecast_config.train.run_name = "elsewhere"  # the forecast finds the checkpoint through current.json
    return config, publish_forecast(forecast_config, INIT), checkpoint


def test_lineage_of_a_published_run_lists_every_link(published: tuple[Config, str, Path]) -> None:
    config, name, checkpoint = published
    scores = config.paths.verification / name / "scores.json"
    scores.parent.mkdir(parents=True)
    scores.write_text(json.dumps({"run": name, "rmse": {}}))
    record = lineage(config, name)
    with xr.open_zarr(config.paths.analysis_store, consolidated=False) as store:
        version = store.attrs["dataset_version"]
    assert record["dataset"]["dataset_version"] == version and record["dataset"]["store_version_now"] == version
    stats = record["stats"]
    assert stats["sha256"] == sha256_file(config.paths.stats_file) and stats["recorded_at_training"]
    assert stats["period"] == ["2000-01-01", "2000-01-15T18"] and stats["dataset_version"] == version
    ckpt = record["checkpoint"]
    assert ckpt["path"] == str(checkpoint) and ckpt["sha256"] == sha256_file(checkpoint)
    assert ckpt["file_now"] == "same" and ckpt["current"] and ckpt["promotion"]["decision"] == "promoted"
    assert ckpt["train_step"] == 4 and ckpt["registered_at"]
    training = ckpt["training_run"]
    assert training["name"] == "sfno-20000120T18"
    assert training["train_period"] == ["2000-01-01T00:00:00", "2000-01-15T18:00:00"]
    assert training["val_period"] == ["2000-01-16T00:00:00", "2000-01-20T18:00:00"]
    forecast = record["forecast"]
    assert forecast["name"] == name == "20000117T06" and forecast["init_time"].startswith("2000-01-17T06")
    assert forecast["manifest_sha256"] == sha256_file(config.paths.forecasts / name / "manifest.json")
    assert record["scores"] == {"path": str(scores), "sha256": sha256_file(scores)}
    text = format_lineage(record)
    order = [f"version {version}", f"sha256 {stats['sha256'][:12]}", f"sha256 {ckpt['sha256'][:12]}",
             "training run sfno-20000120T18, trained on 2000-01-01T00:00:00 → 2000-01-15T18:00:00",
             "the current model; promotion promoted", f"forecast    {name} init",
             f"scores      {scores}"]
    positions = [text.index(part) for part in order]
    assert positions == sorted(positions), text
    json.dumps(record)  # the record is plain JSON for `spherecast lineage --json`


def test_a_run_not_yet_scored_and_a_changed_checkpoint_are_reported(published: tuple[Config, str, Path],
                                                                   tmp_path: Path) -> None:
    config, name, checkpoint = published
    elsewhere = config.model_copy(deep=True)
    elsewhere.paths.root = tmp_path  # a verification directory without this run's scores
    elsewhere.paths.data_dir, elsewhere.paths.runs_dir = config.paths.data, config.paths.runs
    elsewhere.paths.forecasts_dir = config.paths.forecasts
    record = lineage(elsewhere, name)
    assert record["scores"] is None
    assert "scores      not yet" in format_lineage(record)
    original = checkpoint.read_bytes()
    try:
        checkpoint.write_bytes(original + b"x")  # the file behind the run was overwritten after the forecast
        assert lineage(config, name)["checkpoint"]["file_now"].startswith("changed (sha256 ")
    finally:
        checkpoint.write_bytes(original)


@pytest.mark.parametrize(("run", "needle"), [
    ("20000101T00", r"no published forecast run '20000101T00' in .*published: 20000117T06"),
    ("latest", "'latest' is not a run name"),
])
def test_an_unknown_run_is_a_clear_error(published: tuple[Config, str, Path], run: str, needle: str) -> None:
    config, _, _ = published
    with pytest.raises(ValueError, match=needle):
        lineage(config, run)
