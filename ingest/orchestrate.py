"""The one orchestration of a store build: plan → create or check the store → run slabs → consolidate.

``ingest.build.ingest`` (CLI, Prefect flow, demo) and ``ingest.store.build_store`` (tests with an
in-memory fetch) both go through :func:`run_slabs`; only how a slab is fetched differs (a source
rebuilt from the config on a worker, or a callable in this process) and which executor runs it.

Order matters for bad input: the executor is checked (scheduler reachable, workers see the
store's directory) before anything is written; the plan is made once read-only (a bad request
is refused before the store's directory or lock file exists) and again under the lock (another
writer may have moved on).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import xarray as xr

from core.errors import StoreWriteError
from core.location import as_location, is_remote, remove_tree
from ingest.append import extend_store, recheck_regions, store_lock
from ingest.parallel import Executor
from ingest.regions import (
    consolidate,
    contiguous_runs,
    done_flags,
    done_in,
    open_store,
    remove_partial_files,
    store_exists,
    store_slab_size,
    write_slab,
)
from ingest.rollback import roll_back_extension, snapshot_extension
from ingest.store import StoreLayout, check_layout, create_store, slabs_to_do

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreRequest:
    """What to build: where, which layout, slab size and encoding, and how far back ERA5T is re-checked."""

    path: Path
    layout: StoreLayout
    slab_size: int
    compression: Literal["zstd", "none"] = "zstd"
    checksum: bool = True
    recheck_days: int | None = None
    """None: no re-check of preliminary times (a fetch that only serves final data)."""


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
    compression: Literal["zstd", "none"] = "zstd"
    checksum: bool = True

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


def plan_store(request: StoreRequest) -> IngestPlan:
    """Compare the request with the store on disk (read-only): what to create, extend, write and re-check."""
    path, layout = request.path, request.layout
    store = open_store(path) if store_exists(path) else None
    plan = IngestPlan(path, layout, store is not None, None, request.slab_size,
                      compression=request.compression, checksum=request.checksum)
    if store is None:
        plan.todo = slabs_to_do(np.zeros(len(layout.times), dtype=bool), plan.slab_size)
        return plan
    # Slabs follow the store's shard files, whatever the request says now: a slab that straddles
    # two files would rewrite both of them.
    stored = store_slab_size(path)
    if stored is not None and stored != plan.slab_size:
        log.info("store %s holds slabs of %d times (%d asked for): using %d", path, stored, plan.slab_size, stored)
        plan.slab_size = stored
    added = check_layout(store, layout, path)  # a prefix of the requested period is fine: it is extended
    done = np.zeros(len(layout.times), dtype=bool)
    done[: store.sizes["time"]] = done_flags(path)
    if added:
        plan.extend_to = layout.times[-1]
    plan.todo = slabs_to_do(done, plan.slab_size)
    if request.recheck_days is not None:
        since = layout.times[-1] - pd.Timedelta(days=request.recheck_days)
        plan.recheck = recheck_regions(path, plan.slab_size, since, busy=plan.todo)
    return plan


def plan_times(plan: IngestPlan) -> list[pd.Timestamp]:
    """Every time the plan's slabs will fetch (re-checks fetch only preliminary times inside ``plan.recheck``)."""
    t = plan.layout.times
    return [t[i] for s in plan.todo for i in range(s.start, s.stop)]


def validate_source(source: object, plan: IngestPlan, variables: Sequence[str], levels: Sequence[int]) -> None:
    """Ask ``source`` (its optional ``validate``) whether it can deliver every time the plan writes; raise if not."""
    check = getattr(source, "validate", None)
    times = plan_times(plan)
    if check is not None and times:
        began = time.perf_counter()
        check(times, variables, levels)
        log.info("source %s can deliver the %d times to write (checked in %.2f s)", getattr(source, "name", "?"),
                 len(times), time.perf_counter() - began)


