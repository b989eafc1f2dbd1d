"""Ingest entry points used by the CLI and flows: config in, analysis store and stats out.

One ingest is: take the store's single-writer lock; create the store (or extend its period for an
append); write every slab that is not done, in parallel on Dask; re-fetch done slabs that still
hold preliminary (ERA5T) times and replace them where final ERA5 has arrived; refresh the
consolidated metadata; recompute the statistics over the training period. Each step is idempotent
by slab (done flags on disk, not a cache), so a rerun after a crash does only what is left.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from core.config import Config, config_from_dict, dump_config
from ingest.append import extend_store, group_fetcher, recheck_region, recheck_regions, store_lock
from ingest.parallel import slab_executor
from ingest.regions import (
    consolidate,
    contiguous_runs,
    done_flags,
    done_in,
    open_store,
    preliminary_times,
    remove_partial_files,
    store_slab_size,
    write_slab,
)
from ingest.sources import Source, shared_planet
from ingest.stats import compute_stats, write_stats
from ingest.store import BuildReport, StoreLayout, check_layout, create_store, slabs_to_do

log = logging.getLogger(__name__)


def source_for(config: Config) -> Source:
    """The source named by ``ingest.source`` (one explicit match, no registry)."""
    ing, grid = config.ingest, config.grid.grid()
    match ing.source:
        case "synthetic":
            return shared_planet(grid, ing.synthetic)
        case "cds":
            from ingest.cds import CdsSource

            return CdsSource(grid, ing.cds, ing.cds.download_dir or config.paths.data / "downloads")
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


@dataclass
class IngestPlan:
    """What one ingest will do to the store (computed before any write)."""

    path: Path
    layout: StoreLayout
    exists: bool
    extend_to: pd.Timestamp | None
    slab_size: int
    todo: list[slice] = field(default_factory=list)
    recheck: list[slice] = field(default_factory=list)
    requests: str = ""

    def describe(self) -> str:
        """A readable summary (what ``spherecast ingest --plan`` prints)."""
        t = self.layout.times
        lines = [f"store {self.path} ({'exists' if self.exists else 'new'}), source {self.layout.source}",
                 f"period {t[0]:%Y-%m-%dT%H} .. {t[-1]:%Y-%m-%dT%H}, {len(t)} times, slabs of {self.slab_size}"]
        if self.extend_to is not None:
            lines.append(f"append: extend the period to {self.extend_to:%Y-%m-%dT%H}")
        n_todo = sum(s.stop - s.start for s in self.todo)
        lines.append(f"to write: {len(self.todo)} slabs ({n_todo} times); "
                     f"preliminary to re-check: {len(self.recheck)} regions (only their preliminary times are fetched)")
        if self.requests:
            lines += ["source requests:", self.requests]
        return "\n".join(lines)


def plan_ingest(config: Config, append: bool = False, source: Source | None = None) -> IngestPlan:
    """Work out what an ingest would do, without writing anything."""
    source = source or source_for(config)
    path = config.paths.analysis_store
    end = target_end(config, source, append)
    store = open_store(path) if path.exists() else None
    if store is not None and store.sizes["time"] and pd.Timestamp(store["time"].values[-1]) > end:
        end = pd.Timestamp(store["time"].values[-1])  # appended past the config's end: keep that period
    layout = layout_for(config, source.dataset_version(), source.name, end)
    plan = IngestPlan(path, layout, store is not None, None, config.ingest.slab_size)
    if store is not None:
        # Slabs follow the store's shard files, whatever the config says now: a slab that straddles
        # two files would rewrite both of them.
        stored = store_slab_size(path)
        if stored is not None and stored != plan.slab_size:
            log.info("store %s holds slabs of %d times (ingest.slab_size is %d): using %d", path, stored,
                     plan.slab_size, stored)
            plan.slab_size = stored
        added = check_layout(store, layout, path)  # a prefix of the requested period is fine: it is extended
        done = np.zeros(len(layout.times), dtype=bool)
        done[: store.sizes["time"]] = done_flags(path)
        if added:
            plan.extend_to = layout.times[-1]
        plan.todo = slabs_to_do(done, plan.slab_size)
        since = layout.times[-1] - pd.Timedelta(days=config.ingest.recheck_days)
        plan.recheck = recheck_regions(path, plan.slab_size, since, busy=plan.todo)
    else:
        plan.todo = slabs_to_do(np.zeros(len(layout.times), dtype=bool), plan.slab_size)
    describe = getattr(source, "describe_requests", None)
    if describe is not None and plan.todo:
        prelim = preliminary_times(path) if plan.recheck else pd.DatetimeIndex([])
        slabs = [list(layout.times[s]) for s in plan.todo]
        slabs += [list(prelim[(prelim >= layout.times[s.start]) & (prelim <= layout.times[s.stop - 1])])
                  for s in plan.recheck]
        plan.requests = describe(slabs, list(config.task.variables), list(config.task.levels))
    return plan


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
    stamps = []
    for meta in (Path(path) / "zarr.json", Path(path) / "time" / "zarr.json"):
        try:
            st = meta.stat()
        except OSError:
            return open_store(path)  # let open_store name what is missing
        stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
    key = (str(path), *stamps)
    if key not in _STORES:
        _STORES.clear()  # one store per worker at a time: old versions are of no further use
        _STORES[key] = open_store(path)
    return _STORES[key]


def ingest_slab(config_data: dict[str, Any], start: int, stop: int, replace: bool = False) -> dict[str, Any]:
    """Fetch, regrid and write one slab of the store (or replace its preliminary times); picklable."""
    config = config_from_dict(config_data)
    path = config.paths.analysis_store
    source = _cached_source(config)
    store = _cached_store(path)
    variables, levels = list(config.task.variables), list(config.task.levels)
    began = time.perf_counter()
    replaced = 0
    try:
        if replace:  # only the region's preliminary times, never whole slabs
            fetch = group_fetcher(source, variables, levels)
            replaced = recheck_region(path, store, fetch, slice(start, stop), store_slab_size(path),
                                      probe_oldest=config.ingest.recheck_probe_oldest)
        else:  # only the times not yet done: a missing date costs one small request, not its whole slab
            done = done_in(path, slice(start, stop))
            for r in contiguous_runs(~done):
                times = list(pd.DatetimeIndex(store["time"].values[start + r.start:start + r.stop]))
                write_slab(path, store, source.fetch(times, variables, levels), start + r.start)
    except OSError as exc:  # disk full, quota, read-only mount: say where, and that a rerun resumes
        t = pd.DatetimeIndex(store["time"].values[start:stop])
        raise OSError(exc.errno, f"writing {t[0]:%Y-%m-%dT%H}..{t[-1]:%Y-%m-%dT%H} (slab {start}–{stop}) "
                                 f"into store {path} failed: {exc.strerror or exc}; slabs already done are "
                                 "intact, free space and rerun the ingest to resume") from exc
    return {"start": start, "stop": stop, "seconds": time.perf_counter() - began, "replaced": int(replaced)}


@contextmanager
def ingest_session(config: Config, append: bool = False) -> Iterator[IngestPlan]:
    """Hold the store's writer lock; create or extend the store; yield the plan; consolidate at the end."""
    path = config.paths.analysis_store
    source = source_for(config)  # one source for both plans: a FileSource scans its files once
    plan_ingest(config, append, source)  # refuse a bad request before creating any file (it is read-only)
    path.parent.mkdir(parents=True, exist_ok=True)
    with store_lock(path):
        plan = plan_ingest(config, append, source)  # again under the lock: another writer may have moved on
        if not plan.exists:
            create_store(path, plan.layout, slab_size=plan.slab_size, compression=config.ingest.compression,
                         checksum=config.ingest.checksum)
        else:
            removed = remove_partial_files(path)
            if removed:
                log.warning("removed %d half-written chunk files left by an interrupted writer", removed)
            if plan.extend_to is not None:
                extend_store(path, plan.extend_to)
        try:
            yield plan
        except BaseException:
            try:
                consolidate(path)  # publish what was done; never hide the original error
            except OSError as exc:
                log.warning("could not refresh consolidated metadata of %s: %s", path, exc)
            raise
        consolidate(path)


