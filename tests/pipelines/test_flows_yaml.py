"""``flows.yaml`` (``prefect deploy --prefect-file flows.yaml``) against the code it deploys.

Every entrypoint loads as a Prefect flow through Prefect's own loader, every deployment's
parameters bind to that flow's signature and pass Prefect's parameter validation, config overrides
are valid spherecast config, pull steps import, and each cron fires when its description says,
as computed by the Prefect server's own schedule model.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import inspect
from pathlib import Path
from typing import Any

import prefect
import pytest
import yaml
from prefect.flows import Flow, load_flow_from_entrypoint
from prefect.server.schemas.schedules import CronSchedule

from core.config import load_config

REPO = Path(__file__).resolve().parents[2]
FLOWS_YAML = REPO / "flows.yaml"


def _document() -> dict[str, Any]:
    return yaml.safe_load(FLOWS_YAML.read_text())


DOC = _document()
DEPLOYMENTS = {d["name"]: d for d in DOC["deployments"]}


def load_flow(entrypoint: str) -> Flow:
    """The flow an entrypoint names, resolved (like ``prefect deploy``) from the project root."""
    path, _, name = entrypoint.partition(":")
    assert name and not Path(path).is_absolute(), f"entrypoint {entrypoint!r} is not '<relative path>:<flow>'"
    return load_flow_from_entrypoint(f"{REPO / path}:{name}")


def fire_times(schedule: dict[str, Any], n: int) -> list[dt.datetime]:
    """The first ``n`` run times from 2026-01-01 00:00 UTC (a Thursday), as Prefect's scheduler computes them."""
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    return [dt.datetime.fromisoformat(d.isoformat()).astimezone(dt.UTC)
            for d in asyncio.run(cron.get_dates(n=n, start=start))]


def test_the_file_is_for_the_installed_prefect_and_names_its_deployments_once() -> None:
    assert DOC["prefect-version"] == prefect.__version__
    names = [d["name"] for d in DOC["deployments"]]
    assert len(names) == len(set(names))
    assert {"ingest-daily", "forecast-per-cycle", "initial-conditions", "verify-after-ingest", "train-weekly",
            "demo"} <= set(names)


@pytest.mark.parametrize("name", list(DEPLOYMENTS))
def test_entrypoint_is_a_flow_and_parameters_bind_to_its_signature(name: str) -> None:
    deployment = DEPLOYMENTS[name]
    flow = load_flow(deployment["entrypoint"])
    assert isinstance(flow, Flow)
    params = deployment.get("parameters") or {}
    inspect.signature(flow.fn).bind(**params)  # TypeError on a name the flow does not take
    validated = flow.validate_parameters(params)  # Prefect's own check of the values' types
    assert {k: validated[k] for k in params} == params
    if "overrides" in params:  # what the flow will merge into its config must be valid config
        load_config(None, env={}, overrides=params["overrides"])
    assert deployment["work_pool"]["name"] == "spherecast-local"


@pytest.mark.parametrize("name", [n for n, d in DEPLOYMENTS.items() if d.get("schedules")])
def test_every_cron_parses_in_a_real_timezone(name: str) -> None:
    for schedule in DEPLOYMENTS[name]["schedules"]:
        assert schedule["timezone"] == "UTC"
        assert len(fire_times(schedule, 3)) == 3


def test_schedules_fire_when_operators_expect() -> None:
    daily = fire_times(DEPLOYMENTS["ingest-daily"]["schedules"][0], 3)
    assert [(t.day, t.hour, t.minute) for t in daily] == [(1, 5, 30), (2, 5, 30), (3, 5, 30)]
    cycles = fire_times(DEPLOYMENTS["forecast-per-cycle"]["schedules"][0], 5)
    assert [(t.day, t.hour, t.minute) for t in cycles] == [(1, 1, 30), (1, 7, 30), (1, 13, 30), (1, 19, 30),
                                                            (2, 1, 30)]
    fetches = fire_times(DEPLOYMENTS["initial-conditions"]["schedules"][0], 3)
    assert [(t.hour, t.minute) for t in fetches] == [(0, 0), (0, 30), (1, 0)]
    verify = fire_times(DEPLOYMENTS["verify-after-ingest"]["schedules"][0], 2)
    assert [(t.day, t.hour, t.minute) for t in verify] == [(1, 7, 30), (2, 7, 30)]
    assert verify[0].time() > daily[0].time()  # scores only after the day's ERA5 append
    weekly = fire_times(DEPLOYMENTS["train-weekly"]["schedules"][0], 2)
    assert [(t.strftime("%A"), t.hour) for t in weekly] == [("Sunday", 2), ("Sunday", 2)]
    assert weekly[1] - weekly[0] == dt.timedelta(days=7)


def test_ingest_daily_appends_with_the_production_config() -> None:
    deployment = DEPLOYMENTS["ingest-daily"]
    assert deployment["entrypoint"] == "pipelines/flows.py:ingest_era5"
    assert deployment["parameters"]["append"] is True
    assert deployment["parameters"]["config_path"] == DOC["definitions"]["config"]["config_path"]
    flow = load_flow(deployment["entrypoint"])
    assert flow.name == "ingest_era5"
    assert flow.validate_parameters(deployment["parameters"])["append"] is True


def test_pull_steps_import() -> None:
    for step in DOC["pull"]:
        (dotted, _kwargs), = step.items()
        module, _, attr = dotted.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attr)), dotted
