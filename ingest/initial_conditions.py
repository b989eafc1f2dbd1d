"""The initial-conditions store: the newest analysis cycles from a live source, beside the ERA5 store.

``<data>/initial-conditions.zarr`` follows the analysis contract (``core/schema.py``) and is
written by the same machinery (``ingest.store``): pre-allocated metadata, one time per shard file,
fields and ``expver`` first and the ``done`` flag last, so a killed update never leaves a time
marked done with partial data. Its root attrs ``source`` (``ecmwf-opendata-ifs`` or
``synthetic-shallow-water``) and ``dataset_version`` say where the values come from; the ERA5
store is never touched.

The time axis is regular (6-hourly, the runs of the portal) from the oldest cycle the store was
created for and only grows (:func:`ingest.append.extend_store`). Only the ``keep_cycles`` newest
done cycles keep their data: older ones are cleared — ``done`` set to 0 first, then their fields
(which deletes their shard files) and last their ``expver``, so a kill in between leaves a time
that is not done and is cleared again by the next update. A nonzero ``expver`` on a time that is
not kept is how a half-cleared (or half-written) time is recognised.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from core.config import Config
from core.errors import SourceError
from core.variables import get_variable
from ingest.opendata import CycleNotAvailable, OpenDataError, OpenDataSource
from ingest.regions import contiguous_runs, read_flags, write_region
from ingest.sources import Source, SyntheticSource, shared_planet
from ingest.store import (
    StoreLayout,
    check_layout,
    consolidate,
    create_store,
    extend_store,
    open_store,
    store_lock,
    write_slab,
)

log = logging.getLogger(__name__)

CYCLE = pd.Timedelta(hours=6)  # the live sources publish a run every 6 hours (00/06/12/18 UTC)
SLAB = 1  # one time per shard file: clearing an old cycle deletes its files, nothing else is rewritten


@dataclass
class InitialConditionsReport:
    """What one update of the initial-conditions store did."""

    path: Path
    source: str
    now: pd.Timestamp | None = None
    stored: list[pd.Timestamp] = field(default_factory=list)
    already: list[pd.Timestamp] = field(default_factory=list)
    not_available: list[pd.Timestamp] = field(default_factory=list)
    failed: dict[pd.Timestamp, str] = field(default_factory=dict)
    pruned: list[pd.Timestamp] = field(default_factory=list)
    kept: list[pd.Timestamp] = field(default_factory=list)

    @property
    def newest(self) -> pd.Timestamp | None:
        """The newest complete cycle in the store after the update (None if it holds none)."""
        return self.kept[-1] if self.kept else None

    def describe(self) -> str:
        """One readable line per outcome (what the CLI and the flow log)."""
        def fmt(times: list[pd.Timestamp]) -> str:
            return ", ".join(f"{t:%Y-%m-%dT%H}" for t in times) or "none"

        lines = [f"initial conditions {self.path} ({self.source})", f"stored: {fmt(self.stored)}",
                 f"already stored: {fmt(self.already)}", f"not available yet: {fmt(self.not_available)}",
                 f"pruned: {fmt(self.pruned)}", f"newest complete: {fmt(self.kept[-1:])}"]
        lines += [f"failed {t:%Y-%m-%dT%H}: {why}" for t, why in self.failed.items()]
        return "\n".join(lines)


class InitialConditionsError(SourceError):
    """Some cycles could not be stored (the others were); ``report`` says what was done."""

    def __init__(self, report: InitialConditionsReport) -> None:
        self.report = report
        why = "; ".join(f"{t:%Y-%m-%dT%H}: {msg}" for t, msg in report.failed.items())
        super().__init__(f"initial conditions {report.path}: {len(report.failed)} cycle(s) failed "
                         f"(stored {len(report.stored)}, nothing partial marked done): {why}")


def initial_conditions_source(config: Config) -> Source | None:
    """The live source ``initial_conditions.source`` names, or None for ``none``."""
    ic, grid = config.initial_conditions, config.grid.grid()
    match ic.source:
        case "none":
            return None
        case "opendata":
            return OpenDataSource(grid, ic.opendata, config.paths.local_data / "downloads" / "opendata")
        case "synthetic":
            # One planet per settings and grid, kept: the next update continues its simulation
            # instead of spinning it up again from the epoch.
            return shared_planet(grid, config.ingest.synthetic)
    raise ValueError(f"unknown initial_conditions.source {ic.source!r}")  # unreachable: the config validates it


def candidate_cycles(now: pd.Timestamp, keep: int, earliest: pd.Timestamp | None = None) -> pd.DatetimeIndex:
    """The ``keep`` newest 6-hourly cycles at or before ``now`` (none before ``earliest``)."""
    newest = pd.Timestamp(now).floor(CYCLE)
    cycles = pd.date_range(end=newest, periods=keep, freq=CYCLE)
    return cycles[cycles >= earliest] if earliest is not None else cycles


def _utc(t: datetime | pd.Timestamp | str) -> pd.Timestamp:
    ts = pd.Timestamp(t)
    return ts.tz_convert("UTC").tz_localize(None) if ts.tzinfo is not None else ts


def _resolve_now(config: Config, source: Source, now: datetime | pd.Timestamp | str | None,
                 path: Path) -> pd.Timestamp:
    if now is not None:
        return _utc(now)
    if not isinstance(source, SyntheticSource):
        return pd.Timestamp.now(tz="UTC").tz_localize(None)
    # The planet has no wall clock: each update brings the next 6 h after the newest stored cycle
    # (the live demo's "the next 6 h arrive"), starting where the analysis period ends.
    if (path / "zarr.json").is_file():
        flags = read_flags(path)
        done = pd.DatetimeIndex(flags["time"].values[flags["done"].values.astype(bool)])
        if done.size:
            return done[-1] + CYCLE
    return pd.Timestamp(config.ingest.end)


def _layout(config: Config, source: Source, start: pd.Timestamp, end: pd.Timestamp) -> StoreLayout:
    return StoreLayout(config.grid.grid(), tuple(config.task.variables), tuple(config.task.levels),
                       pd.date_range(start, end, freq=CYCLE), source.name, source.dataset_version())


def _write_cycle(config: Config, source: Source, path: Path, period: pd.DatetimeIndex, slab: xr.Dataset) -> None:
    """Write one fetched cycle: create the store or grow its axis to reach it, then the slab, then its flag."""
    t = pd.Timestamp(slab["time"].values[0])
    if not (path / "zarr.json").is_file():
        # The whole candidate period at once: cycles still to come are simply not done yet.
        create_store(path, _layout(config, source, period[0], max(t, period[-1])), slab_size=SLAB,
                     compression=config.ingest.compression, checksum=config.ingest.checksum)
    elif t > pd.Timestamp(open_store(path)["time"].values[-1]):
        extend_store(path, max(t, period[-1]), step=CYCLE)
    store = open_store(path)
    index = int((t - pd.Timestamp(store["time"].values[0])) / CYCLE)
    write_slab(path, store, slab, index)


def prune_cycles(path: Path, keep: int) -> list[pd.Timestamp]:
    """Clear every cycle but the ``keep`` newest done ones (done flag first); return the cleared done times."""
    flags = read_flags(path)
    times = pd.DatetimeIndex(flags["time"].values)
    done = flags["done"].values.astype(bool)
    kept = np.zeros(done.size, dtype=bool)
    kept[np.flatnonzero(done)[-keep:]] = True
    clear = (done | (flags["expver"].values != 0)) & ~kept
    if not clear.any():
        return []
    store = open_store(path)
    runs = contiguous_runs(clear)
    for run in runs:  # not done first: from here on no reader takes these times
        write_region(path, xr.Dataset({"done": ("time", np.zeros(run.stop - run.start, np.uint8))}), run)
    fields = [name for name in store.data_vars if name not in ("done", "expver", "replaced")]
    for i in np.flatnonzero(clear):  # one time at a time: a 0.25° time is hundreds of MB of NaN
        blank = {}
        for name in fields:
            var = store[name]
            blank[name] = (var.dims, np.full((1, *var.shape[1:]), np.nan, dtype=np.float32))
        write_region(path, xr.Dataset(blank), slice(int(i), int(i) + 1))  # all-NaN shards are deleted
    for run in runs:
        write_region(path, xr.Dataset({"expver": ("time", np.zeros(run.stop - run.start, np.int8))}), run)
    cleared = list(times[clear & done])
    log.info("initial conditions %s: cleared %d cycles older than the %d newest", path, int(clear.sum()), keep)
    return cleared


def update_initial_conditions(config: Config, *, now: datetime | pd.Timestamp | str | None = None,
                              source: Source | None = None) -> InitialConditionsReport:
    """Fetch the newest cycles not yet stored into the initial-conditions store and keep the newest few."""
    path = Path(config.paths.initial_conditions_store)
    source = source if source is not None else initial_conditions_source(config)
    if source is None:
        log.info("initial_conditions.source is 'none': nothing to update")
        return InitialConditionsReport(path, "none")
    variables, levels = list(config.task.variables), list(config.task.levels)
    for name in variables:
        get_variable(name)
    check = getattr(source, "check_request", None)
    if check is not None:
        check(variables, levels)  # a bad request is refused before any request or file
    keep = config.initial_conditions.keep_cycles
    path.parent.mkdir(parents=True, exist_ok=True)
    with store_lock(path):
        report = InitialConditionsReport(path, source.name, _resolve_now(config, source, now, path))
        earliest = pd.Timestamp(config.ingest.synthetic.epoch) if isinstance(source, SyntheticSource) else None
        candidates = candidate_cycles(report.now, keep, earliest)
        if candidates.empty:
            return report
        start, done_times = candidates[0], pd.DatetimeIndex([])
        if (path / "zarr.json").is_file():
            store = open_store(path)
            stored = pd.DatetimeIndex(store["time"].values)
            start = stored[0]
            # The request must match the store (grid, variables, levels, source version); its axis may grow.
            check_layout(store, _layout(config, source, start, max(stored[-1], candidates[-1])), path)
            flags = read_flags(path)
            done_times = stored[flags["done"].values.astype(bool)]
        todo = [t for t in candidates if t not in done_times and t >= start]
        report.already = [t for t in candidates if t in done_times]
        skipped = [t for t in candidates if t < start]
        if skipped:
            log.info("cycles %s are older than the store %s: not fetched", [str(t) for t in skipped], path)
        for t in sorted(todo, reverse=getattr(source, "newest_first", False)):
            try:
                slab = source.fetch([t], variables, levels)
            except CycleNotAvailable as exc:
                log.info("%s", exc)
                report.not_available.append(t)
                continue
            except OpenDataError as exc:
                log.error("initial conditions: %s", exc)
                report.failed[t] = str(exc)
                continue
            _write_cycle(config, source, path, pd.date_range(start, candidates[-1], freq=CYCLE), slab)
            report.stored.append(t)
            log.info("initial conditions: stored cycle %s from %s", f"{t:%Y-%m-%dT%H}", source.name)
        report.stored.sort()
        if (path / "zarr.json").is_file():
            report.pruned = prune_cycles(path, keep)
            if report.stored or report.pruned:
                consolidate(path)
            flags = read_flags(path)
            report.kept = list(pd.DatetimeIndex(flags["time"].values[flags["done"].values.astype(bool)]))
    if report.failed:
        raise InitialConditionsError(report)
    return report
