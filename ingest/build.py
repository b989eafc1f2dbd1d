"""The one ingest path (CLI, Prefect flow, demo and tests): config in, analysis store and stats out.

One ingest is: make the config's paths absolute (jobs run in other processes, maybe on other
hosts); check that the executor's workers see the store's directory; take the store's
single-writer lock; create the store (or extend its period for an append); run every slab that
is not done through the executor passed in (inline, Dask, or Prefect tasks; a CDS job packs the
consecutive slabs of a month within one request's budget and fetches them at once); re-fetch done slabs
that still hold preliminary (ERA5T) times and replace them where final ERA5 has arrived; refresh
the consolidated metadata; recompute the statistics over the training period. Each step is
idempotent by slab (done flags on disk, not a cache), so a rerun after a crash does only what is left.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from core.config import Config, absolute_paths, config_from_dict, dump_config
from core.location import as_location, stamp
from ingest.append import group_fetcher, recheck_region
from ingest.orchestrate import IngestPlan, StoreRequest, plan_store, run_slabs, validate_source, write_missing
from ingest.parallel import Executor, SlabExecutor, slab_executor
from ingest.regions import (
    contiguous_runs,
    done_flags,
    done_in,
    open_store,
    preliminary_times,
    store_exists,
    store_slab_size,
)
from ingest.sources import Source, shared_planet
from ingest.stats import compute_stats, write_stats
from ingest.store import BuildReport, StoreLayout

__all__ = ["IngestPlan", "executor_for", "fetch_calls", "finish_ingest", "ingest", "ingest_slab", "job_groups",
           "layout_for", "pack_jobs", "plan_ingest", "source_for", "store_request", "target_end", "write_packed"]

log = logging.getLogger(__name__)


def source_for(config: Config) -> Source:
    """The source named by ``ingest.source`` (one explicit match, no registry)."""
    ing, grid = config.ingest, config.grid.grid()
    match ing.source:
        case "synthetic":
            return shared_planet(grid, ing.synthetic)
        case "cds":
            from ingest.cds import CdsSource

            return CdsSource(grid, ing.cds, ing.cds.download_dir or config.paths.local_data / "downloads")
        case "files":
            from ingest.files import FileSource

            return FileSource(ing.files.paths, grid)
        case "zarr":
            from ingest.mirror import ZarrMirrorSource

            return ZarrMirrorSource(ing.mirror.url, ing.mirror.layout, grid, ing.mirror.storage_options)
    raise ValueError(f"unknown ingest source {ing.source!r}")  # unreachable: the config validates it


def layout_for(config: Config, dataset_version: str, source: str, end: pd.Timestamp | None = None) -> StoreLayout:
    """The store layout a config asks for (optionally up to a later ``end``)."""
    ing = config.ingest
    times = pd.date_range(ing.start, end if end is not None else ing.end, freq=f"{config.task.time_step_hours}h")
    return StoreLayout(config.grid.grid(), tuple(config.task.variables), tuple(config.task.levels),
                       times, source, dataset_version)


def target_end(config: Config, source: Source, append: bool) -> pd.Timestamp:
    """Last time to hold: the config's end, or for an append the newest time the source can serve."""
    if not append:
        return pd.Timestamp(config.ingest.end)
    latest = getattr(source, "latest_available", None)
    if latest is None:
        return pd.Timestamp(config.ingest.end)
    step = pd.Timedelta(hours=config.task.time_step_hours)
    newest = pd.Timestamp(latest(config.task.variables, config.task.levels)).floor(step)
    return max(newest, pd.Timestamp(config.ingest.end))


def store_request(config: Config, append: bool = False, source: Source | None = None) -> StoreRequest:
    """The store a config asks for: its path, layout (period extended by an append), slabs and encoding."""
    source = source or source_for(config)
    path = config.paths.analysis_store
    end = target_end(config, source, append)
    if store_exists(path):
        stored = pd.DatetimeIndex(open_store(path)["time"].values)
        if stored.size and stored[-1] > end:
            end = stored[-1]  # appended past the config's end: keep that period
    ing = config.ingest
    return StoreRequest(path, layout_for(config, source.dataset_version(), source.name, end), ing.slab_size,
                        ing.compression, ing.checksum, ing.recheck_days)


def plan_ingest(config: Config, append: bool = False, source: Source | None = None) -> IngestPlan:
    """Work out what an ingest would do, without writing anything: its slabs and every request it will send."""
    config = absolute_paths(config)
    source = source or source_for(config)
    plan = plan_store(store_request(config, append, source))
    describe = getattr(source, "describe_requests", None)
    if describe is not None and (plan.todo or plan.recheck):
        calls = fetch_calls(plan, source, config)
        plan.requests = describe(calls, list(config.task.variables), list(config.task.levels))
        if plan.todo:
            jobs = len(pack_jobs(plan, source, config))
            plan.requests = f"{len(plan.todo)} slabs to write in {jobs} jobs (one fetch each)\n" + plan.requests
        if plan.recheck and config.ingest.recheck_probe_oldest:
            plan.requests += ("\nre-check probes each region's oldest slab first: the region's later requests "
                              "are sent only if every probed time came back final")
    return plan


