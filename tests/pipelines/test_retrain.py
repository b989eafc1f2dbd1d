"""The weekly retrain through Prefect: dated runs on a rolling window, each with its own budget; the first model
becomes current, a worse one is refused, and the forecast flow runs the current model.

Training is the real ``train_task`` (torchrun in a subprocess) on the tiny grid with a 3-second budget; the store
gains newer analyses between the two retrains by setting their ``done`` flags, as an ingest append does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import zarr
from prefect.testing.utilities import prefect_test_harness

from core.config import TrainConfig, config_from_dict
from core.lineage import PROMOTIONS, format_lineage, lineage, read_current
from core.runs import sha256_file
from pipelines.retrain import retrain_weekly
from tests.models.conftest import moving_planet, write_data

FIRST_DONE, SECOND_DONE = 80, 100  # analysis times done before each retrain: up to 01-20T18, then 01-25T18


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=180):
        yield


def overrides(root: Path, **train: object) -> dict:
    return {"paths": {"root": str(root)}, "grid": {"preset": "tiny"},
            "train": {"window_days": 5, "val_days": 3, "budget_minutes": 0.05, "batch_size": 4, "threads": 1,
                      "device": "cpu", "nproc_per_node": 1, "tensorboard": False, **train}}


def set_done(store: Path, upto: int) -> None:
    done = zarr.open_group(store, mode="r+")["done"]
    flags = done[:]
    flags[:upto], flags[upto:] = 1, 0
    done[:] = flags


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_rolling_window_ends_at_the_newest_analysis() -> None:
    t = TrainConfig(run_name="sfno", window_days=5, val_days=3, val_lead_hours=[6, 24])
    rolled = t.rolling(datetime(2000, 1, 20, 18), 6)
    assert rolled.run_name == "sfno-20000120T18"
    assert (rolled.val_start, rolled.val_end) == (datetime(2000, 1, 18, 0), datetime(2000, 1, 20, 18))
    assert (rolled.train_start, rolled.train_end) == (datetime(2000, 1, 13, 0), datetime(2000, 1, 17, 18))
    later = t.rolling(datetime(2000, 1, 27, 18), 6)
    assert later.run_name != rolled.run_name and later.train_start == datetime(2000, 1, 20, 0)
    fixed = TrainConfig(run_name="sfno").rolling(datetime(2000, 1, 20, 18), 6)  # window_days None: periods stay
    assert fixed.run_name == "sfno-20000120T18" and fixed.train_start == TrainConfig().train_start
    with pytest.raises(ValueError, match=r"val_days 0.5 holds 2 analysis times, too few .* \(24 h\)"):
        TrainConfig(window_days=5, val_days=0.5).rolling(datetime(2000, 1, 20, 18), 6)


@pytest.mark.parametrize(("train", "needle"), [
    ({"window_days": 0}, "window_days 0.0 must be > 0"),
    ({"val_days": -1}, "val_days -1.0 must be > 0"),
    ({"promotion_margin": 1}, r"promotion_margin 1.0 must be in \[0, 1\)"),
])
def test_bad_retrain_settings_are_clear_errors(train: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        config_from_dict({"train": train})


def test_weekly_retrains_are_dated_runs_with_their_own_budgets_and_only_a_better_one_is_promoted(
        harness: None, tmp_path: Path) -> None:
    write_data(tmp_path, moving_planet(periods=120))
    store = tmp_path / "data" / "analysis.zarr"
    set_done(store, FIRST_DONE)
    first = retrain_weekly(overrides=overrides(tmp_path))
    assert first["decision"] == "promoted" and first["run_name"] == "sfno-demo-20000120T18"
    assert first["val_period"] == ["2000-01-18T00:00:00", "2000-01-20T18:00:00"]
    run1 = tmp_path / "runs" / "sfno-demo-20000120T18"
    candidate1 = run1 / "checkpoint.pt"
    assert read_current(tmp_path / "runs")["checkpoint_sha256"] == sha256_file(candidate1)
    end1 = records(run1)[-1]
    assert end1["event"] == "end" and end1["elapsed_s"] >= 3.0  # its whole budget is spent
    last1 = (run1 / "last.pt").read_bytes()

    set_done(store, SECOND_DONE)  # five more days arrive
    second = retrain_weekly(overrides=overrides(tmp_path, lr=1e-6))  # a candidate that cannot learn in time
    run2 = tmp_path / "runs" / "sfno-demo-20000125T18"
    assert second["run_name"] == run2.name and second["train_period"][0] == "2000-01-18T00:00:00"
    events = records(run2)
    assert events[0]["event"] == "start" and "resume" not in [e["event"] for e in events]
    assert events[-1]["event"] == "end" and events[-1]["steps"] >= 1  # a budget of its own, not the first run's
    assert (run1 / "last.pt").read_bytes() == last1
    assert second["decision"] == "refused", second["comparison"]["reason"]
    assert second["note"] is None  # the current model never saw the new validation period
    assert all(r > 1 for r in second["comparison"]["ratio"].values())
    assert read_current(tmp_path / "runs")["checkpoint_sha256"] == sha256_file(candidate1)
    decisions = [json.loads(x) for x in (tmp_path / "runs" / PROMOTIONS).read_text().splitlines()]
    assert [d["decision"] for d in decisions] == ["promoted", "refused"]
    assert decisions[1]["period"] == ["2000-01-23T00:00:00", "2000-01-25T18:00:00"]
    assert decisions[1]["init_times"] == 8  # 01-23T00 … 01-24T18: 24 h of truth inside the period

    # The forecast flow runs the current model (no forecast.checkpoint given), and its lineage says so.
    from pipelines.flows import run_forecast

    config = config_from_dict({**overrides(tmp_path), "forecast": {"init_time": "2000-01-22T00", "lead_hours": 12}})
    run_forecast(overrides={**overrides(tmp_path), "forecast": {"init_time": "2000-01-22T00", "lead_hours": 12}})
    record = lineage(config, "20000122T00")
    assert record["checkpoint"]["sha256"] == sha256_file(candidate1) and record["checkpoint"]["current"]
    assert record["checkpoint"]["training_run"]["name"] == run1.name
    assert record["stats"]["recorded_at_training"] and record["checkpoint"]["registered_at"]
    assert "training run sfno-demo-20000120T18, trained on 2000-01-13T00:00:00" in format_lineage(record)
