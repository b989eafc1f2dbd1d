"""The weekly retrain: a new dated run on a rolling window, then promotion only if it beats the current model.

``retrain_weekly`` (deployment ``train-weekly`` in ``flows.yaml``):

1. the newest complete analysis time ``T`` of the store fixes the run: ``<train.run_name>-YYYYMMDDTHH`` of ``T``,
   validation on the last ``train.val_days`` up to ``T``, training on the ``train.window_days`` before them
   (:meth:`core.config_train.TrainConfig.rolling`). A new name means a new run directory: its own ``last.pt``,
   its own budget. A second trigger on the same data continues that run (or finds it finished);
2. the dataset version and stats the run starts from go to ``<run>/inputs.json`` (for ``spherecast lineage``);
3. ``pipelines.tasks.train_task`` trains it under torchrun and registers the checkpoint;
4. the candidate and the current model (``<runs>/current.json``) are scored on the same validation windows and
   leads (``models.promotion``); with no current model the candidate becomes current;
5. it is promoted (``current.json`` replaced atomically) or refused; both are recorded in ``promotions.jsonl``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from core.config import Config, load_config
from core.errors import MissingInputError
from core.lineage import current_checkpoint, read_current, record_training_inputs, training_run
from models.data import open_analysis
from models.distributed import select_device
from models.promotion import compare_checkpoints, promote
from pipelines.tasks import train_task


def newest_complete(config: Config) -> pd.Timestamp:
    """The newest analysis time the store marks done; ``ValueError`` if none is."""
    analysis = open_analysis(config.paths.analysis_store)
    done = analysis["done"].values.astype(bool)
    if not done.any():
        raise MissingInputError(f"no completed analysis time in {config.paths.analysis_store}: nothing to train on")
    return pd.Timestamp(analysis["time"].values[done][-1])


def dated_config(config: Config, newest: pd.Timestamp) -> Config:
    """``config`` with the train section rolled to the newest analysis (a dated run name, moved periods)."""
    train = config.train.rolling(newest.to_pydatetime(), config.task.time_step_hours)
    return config.model_copy(update={"train": train})


@task(name="compare-with-current", cache_policy=NO_CACHE)
def compare_task(config: Config, candidate: str) -> dict[str, Any]:
    """Score the candidate and the current model on the dated run's validation period; promote or refuse."""
    t, runs = config.train, config.paths.runs
    current = current_checkpoint(runs)
    comparison = compare_checkpoints(candidate, current, config.paths.analysis_store, (t.val_start, t.val_end),
                                     t.val_lead_hours, t.promotion_margin, select_device(t.device))
    note = None
    if current is not None:
        seen = training_run(current).get("train_period")
        if seen and pd.Timestamp(seen[0]) <= pd.Timestamp(t.val_end) and pd.Timestamp(seen[1]) >= pd.Timestamp(t.val_start):
            # The verdict stands (it can only favour the current model), but the operator should know.
            note = f"the current model trained on {seen[0]} → {seen[1]}, which overlaps the validation period"
            get_run_logger().warning("%s", note)
    promoted = promote(runs, candidate, comparison)
    record = read_current(runs)
    decision = ("promoted" if promoted else
                "unchanged" if record and record["checkpoint_sha256"] == comparison.candidate_sha256 else "refused")
    get_run_logger().info("%s %s: %s", decision, candidate, comparison.reason)
    return {"decision": decision, "candidate": candidate, "current": str(current_checkpoint(runs)),
            "comparison": comparison.as_dict(), "note": note}


@flow(name="retrain_weekly", log_prints=True)
def retrain_weekly(config_path: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train a dated run on the rolling window, compare it with the current model, promote or refuse it."""
    config = load_config(config_path, overrides=overrides)
    logger = get_run_logger()
    newest = newest_complete(config)
    dated = dated_config(config, newest)
    t = dated.train
    logger.info("retrain %s: train %s → %s, validate %s → %s", t.run_name, t.train_start, t.train_end, t.val_start,
                t.val_end)
    record_training_inputs(dated)
    candidate = train_task(dated)
    result = compare_task(dated, candidate)
    return {**result, "run_name": t.run_name, "newest_analysis": newest.isoformat(),
            "train_period": [t.train_start.isoformat(), t.train_end.isoformat()],
            "val_period": [t.val_start.isoformat(), t.val_end.isoformat()], "run_dir": str(Path(candidate).parent)}