def _done(plan: IngestPlan) -> np.ndarray:
    """The plan's done flags over its whole (maybe extended) period; none done for a new store."""
    done = np.zeros(len(plan.layout.times), dtype=bool)
    if plan.exists:
        flags = done_flags(plan.path)
        done[: flags.size] = flags
    return done


def _slab_edges(start: int, stop: int, slab_size: int) -> list[tuple[int, int]]:
    """The slabs of a span as (first, stop) index pairs, cut at multiples of ``slab_size``."""
    edges, first = [], start
    while first < stop:
        last = min(first - first % slab_size + slab_size, stop)
        edges.append((first, last))
        first = last
    return edges


def job_groups(done: np.ndarray, start: int, stop: int, slab_size: int) -> list[slice]:
    """The runs of not-done times of a job's span (``done`` covers the span), cut at slab edges, in order."""
    return [slice(first + r.start, first + r.stop) for first, last in _slab_edges(start, stop, slab_size)
            for r in contiguous_runs(~done[first - start:last - start])]


def pack_jobs(plan: IngestPlan, source: Source, config: Config) -> list[slice]:
    """The plan's slabs to write joined as the source packs them (adjacent slabs only), else one job per slab."""
    pack = getattr(source, "pack_slabs", None)
    if pack is None or not plan.todo:
        return list(plan.todo)
    done, t = _done(plan), plan.layout.times
    todo = [t[s][~done[s]] for s in plan.todo]
    jobs: list[slice] = []
    for group in pack(todo, list(config.task.variables), list(config.task.levels)):
        for k in group:  # a done slab between two to-do ones ends the job: it may be re-checked meanwhile
            s = plan.todo[k]
            if jobs and jobs[-1].stop == s.start and k != group[0]:
                jobs[-1] = slice(jobs[-1].start, s.stop)
            else:
                jobs.append(s)
    return jobs


