"""The live demo: the shallow-water planet as a live source, one 6-hour cycle per interval.

After ``spherecast demo`` has built the analysis store and trained a model, every iteration makes
the next 6 h of planet time "arrive" and runs what a real deployment runs on that event, each step
a Prefect subflow or task (visible in the UI when ``PREFECT_API_URL`` points at a server, e.g. the
one ``spherecast schedule`` starts):

1. ``ingest_era5`` with ``ingest.end`` moved on by 6 h: the analysis store (the truth) grows by one
   time through the ordinary append machinery, under the cycle lock;
2. ``update_initial_conditions``: the initial-conditions store (source ``synthetic``) gets that cycle;
3. ``run_forecast`` with ``init_time: latest`` and ``now`` = the planet clock (the new cycle), so the
   wait and the late policy work in planet time;
4. ``verify_forecasts``: earlier runs are scored on the leads whose truth has now arrived;
5. every ``retrain_every`` cycles, ``retrain_weekly`` with a short budget and a rolling window that
   fits the store: the dated candidate is promoted or refused against the current model;
6. a pause, so that the next 6 h arrive ``interval_seconds`` after this cycle began.

The planet clock is the newest complete time of the analysis store, so a stopped demo resumes where
it stopped. When no model is "current" yet, the demo's checkpoint is made current first (scored on
its own validation period), so the first retrain is judged against it rather than promoted by default.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from itertools import count
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from core.config import Config, deep_merge, load_config
from core.errors import ConfigError, MissingInputError
from core.lineage import read_current
from models.distributed import select_device
from models.promotion import compare_checkpoints, promote
from pipelines.flows import ingest_era5, run_forecast, update_initial_conditions_flow
from pipelines.retrain import newest_complete, retrain_weekly
from pipelines.verify import verify_forecasts

LIVE_RETRAIN_MINUTES = 1.0
"""Budget of a live retrain: short, so a retrain fits between two arrivals of the planet."""
LIVE_WINDOW_DAYS = 30.0
"""Rolling training window of a live retrain when ``train.window_days`` is not set."""


def check_live_request(config: Config, cycles: int | None, interval_seconds: float, retrain_every: int) -> None:
    """Refuse settings the live demo cannot run with, before anything is read or written."""
    if cycles is not None and cycles < 1:
        raise ConfigError(f"live demo: cycles must be ≥ 1 (or None to run until Ctrl-C), got {cycles}")
    if not interval_seconds >= 0:
        raise ConfigError(f"live demo: interval_seconds must be ≥ 0, got {interval_seconds}")
    if retrain_every < 1:
        raise ConfigError(f"live demo: retrain_every must be ≥ 1 cycle, got {retrain_every}")
    if config.ingest.source != "synthetic":
        raise ConfigError(f"the live demo feeds the shallow-water planet, but ingest.source is "
                          f"{config.ingest.source!r}; use ingest.source: synthetic (the demo's default)")
    if not config.paths.analysis_store.exists():
        raise MissingInputError(f"no analysis store at {config.paths.analysis_store}: run `spherecast demo` first "
                                "(the live demo continues its planet)")


def retrain_overrides(config: Config, newest: pd.Timestamp) -> dict[str, Any]:
    """The ``train`` settings of a live retrain: a short budget and a rolling window inside the store."""
    t, step = config.train, config.task.time_step_hours
    held = (newest - pd.Timestamp(config.ingest.start)) / pd.Timedelta(days=1) + step / 24
    if t.window_days is not None:  # the operator chose the window: keep it, and its validation length
        window, val = t.window_days, t.val_days
    else:
        # The validation period must hold one window of the longest validation lead (and a little more).
        shortest_val = (max(t.val_lead_hours) // step + 2) * step / 24
        val = max(shortest_val, min(t.val_days, held / 5))
        window = min(LIVE_WINDOW_DAYS, held - val)
    if window <= 0 or window + val > held:
        raise MissingInputError(f"the analysis store holds {held:g} days up to {newest}, too few for a live retrain on "
                                f"{window:g} days of training and {val:g} days of validation; set train.window_days "
                                "and train.val_days to fit")
    return {"train": {"window_days": window, "val_days": val,
                      "budget_minutes": min(t.budget_minutes, LIVE_RETRAIN_MINUTES)}}


@task(name="seed-current-model", cache_policy=NO_CACHE)
def seed_current_task(config: Config) -> str | None:
    """Make the demo's checkpoint the current model when none is; return it (None when one already is)."""
    runs = config.paths.runs
    if read_current(runs) is not None:
        return None
    checkpoint = config.checkpoint_path()
    if not checkpoint.is_file():
        raise MissingInputError(f"checkpoint {checkpoint} does not exist: run `spherecast demo` first")
    t = config.train
    comparison = compare_checkpoints(checkpoint, None, config.paths.analysis_store, (t.val_start, t.val_end),
                                     t.val_lead_hours, t.promotion_margin, select_device(t.device))
    promote(runs, checkpoint, comparison)
    get_run_logger().info("the demo's model %s is now current; live retrains are compared with it", checkpoint)
    return str(checkpoint)


