"""Prefect flows: thin glue from config to package calls. Deployments live in ``flows.yaml``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from core.config import Config, load_config
from core.errors import MissingInputError, SpherecastError
from core.runs import list_runs
from ingest.parallel import SlabExecutor
from pipelines.cycles import CycleResult, check_request, cycle_times, exclusive_cycle, record
from pipelines.failures import quiet_user_errors, retry_unless_permanent
from pipelines.retrain import retrain_weekly  # noqa: F401  (a flow of this module's deployments)
from pipelines.tasks import forecast_task, ingest_task, score_task, stats_task, train_task, wait_task
from pipelines.verify import verify_forecasts

quiet_user_errors()  # tracebacks only for bugs, in every process that runs these flows


def _config(config_path: str | None, overrides: dict[str, Any] | None) -> Config:
    return load_config(config_path, overrides=overrides)


@task(name="ingest-slab", cache_policy=NO_CACHE)
def slab_task(executor: SlabExecutor, fn: Callable[..., dict[str, Any]], config_data: dict[str, Any], start: int,
              stop: int, replace: bool = False) -> dict[str, Any]:
    """Fetch, regrid and write (or re-check) one slab on ``executor`` (inline or a Dask worker)."""
    # The executor is a parameter, not a global: Prefect records only task inputs' references, and
    # NO_CACHE keeps it from hashing them.
    result = executor.run(fn, config_data, start, stop, replace)
    get_run_logger().info("slab %d–%d %s in %.1f s", start, stop, "re-checked" if replace else "written",
                          result["seconds"])
    return result


class PrefectSlabs:
    """An ingest executor that runs each slab job as a Prefect task (its own state and retries) on ``inner``."""

    def __init__(self, inner: SlabExecutor, retries: int, retry_delay_seconds: float) -> None:
        self.inner = inner
        # A permanent failure (bad file, missing time, no credentials, disk full) fails at once: a retry only repeats it.
        self.slab = slab_task.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds,
                                           retry_condition_fn=retry_unless_permanent)

    @property
    def description(self) -> str:
        """Where jobs run, for logs."""
        return f"one Prefect task per slab, {self.inner.description}"

    def check_sees(self, directory: Path) -> None:
        """Raise unless the inner executor's workers see ``directory``."""
        self.inner.check_sees(directory)

    def map_unordered(self, fn: Callable[..., Any], jobs: Sequence[tuple[Any, ...]]) -> Iterator[Any]:
        """Run every job as a task, yielding results; every slab gets its chance (and retries) before a failure is raised."""
        states = []
        if self.inner.client is None:
            for args in jobs:
                states.append(self.slab(self.inner, fn, *args, return_state=True))
                if states[-1].is_completed():
                    yield states[-1].result()
        else:
            futures = [self.slab.submit(self.inner, fn, *args) for args in jobs]
            for future in futures:
                future.wait()
                states.append(future.state)
                if future.state.is_completed():
                    yield future.state.result()
        for state in states:
            if not state.is_completed():
                state.result()  # raises the first failure


@flow(name="ingest_era5", log_prints=True)
def ingest_era5(config_path: str | None = None, overrides: dict[str, Any] | None = None,
                append: bool = False, verify: bool = True) -> str:
    """Fill, resume or append to the analysis store (one task per slab), re-check ERA5T, refresh the stats.

    With ``verify`` (the default) published runs are scored afterwards when the ingest wrote or replaced times.
    """
    from ingest.build import executor_for, ingest

    config = _config(config_path, overrides)
    logger = get_run_logger()
    ing = config.ingest
    # The cycle lock first: a forecast run never reads the store while it is being appended to.
    # Then the executor: an unreachable scheduler is reported before the store is touched.
    with exclusive_cycle(config), executor_for(config) as inner:
        report = ingest(config, progress=True, append=append,
                        executor=PrefectSlabs(inner, ing.retries, ing.retry_delay_seconds),
                        finish=stats_task, on_plan=lambda plan: logger.info("%s", plan.describe()))
    if verify and (report.written or report.rechecked) and list_runs(config.paths.forecasts):
        # New truth (and final ERA5 replacing ERA5T) is what published runs wait for: score them now.
        # A scoring failure is verification's to report; the append itself has succeeded.
        try:
            verify_forecasts(config_path, overrides)
        except Exception as exc:  # noqa: BLE001  (any failure of the subflow, logged, never undoes the append)
            logger.error("verification after the append failed: %s", exc)
    return str(report.path)