def fetch_calls(plan: IngestPlan, source: Source, config: Config) -> list[tuple[list[list[pd.Timestamp]], bool]]:
    """Every ``fetch_groups(groups, reuse)`` call the plan's jobs will make, in job order (for ``--plan``)."""
    done, t, size = _done(plan), plan.layout.times, plan.slab_size
    calls = []
    for job in pack_jobs(plan, source, config):
        calls.append(([list(t[r]) for r in job_groups(done[job], job.start, job.stop, size)], True))
    prelim = preliminary_times(plan.path) if plan.recheck else pd.DatetimeIndex([])
    for region in plan.recheck:  # as recheck_region groups them: by slab, the oldest first when probing
        index = np.flatnonzero(t.isin(prelim[(prelim >= t[region.start]) & (prelim <= t[region.stop - 1])]))
        groups = [list(t[index[index // size == k]]) for k in np.unique(index // size)]
        if config.ingest.recheck_probe_oldest and len(groups) > 1:
            calls += [([groups[0]], False), (groups[1:], False)]
        elif groups:
            calls.append((groups, False))
    return calls


# Sources are built once per worker process and reused: a CDS client or a mirror's open dataset is
# costly to set up, and the synthetic planet continues its simulation instead of restarting it.
_SOURCES: dict[str, Source] = {}


def _cached_source(config: Config) -> Source:
    data = dump_config(config)
    # The period asked for does not change what a source delivers: an append that moves ingest.end keeps it.
    ingest = {k: v for k, v in data["ingest"].items() if k not in ("start", "end")}
    key = json.dumps({"ingest": ingest, "grid": data["grid"], "paths": data["paths"]}, sort_keys=True)
    if key not in _SOURCES:
        _SOURCES[key] = source_for(config)
    return _SOURCES[key]


_STORES: dict[tuple, Any] = {}


def _cached_store(path: Path) -> Any:
    """The opened store, reused while its root and time metadata are unchanged (an append changes both)."""
    # Opening and validating a store costs 20–50 ms: more than writing a coarse-grid slab.
    path = as_location(path)
    stamps = []
    for meta in (path / "zarr.json", path / "time" / "zarr.json"):
        found = stamp(meta)
        if found is None:
            return open_store(path)  # let open_store name what is missing
        stamps.append(found)
    key = (str(path), *stamps)
    if key not in _STORES:
        _STORES.clear()  # one store per worker at a time: old versions are of no further use
        _STORES[key] = open_store(path)
    return _STORES[key]


def ingest_slab(config_data: dict[str, Any], start: int, stop: int, replace: bool = False) -> dict[str, Any]:
    """Fetch, regrid and write one job's slabs (or replace a region's preliminary times); picklable."""
    config = config_from_dict(config_data)
    path = config.paths.analysis_store
    source = _cached_source(config)
    store = _cached_store(path)
    variables, levels = list(config.task.variables), list(config.task.levels)
    began = time.perf_counter()
    replaced = 0
    if replace:  # only the region's preliminary times, never whole slabs
        fetch = group_fetcher(source, variables, levels)
        replaced = recheck_region(path, store, fetch, slice(start, stop), store_slab_size(path),
                                  probe_oldest=config.ingest.recheck_probe_oldest)
    elif hasattr(source, "fetch_groups"):  # a packed job: one fetch for all its slabs, written slab by slab
        write_packed(path, store, source, variables, levels, start, stop,
                     store_slab_size(path) or config.ingest.slab_size)
    else:
        write_missing(path, store, lambda times: source.fetch(times, variables, levels), start, stop)
    return {"start": start, "stop": stop, "seconds": time.perf_counter() - began, "replaced": int(replaced)}


def write_packed(path: Path, store: Any, source: Any, variables: list[str], levels: list[int], start: int, stop: int,
                 slab_size: int) -> None:
    """Fetch the not-done times of a job's slabs in one ``fetch_groups`` call and write them slab by slab."""
    runs = job_groups(done_in(path, slice(start, stop)), start, stop, slab_size)
    times = pd.DatetimeIndex(store["time"].values)
    fetched = source.fetch_groups([list(times[r]) for r in runs], variables, levels, reuse=True)

    def take(want: list[pd.Timestamp]) -> Any:
        got = next(fetched)
        if not pd.DatetimeIndex(got["time"].values).equals(pd.DatetimeIndex(want)):
            raise RuntimeError(f"packed fetch out of step: got {got['time'].values[:2]}…, wanted {want[:2]}…")
        return got

    # write_missing walks each slab's not-done runs exactly as job_groups cut them, and names the slab
    # if the write fails; the source then keeps the deliveries (its generator is not resumed) for the rerun.
    for first, last in _slab_edges(start, stop, slab_size):
        write_missing(path, store, take, first, last)
    next(fetched, None)  # every run is written: let the source delete the deliveries


def finish_ingest(config: Config) -> Path | None:
    """Recompute the statistics over the training period if the store holds all of it."""
    t = config.train
    try:
        stats = compute_stats(config.paths.analysis_store, config.task.channels(), t.train_start, t.train_end)
    except ValueError as exc:
        log.warning("statistics not refreshed: %s", exc)
        return None
    return write_stats(stats, config.paths.stats_file)


def executor_for(config: Config) -> AbstractContextManager[SlabExecutor]:
    """The executor ``config.ingest`` asks for: an existing scheduler, a LocalCluster of ``workers``, or inline."""
    ing = config.ingest
    # The planet is one continuous simulation: it is fastest run in order in one process.
    workers = 1 if ing.source == "synthetic" else ing.workers
    return slab_executor(workers, ing.scheduler_address)


def ingest(config: Config, progress: bool = True, append: bool = False, *, executor: Executor | None = None,
           finish: Callable[[Config], Path | None] | None = None,
           on_plan: Callable[[IngestPlan], None] | None = None) -> BuildReport:
    """Plan, create or check the store, run its slabs through ``executor``, then refresh the statistics.

    The one ingest path (CLI, Prefect flow, demo, tests). ``executor`` defaults to the one
    ``config.ingest`` asks for (inline, a LocalCluster or ``scheduler_address``); the flow passes one
    that runs each slab as a Prefect task. ``finish`` (default :func:`finish_ingest`) writes the stats.
    """
    config = absolute_paths(config)  # before any job leaves this process: a worker has its own cwd
    data = dump_config(config)
    source = source_for(config)  # one source for both plans: a FileSource scans its files once
    path = config.paths.analysis_store
    bar: list[tqdm] = []

    def advance(k: int, n: int) -> None:
        if not bar:
            bar.append(tqdm(total=n, desc="ingest jobs", unit="job", disable=not progress))
        bar[0].update(1)

    with ExitStack() as stack:
        if executor is None:  # first: an unreachable scheduler is reported before the store is touched
            executor = stack.enter_context(executor_for(config))
        try:
            plan, replaced = run_slabs(path, lambda: plan_store(store_request(config, append, source)), executor,
                                       ingest_slab, lambda s, replace: (data, s.start, s.stop, replace),
                                       advance, on_plan, validate=lambda p: validate_source(
                                           source, p, config.task.variables, config.task.levels),
                                       pack=lambda p: pack_jobs(p, source, config))
        finally:
            if bar:
                bar[0].close()
    n_slabs = -(-len(plan.layout.times) // plan.slab_size)
    report = BuildReport(plan.path, len(plan.todo), n_slabs - len(plan.todo), n_slabs, len(plan.recheck), replaced)
    log.info("store %s: %d slabs written, %d already done, %d preliminary times replaced by final",
             plan.path, report.written, report.skipped, replaced)
    (finish or finish_ingest)(config)
    return report
