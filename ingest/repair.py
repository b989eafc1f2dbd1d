"""``spherecast data repair``: re-fetch the slabs whose chunks ``data check`` found damaged or missing.

A repair is the normal ingest, narrowed to the damage. Under the store's writer lock it runs the
full check; any problem that is not one field's chunk at one done time (metadata that does not
open, a broken contract, damaged flags, an interrupted append) is refused before anything is
written, because re-fetching data cannot fix it. Otherwise the damaged and missing times are
marked not done (their ``done`` chunks only: every other byte of the store stays), shard files
too damaged to be read back are removed (a rewrite keeps a shard's other chunks, so it must be
able to read them), and :func:`ingest.build.ingest` re-fetches and rewrites exactly those slabs,
as it would after a crash. A last full check says whether the store is healthy now.

A store with times never ingested is refused too: the ingest would write those slabs as well,
and a repair changes nothing but the damage. The statistics are not recomputed (a rewritten
slab holds what the source delivered for it), and preliminary (ERA5T) times are not re-checked:
both stay the work of ``spherecast ingest``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from core.config import Config, absolute_paths, config_from_dict, dump_config
from core.errors import ConfigError, DataContractError, SpherecastError
from core.location import as_location, exists, is_remote
from ingest.build import ingest, plan_ingest
from ingest.check import CheckReport, check_store, format_time_ranges
from ingest.lock import writer_lock
from ingest.orchestrate import IngestPlan
from ingest.parallel import Executor
from ingest.regions import contiguous_runs, read_flags, store_slab_size, write_region
from ingest.stats_state import default_state_path, forget_times

log = logging.getLogger(__name__)

STORE_NAME = "analysis.zarr"  # the name PathsConfig gives the analysis store inside its data directory


@dataclass
class RepairPlan:
    """What a repair rewrites: the bad times of each field, the slabs holding them, files to remove."""

    path: Path
    times: pd.DatetimeIndex
    slab_size: int
    damaged: dict[str, list[int]] = field(default_factory=dict)
    missing: dict[str, list[int]] = field(default_factory=dict)
    remove: list[Path] = field(default_factory=list)

    @property
    def indices(self) -> list[int]:
        """Every time index to mark not done and rewrite, in order."""
        return sorted({i for ix in (*self.damaged.values(), *self.missing.values()) for i in ix})

    @property
    def slabs(self) -> list[int]:
        """The slabs (index = first time // slab size) the ingest will rewrite."""
        return sorted({i // self.slab_size for i in self.indices})

    def describe(self) -> list[str]:
        """One line per slab: its times and which fields were damaged or missing there."""
        lines = []
        step = self.times[1] - self.times[0] if self.times.size > 1 else None
        for k in self.slabs:
            span = range(k * self.slab_size, min((k + 1) * self.slab_size, self.times.size))
            what = []
            for kind, by_name in (("damaged", self.damaged), ("missing", self.missing)):
                for name, ix in by_name.items():
                    hit = [i for i in ix if i in span]
                    if hit:
                        what.append(f"{name} {kind} at {format_time_ranges(self.times[hit], step)}")
            lines.append(f"slab {k} ({self.times[span[0]]:%Y-%m-%dT%H} .. {self.times[span[-1]]:%Y-%m-%dT%H}): "
                         + "; ".join(what))
        return lines


@dataclass
class RepairResult:
    """The outcome of :func:`repair_store`: the plan carried out and the check after it (None: nothing to do)."""

    path: Path
    plan: RepairPlan
    before: CheckReport
    after: CheckReport | None = None

    @property
    def ok(self) -> bool:
        """True when the store is healthy now (or was already)."""
        return self.before.ok if self.after is None else self.after.ok

    def report(self) -> str:
        """What was repaired and how the store checks now, as text."""
        if self.after is None:
            # Times never written (or left "to do" by a repair whose re-fetch failed) are the ingest's to write.
            pending = [f"  note: {n}: `spherecast ingest` writes them" for n in self.before.notes if "times not done" in n]
            return "\n".join([f"store {self.path}: nothing to repair (OK)", *pending])
        n, k = len(self.plan.indices), len(self.plan.slabs)
        lines = [f"store {self.path}: re-fetched {n} time{'s' * (n != 1)} in {k} slab{'s' * (k != 1)}"]
        lines += [f"  {line}" for line in self.plan.describe()]
        lines += [f"  removed unreadable shard file {p}" for p in self.plan.remove]
        lines.append("after the repair: " + ("healthy" if self.after.ok else "DAMAGE REMAINS"))
        lines.append(self.after.report())
        return "\n".join(lines)


def plan_repair(report: CheckReport, times: pd.DatetimeIndex, slab_size: int) -> RepairPlan:
    """The repair a full check's findings call for; DataContractError if any problem is beyond re-fetching."""
    if report.general:
        more = f" (and {len(report.general) - 1} more)" if len(report.general) > 1 else ""
        raise DataContractError(
            f"store {report.path} cannot be repaired by re-fetching data: {report.general[0]}{more}; nothing "
            "was changed (restore the named metadata or flags from a backup, or rebuild the store)")
    return RepairPlan(report.path, times, slab_size,
                      damaged={n: sorted(ix) for n, ix in sorted(report.damaged.items())},
                      missing={n: sorted(ix) for n, ix in sorted(report.missing.items())},
                      remove=sorted(report.damaged_files))


def mark_not_done(path: Path, indices: list[int]) -> None:
    """Set the done flag of the given time indices to 0 (only the ``done`` chunks are rewritten)."""
    mask = np.zeros(read_flags(path).sizes["time"], dtype=bool)
    mask[indices] = True
    for run in contiguous_runs(mask):
        write_region(path, xr.Dataset({"done": ("time", np.zeros(run.stop - run.start, np.uint8))}), run)


def _absolute(store: Path | str) -> Path:
    location = as_location(store)
    return location if is_remote(location) else location.absolute()


def check_store_path(store: Path) -> None:
    """Refuse, in one line, a path that does not exist or is not an analysis store."""
    if not exists(store):
        raise DataContractError(f"store {store} does not exist")
    if not (store / "zarr.json").is_file():
        raise DataContractError(f"{store} is not an analysis store (no zarr.json)")


def _aimed_at(config: Config, store: Path) -> dict:
    """The config's data with absolute paths, its analysis store moved to ``store``; ConfigError if it cannot be."""
    config = absolute_paths(config)
    data = dump_config(config)
    if store != config.paths.analysis_store:
        if store.name != STORE_NAME:
            raise ConfigError(f"--store {store}: the ingest writes <data dir>/{STORE_NAME}, so repair can only "
                              f"re-fetch into a store of that name (or the config's {config.paths.analysis_store})")
        data["paths"]["data_dir"] = str(store.parent)
    return data


def repair_config(config: Config, store: Path, times: pd.DatetimeIndex) -> Config:
    """``config`` aimed at ``store`` over exactly its stored period (an ingest must not extend it)."""
    data = _aimed_at(config, _absolute(store))
    data["ingest"]["start"], data["ingest"]["end"] = times[0].isoformat(), times[-1].isoformat()
    return config_from_dict(data, origin="repair")


def _keep_stats(config: Config) -> None:
    """The ingest's finishing step for a repair: the statistics stay as they are."""
    return None


def repair_store(config: Config, store: Path | None = None, *, progress: bool = False,
                 executor: Executor | None = None) -> RepairResult:
    """Check ``store`` (default: the config's), re-fetch the slabs with damaged or missing chunks, check again."""
    path = _absolute(store if store is not None else config.paths.analysis_store)
    check_store_path(path)
    _aimed_at(config, path)  # a store the ingest cannot write into is refused before the lock is taken
    # The plain writer lock: taking it must change nothing (store_lock would finish a pending
    # append), and the ingest below takes it again re-entrantly.
    with writer_lock(path):
        before = check_store(path, full=True)
        times = pd.DatetimeIndex(read_flags(path)["time"].values) if not before.general else pd.DatetimeIndex([])
        plan = plan_repair(before, times, store_slab_size(path) or 1)
        if not plan.indices:
            return RepairResult(path, plan, before)
        fixed = repair_config(config, path, times)
        pending = plan_ingest(fixed).todo  # read-only: also refuses a config that does not describe this store
        if pending:
            raise DataContractError(
                f"store {path} has {len(pending)} slab(s) not yet ingested (from {times[pending[0].start]:%Y-%m-%dT%H}): "
                "run `spherecast ingest` to complete it first, then repair; nothing was changed")
        log.info("repairing %s: %d times in slabs %s", path, len(plan.indices), plan.slabs)
        # Flags first: a kill after this leaves times "to do", which any later ingest rewrites.
        mark_not_done(path, plan.indices)
        for shard in plan.remove:
            shard.unlink(missing_ok=True)
        # The statistics' saved sums of these times came from the damaged reads: the next refresh re-reads them.
        forgotten = forget_times(default_state_path(path), times[plan.indices])
        if forgotten:
            log.info("statistics state: %d entries of repaired times marked stale", forgotten)

        def exactly_the_damage(ingest_plan: IngestPlan) -> None:
            todo = [s.start // ingest_plan.slab_size for s in ingest_plan.todo]
            if todo != plan.slabs or ingest_plan.extend_to is not None:
                raise RuntimeError(f"repair of {path}: the ingest planned slabs {todo}, not {plan.slabs}")
            ingest_plan.recheck = []  # replacing ERA5T by final ERA5 is the daily ingest's work, not a repair's

        try:
            ingest(fixed, progress=progress, executor=executor, finish=_keep_stats, on_plan=exactly_the_damage)
        except SpherecastError as exc:  # say where the store is left: nothing lost, the damage marked "to do"
            raise type(exc)(f"{exc}; the damaged times of slabs {plan.slabs} stay marked not done: "
                            "`spherecast ingest` re-fetches them once the source serves them") from exc
    after = check_store(path, full=True)
    return RepairResult(path, plan, before, after)