@flow(name="train_sfno", log_prints=True)
def train_sfno(config_path: str | None = None, overrides: dict[str, Any] | None = None) -> str:
    """Train the SFNO under torchrun in a subprocess; return the best checkpoint's path."""
    return train_task(_config(config_path, overrides))


@flow(name="run_forecast", log_prints=True)
def run_forecast(config_path: str | None = None, overrides: dict[str, Any] | None = None, force: bool = False,
                 now: str | None = None) -> dict[str, Any]:
    """One cycle: wait for its initial conditions, then publish it once (``force`` replaces a published run).

    ``now`` replaces the clock of the late policy (replays and tests); default the current UTC time.
    """
    config = _config(config_path, overrides)
    check_request(config)
    choice, why = wait_task(config, now)
    if choice is None:
        result = CycleResult("skipped", reason=why)
        record(config, result, None)
        get_run_logger().warning("cycle skipped: %s", why)
        return result.to_dict()
    return forecast_task(config, choice, force)


@flow(name="backfill_forecasts", log_prints=True)
def backfill_forecasts(start: str, end: str, config_path: str | None = None,
                       overrides: dict[str, Any] | None = None, force: bool = False) -> list[dict[str, Any]]:
    """Every cycle from ``start`` to ``end`` (``forecast.cycle_hours`` apart), skipping published ones unless ``force``."""
    from core.ic_select import choose_init

    config = _config(config_path, overrides)
    check_request(config)
    results, failed = [], []
    for init in cycle_times(start, end, config.forecast.cycle_hours):
        try:
            results.append(forecast_task(config, choose_init(config, init), force))
        except ValueError as exc:  # one cycle without data does not stop the others
            if not isinstance(exc, SpherecastError):
                raise  # a bug is no missing cycle: it keeps its traceback
            failed.append(f"{init.isoformat()}: {exc}")
            results.append(CycleResult("failed", init_time=init.isoformat(), reason=str(exc)).to_dict())
    if failed:
        raise MissingInputError(f"backfill: {len(failed)} of {len(results)} cycles failed: " + "; ".join(failed))
    return results


@flow(name="demo", log_prints=True)
def demo(config_path: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Ingest the planet, train, forecast a held-out initial time, and score it against persistence."""
    config = _config(config_path, overrides)
    ingest_task(config)
    checkpoint = train_task(config)
    # The model just trained, even where an earlier promotion names another "current" one.
    pinned = config.model_copy(update={"forecast": config.forecast.model_copy(update={"checkpoint": Path(checkpoint)})})
    run_dir = forecast_task(pinned, force=True)["run_dir"]  # a retrained model replaces the demo's run
    scores = score_task(config, run_dir)
    get_run_logger().info("demo finished: run %s from %s", run_dir, checkpoint)
    return {"run_dir": run_dir, "checkpoint": checkpoint, "scores": scores}


@flow(name="render_maps", log_prints=True)
def rerender(config_path: str | None = None, overrides: dict[str, Any] | None = None, run: str = "") -> str:
    """Re-render the maps of one published run."""
    from pipelines.tasks import rerender_task

    return rerender_task(_config(config_path, overrides), run)


@flow(name="update_initial_conditions", log_prints=True)
def update_initial_conditions_flow(config_path: str | None = None, overrides: dict[str, Any] | None = None,
                                   now: str | None = None) -> str:
    """Fetch the newest live initial conditions into their store (a no-op for cycles already there)."""
    from ingest.initial_conditions import update_initial_conditions

    config = _config(config_path, overrides)
    # The store append and the forecast cycles take the same lock: a cycle never reads a half-appended store.
    with exclusive_cycle(config):
        report = update_initial_conditions(config, now=now)
    get_run_logger().info("%s", report.describe())
    return report.describe()