def _side_step(name: str, errors: list[str], fn: Callable[..., Any], *args: Any) -> Any:
    """Run a verification or retrain subflow; a failure is logged and recorded, and the next cycle goes on."""
    try:
        return fn(*args)
    except (ValueError, RuntimeError, OSError) as exc:
        errors.append(f"{name}: {exc}")
        get_run_logger().error("%s failed: %s; the live demo continues with the next cycle", name, exc)
        return None


@flow(name="live_demo", log_prints=True)
def live_demo(config_path: str | None = None, overrides: dict | None = None, cycles: int | None = None,
              interval_seconds: float = 180.0, retrain_every: int = 4) -> dict:
    """Feed the planet as a live source: each cycle appends 6 h of truth, forecasts, scores, and sometimes retrains.

    ``cycles`` None runs until Ctrl-C. Returns what was done: cycles run, runs published, runs
    scored, retrain decisions and promotions, and any verification or retrain failure.
    """
    base = load_config(config_path, overrides=overrides)
    check_live_request(base, cycles, interval_seconds, retrain_every)
    logger = get_run_logger()
    live = deep_merge(overrides or {}, {"initial_conditions": {"source": "synthetic"},
                                        "forecast": {"init_time": "latest"}})
    clock = newest_complete(base)
    retrain_overrides(base, clock)  # a window that cannot fit fails now, not at the first retrain
    seeded = seed_current_task(load_config(config_path, overrides=live))
    summary: dict[str, Any] = {"cycles": 0, "clock": clock.isoformat(), "published": [], "skipped": [],
                               "scored": [], "retrains": [], "promotions": 0, "seeded_current": seeded,
                               "errors": []}
    logger.info("live demo: the planet's clock stands at %s; %s cycles, one per %g s", clock,
                "unlimited" if cycles is None else cycles, interval_seconds)
    try:
        for n in count(1):
            if cycles is not None and n > cycles:
                break
            began = time.monotonic()
            clock += pd.Timedelta(hours=6)
            stamp = f"{clock:%Y%m%dT%H}"
            ov = deep_merge(live, {"ingest": {"end": clock.isoformat()}})
            # (a) the truth arrives, (b) so do the initial conditions of that cycle
            # Scoring is step (d), a subflow of its own, rather than the ingest's after-append one.
            ingest_era5.with_options(flow_run_name=f"live-ingest-{stamp}")(config_path, ov, verify=False)
            update_initial_conditions_flow.with_options(flow_run_name=f"live-ic-{stamp}")(
                config_path, ov, now=clock.isoformat())
            # (c) the cycle runs on the planet's clock
            result = run_forecast.with_options(flow_run_name=f"live-cycle-{stamp}")(
                config_path, ov, now=clock.isoformat())
            if result["action"] == "published":
                summary["published"].append(result["run"])
            elif result["action"] == "skipped":
                summary["skipped"].append(f"{stamp}: {result['reason']}")
            # (d) earlier runs are scored on the truth that has arrived
            verify = verify_forecasts.with_options(flow_run_name=f"live-verify-{stamp}")
            verified = _side_step(f"verification at {stamp}", summary["errors"], verify, config_path, ov)
            if verified:
                summary["scored"] = sorted(set(summary["scored"]) | set(verified["scored"]))
            # (e) now and then a retrain, promoted or refused
            if n % retrain_every == 0:
                retrain = retrain_weekly.with_options(flow_run_name=f"live-retrain-{stamp}")
                settings = deep_merge(ov, retrain_overrides(base, clock))
                decided = _side_step(f"retrain at {stamp}", summary["errors"], retrain, config_path, settings)
                if decided:
                    summary["retrains"].append({"run_name": decided["run_name"], "decision": decided["decision"]})
                    summary["promotions"] += decided["decision"] == "promoted"
            summary["cycles"], summary["clock"] = n, clock.isoformat()
            logger.info("live cycle %d (%s) done in %.1f s: %s", n, stamp, time.monotonic() - began, result["action"])
            # (f) the next 6 h arrive one interval after this cycle began (at once if the work took longer)
            if cycles is None or n < cycles:
                time.sleep(max(0.0, interval_seconds - (time.monotonic() - began)))
    except KeyboardInterrupt:
        logger.info("live demo stopped after %d cycles; the planet's clock stands at %s", summary["cycles"],
                    summary["clock"])
    return summary