def finish_ingest(config: Config) -> Path | None:
    """Recompute the statistics over the training period if the store holds all of it."""
    t = config.train
    try:
        stats = compute_stats(config.paths.analysis_store, config.task.channels(), t.train_start, t.train_end)
    except ValueError as exc:
        log.warning("statistics not refreshed: %s", exc)
        return None
    return write_stats(stats, config.paths.stats_file)


def ingest(config: Config, progress: bool = True, append: bool = False) -> BuildReport:
    """Build, resume or append to the analysis store for ``config.ingest``, then write the statistics."""
    data = dump_config(config)
    ing = config.ingest
    # The planet is one continuous simulation: it is fastest run in order in one process.
    workers = 1 if ing.source == "synthetic" else ing.workers
    replaced = 0
    # The executor first: an unreachable scheduler is reported before the store is touched.
    with slab_executor(workers, ing.scheduler_address) as executor, ingest_session(config, append) as plan:
        total = len(plan.todo) + len(plan.recheck)
        with tqdm(total=total, desc="ingest slabs", unit="slab", disable=not progress) as bar:
            log.info("ingest %s: %d slabs to write, %d to re-check, %s", plan.path, len(plan.todo),
                     len(plan.recheck), executor.description)
            jobs = [(data, s.start, s.stop, False) for s in plan.todo]
            jobs += [(data, s.start, s.stop, True) for s in plan.recheck]
            for result in executor.map_unordered(ingest_slab, jobs):
                replaced += result["replaced"]
                bar.update(1)
    n_slabs = -(-len(plan.layout.times) // plan.slab_size)
    report = BuildReport(plan.path, len(plan.todo), n_slabs - len(plan.todo), n_slabs)
    log.info("store %s: %d slabs written, %d already done, %d preliminary times replaced by final",
             plan.path, report.written, report.skipped, replaced)
    finish_ingest(config)
    return report