@contextmanager
def store_session(make_plan: Callable[[], IngestPlan],
                  validate: Callable[[IngestPlan], None] | None = None) -> Iterator[IngestPlan]:
    """Hold the store's writer lock; create or extend the store; yield the plan; consolidate at the end.

    ``validate(plan)`` runs before anything is written (no directory, lock file or store yet): a source
    that cannot deliver (bad files, missing times, no credentials) fails with the store byte-identical.
    A store this session created is removed again if it fails before any time was done, and an
    extension of the time axis is undone if the append fails before writing anything (ingest.rollback).
    """
    plan = make_plan()  # refuse a bad request before creating any file (it is read-only)
    if validate is not None:
        validate(plan)
    if not is_remote(plan.path):  # an object store has no directories to make
        plan.path.parent.mkdir(parents=True, exist_ok=True)
    with store_lock(plan.path):
        plan = make_plan()  # again under the lock: another writer may have moved on
        path = plan.path
        created, extension = not plan.exists, None
        if created:
            create_store(path, plan.layout, slab_size=plan.slab_size, compression=plan.compression,
                         checksum=plan.checksum)
        else:
            removed = remove_partial_files(path)
            if removed:
                log.warning("removed %d half-written chunk files left by an interrupted writer", removed)
            if plan.extend_to is not None:
                extension = snapshot_extension(path)
                extend_store(path, plan.extend_to)
        try:
            yield plan
        except BaseException:
            if created and _nothing_done(path):
                # Only what this session made, holding nothing: a rerun starts clean instead of from an empty store.
                remove_tree(path)
                log.warning("removed the new store %s: it failed before any time was written", path)
                raise
            if extension is not None and roll_back_extension(extension):
                raise  # byte-identical to before the append: nothing to consolidate
            try:
                consolidate(path)  # publish what was done; never hide the original error
            except OSError as exc:
                log.warning("could not refresh consolidated metadata of %s: %s", path, exc)
            raise
        consolidate(path)


def _nothing_done(path: Path) -> bool:
    """True when no time of the store at ``path`` is marked done (or its flags cannot be read)."""
    try:
        return not bool(done_flags(path).any())
    except (OSError, ValueError):
        return False  # unreadable: leave it for `spherecast data check` rather than delete it


def write_missing(path: Path, store: xr.Dataset, fetch: Callable[[list[pd.Timestamp]], xr.Dataset],
                  start: int, stop: int) -> None:
    """Fetch and write the times of one slab that are not done yet (a done time is never rewritten)."""
    # Only the times not yet done: a missing date costs one small request, not its whole slab.
    done = done_in(path, slice(start, stop))
    try:
        for r in contiguous_runs(~done):
            times = list(pd.DatetimeIndex(store["time"].values[start + r.start:start + r.stop]))
            write_slab(path, store, fetch(times), start + r.start)
    # Disk full, quota, read-only mount (the store's, or the downloads' beside it: sources wrap their own
    # network errors): say where, and that a rerun resumes. One line in the CLI, never retried.
    except OSError as exc:
        t = pd.DatetimeIndex(store["time"].values[start:stop])
        raise StoreWriteError(exc.errno, f"writing {t[0]:%Y-%m-%dT%H}..{t[-1]:%Y-%m-%dT%H} (slab {start}–{stop}) "
                                         f"into store {path} failed: {exc.strerror or exc}; slabs already done are "
                                         "intact, free space and rerun the ingest to resume") from exc


def run_slabs(path: Path, make_plan: Callable[[], IngestPlan], executor: Executor, fn: Callable[..., dict[str, Any]],
              job_args: Callable[[slice, bool], tuple[Any, ...]],
              progress: Callable[[int, int], None] | None = None,
              on_plan: Callable[[IngestPlan], None] | None = None,
              validate: Callable[[IngestPlan], None] | None = None,
              pack: Callable[[IngestPlan], Sequence[slice]] | None = None) -> tuple[IngestPlan, int]:
    """Check the executor's workers, open the store session, run ``fn(*job_args(slab, replace))`` for every slab to
    write or re-check; return the plan and how many preliminary times were replaced.

    ``pack(plan)`` joins consecutive slabs to write into larger jobs (one fetch for several slabs); ``fn``
    then gets the span of the joined slabs and writes them slab by slab."""
    executor.check_sees(as_location(path).parent)  # a worker blind to the store's directory would write elsewhere
    replaced = 0
    with store_session(make_plan, validate) as plan:
        if on_plan is not None:
            on_plan(plan)
        todo = plan.todo if pack is None else pack(plan)
        jobs: Sequence[tuple[Any, ...]] = ([job_args(s, False) for s in todo]
                                           + [job_args(s, True) for s in plan.recheck])
        log.info("ingest %s: %d slabs to write, %d to re-check, %s", plan.path, len(plan.todo), len(plan.recheck),
                 executor.description)
        began = time.perf_counter()
        for k, result in enumerate(executor.map_unordered(fn, jobs)):
            replaced += int(result.get("replaced", 0))
            if progress is not None:
                progress(k + 1, len(jobs))
        log.debug("%d slab jobs in %.1f s", len(jobs), time.perf_counter() - began)
    return plan, replaced
