"""The daily update of a store: extend its time axis, then replace ERA5T by final ERA5.

**Append.** Growing a Zarr array only rewrites its ``zarr.json`` (the shape); chunks of the new
times do not exist, so they read as the fill value (NaN data, ``done`` 0, ``expver`` 0) until a
slab is written: no data chunk is ever rewritten. The steps are made repeatable by an intent file,
``<store>.append.json`` beside the store (like its lock file; inside, Zarr warns about a
stranger), written atomically before anything else: resize the fields, then the flags, then the
``time`` coordinate (its small chunks are rewritten with the new values), refresh the
consolidated metadata, remove the intent. Until that refresh, readers — who open the store
through its consolidated metadata — still see the old period, consistently. A writer that takes
the lock (:func:`store_lock`) completes a leftover intent first.

**ERA5T → final.** ERA5T (``expver`` 5) is published about five days behind real time and final
ERA5 (``expver`` 1) two to three months later; the values can differ. A replacement touches only
times that are done, stored as preliminary and delivered as final: final values are never
overwritten, and preliminary data never replaces anything. Per time the order is data, then
``replaced = 1``, then ``expver = 1``; a kill anywhere before the last write leaves the time
marked preliminary, so the next run fetches and rewrites it again (the same bytes).

**The daily re-check** asks the source for the preliminary times only, never for whole slabs:
:func:`recheck_regions` finds them (within ``ingest.recheck_days``), :func:`recheck_region`
fetches them one group per slab — a CDS source plans all groups together, so a run of preliminary
times costs a few exact requests (``ingest.plan``) — and :func:`replace_times` writes back only
the times delivered final; every other time of the slab keeps its bytes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from core.errors import ConfigError, DataContractError
from core.location import as_location, exists, is_remote, zarr_url
from core.schema import EXPVER_FINAL, EXPVER_PRELIMINARY
from ingest.lock import writer_lock
from ingest.regions import (
    FLAGS,
    check_slab,
    consolidate,
    contiguous_runs,
    encode_times,
    ensure_replaced_flag,
    open_store,
    read_flags,
    slab_fields,
    store_slab_size,
    write_region,
)

log = logging.getLogger(__name__)


def intent_path(path: Path) -> Path:
    """Where an append records what it is doing until it is complete: ``<store>.append.json``."""
    path = as_location(path)
    return path.with_name(path.name + ".append.json")


def _utc_naive(t: pd.Timestamp | str) -> pd.Timestamp:
    ts = pd.Timestamp(t)
    return ts.tz_convert("UTC").tz_localize(None) if ts.tzinfo is not None else ts


def _apply(path: Path, intent: dict) -> None:
    """Perform (or finish) the append an intent describes; every step is idempotent."""
    size, old = int(intent["size"]), int(intent["from_size"])
    times = pd.date_range(intent["start"], periods=size, freq=pd.Timedelta(seconds=intent["step_seconds"]))
    group = zarr.open_group(zarr_url(as_location(path)), mode="r+", use_consolidated=False)
    by_time = {name: arr for name, arr in group.arrays()
               if (arr.metadata.dimension_names or (None,))[0] == "time"}
    fields = sorted(n for n in by_time if n not in FLAGS and n != "time")
    flags = sorted(n for n in by_time if n in FLAGS)
    # Fields, then flags, then the time coordinate: the axis readers use is grown last.
    for name in fields + flags + ["time"]:
        arr = by_time[name]
        if arr.shape[0] > size:
            raise DataContractError(f"append to {path}: {name!r} already has {arr.shape[0]} times, more than {size}")
        if arr.shape[0] < size:
            arr.resize((size,) + arr.shape[1:])
    tarr = by_time["time"]
    encoded = encode_times(times, str(tarr.attrs.get("units", "")), tarr.dtype, f"append to {path}")
    if not np.array_equal(tarr[:old], encoded[:old]):
        raise DataContractError(f"append to {path}: the stored times do not match {intent_path(path)}; nothing more done")
    tarr[old:size] = encoded[old:]
    consolidate(path)
    intent_path(path).unlink(missing_ok=True)


def complete_pending_append(path: Path) -> bool:
    """Finish an append a killed writer left half done; True if there was one."""
    ipath = intent_path(path)
    if not is_remote(ipath):  # one PUT on an object store: no half-written intent to remove
        ipath.with_name(ipath.name + ".partial").unlink(missing_ok=True)
    if not exists(ipath):
        return False
    try:
        intent = json.loads(ipath.read_text())
    except ValueError as exc:
        raise DataContractError(f"append intent {ipath} is unreadable ({exc}); inspect the store before removing it") from exc
    log.warning("completing the append of %s to %s left by an interrupted writer", path, intent.get("end"))
    # A kill inside a metadata write leaves a `zarr.json.<uuid>.partial` beside it; no chunk is
    # written by an append, so these two levels are the only places to look.
    path = as_location(path)
    for stray in [] if is_remote(path) else [*path.glob("*.partial"), *path.glob("*/*.partial")]:
        stray.unlink()
    _apply(path, intent)
    return True


def prepare_for_write(path: Path) -> None:
    """Bring an existing store to a writable state: finish a pending append, add missing flags."""
    if not exists(as_location(path) / "zarr.json"):
        return
    open_store(path)  # a store that fails its contract is reported, never repaired or touched
    complete_pending_append(path)
    if ensure_replaced_flag(path):
        log.info("added the 'replaced' flag to %s", path)


@contextmanager
def store_lock(path: Path) -> Iterator[Path]:
    """Hold the store's single-writer lock (re-entrant); on first entry repair a pending append."""
    with writer_lock(as_location(path), on_acquire=prepare_for_write) as held:
        yield held


def _write_intent(path: Path, intent: dict) -> None:
    if is_remote(intent_path(path)):  # one PUT: the object is whole or absent
        intent_path(path).write_text(json.dumps(intent))
        return
    tmp = intent_path(path).with_name(intent_path(path).name + ".partial")
    with open(tmp, "w") as f:
        json.dump(intent, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, intent_path(path))


def extend_store(path: Path, new_end: pd.Timestamp, step: pd.Timedelta | None = None) -> int:
    """Extend the store's time axis to ``new_end`` (new times not done); return times added."""
    path, new_end = as_location(path), _utc_naive(new_end)
    with store_lock(path):
        times = pd.DatetimeIndex(open_store(path)["time"].values)
        if times.size >= 2:
            have = times[1] - times[0]
            if step is not None and pd.Timedelta(step) != have:
                raise DataContractError(f"store {path} has a time step of {have}, not {pd.Timedelta(step)}")
            step = have
        elif step is None:
            raise DataContractError(f"store {path} holds a single time, so its step is unknown: pass step")
        step = pd.Timedelta(step)
        if new_end < times[-1]:
            raise ConfigError(f"store {path} already ends at {times[-1]}, after {new_end}; nothing was modified")
        if (new_end - times[0]) % step:
            raise ConfigError(f"{new_end} is not on the time axis of store {path} "
                              f"(from {times[0]} every {step}); nothing was modified")
        if new_end == times[-1]:
            return 0
        size = (new_end - times[0]) // step + 1
        intent = {"version": 1, "start": times[0].isoformat(), "step_seconds": step.total_seconds(),
                  "from_size": int(times.size), "size": int(size), "end": new_end.isoformat()}
        _write_intent(path, intent)
        _apply(path, intent)
    log.info("extended %s by %d times to %s", path, size - times.size, new_end)
    return int(size - times.size)


def replace_slab(path: Path, store: xr.Dataset, slab: xr.Dataset, start: int) -> int:
    """Overwrite the slab's done-preliminary times where it brings final data; return how many."""
    return replace_times(path, store, slab, np.arange(start, start + slab.sizes["time"]))


def replace_times(path: Path, store: xr.Dataset, fresh: xr.Dataset, index: Sequence[int] | np.ndarray) -> int:
    """Overwrite the store's done-preliminary times at ``index`` where ``fresh`` is final; return how many."""
    index = np.asarray(index, dtype=np.int64)
    n = store.sizes["time"]
    if index.ndim != 1 or index.size == 0 or np.any(np.diff(index) <= 0) or index[0] < 0 or index[-1] >= n:
        raise ValueError(f"store {path}: time indices to replace must be increasing, within 0..{n - 1}; "
                         f"got {index.tolist()[:8]}")
    span = slice(int(index[0]), int(index[-1]) + 1)
    check_slab(store, fresh, index)
    if "expver" not in fresh:
        raise ValueError(f"slab {span.start}–{span.stop} has no 'expver': cannot tell final from preliminary")
    if "replaced" not in store.data_vars:
        raise ValueError(f"store {path} has no 'replaced' flag; open it for writing (store_lock) first")
    flags = read_flags(path).isel(time=index)
    mask = (flags["done"].values.astype(bool) & (flags["expver"].values == EXPVER_PRELIMINARY)
            & (fresh["expver"].values == EXPVER_FINAL))
    if not mask.any():
        return 0
    data = slab_fields(store, fresh.isel(time=np.flatnonzero(mask)), span)  # refuse NaN before any write
    chosen = np.zeros(span.stop - span.start, dtype=bool)
    chosen[index[mask] - span.start] = True
    runs = [slice(span.start + r.start, span.start + r.stop) for r in contiguous_runs(chosen)]
    offset = 0
    for run in runs:
        k = run.stop - run.start
        write_region(path, data.isel(time=slice(offset, offset + k)), run)
        offset += k
    # Data first, then `replaced`, then `expver`: a kill before the last write leaves the time preliminary.
    for name, value in (("replaced", 1), ("expver", EXPVER_FINAL)):
        dtype = np.uint8 if name == "replaced" else np.int8
        for run in runs:
            mark = xr.Dataset({name: ("time", np.full(run.stop - run.start, value, dtype))})
            write_region(path, mark, run)
    replaced = pd.DatetimeIndex(store["time"].values[index[mask]])
    log.info("replaced %d preliminary times by final ERA5 (%s..%s)", mask.sum(), replaced[0], replaced[-1])
    return int(mask.sum())


GroupFetch = Callable[[Sequence[Sequence[pd.Timestamp]]], Iterable[xr.Dataset]]


def group_fetcher(source: object, variables: Sequence[str], levels: Sequence[int]) -> GroupFetch:
    """A function fetching groups of times from ``source``: in one go if it can plan them together."""
    together = getattr(source, "fetch_groups", None)
    if together is not None:  # CDS: one plan over all groups, so fewer requests than one per group
        return lambda groups: together(groups, list(variables), list(levels))
    return lambda groups: (source.fetch(list(g), list(variables), list(levels)) for g in groups)  # type: ignore[attr-defined]


def recheck_regions(path: Path, slab_size: int, since: pd.Timestamp | None = None,
                    busy: Sequence[slice] = ()) -> list[slice]:
    """Regions (first to last preliminary time, from ``since``) to re-check, none sharing a slab with ``busy``."""
    # A slab still being written by another job is left for the next run: two jobs rewriting one
    # shard file at once would lose one's chunks. In a daily append that slab holds the newest,
    # least likely final times.
    if slab_size < 1:
        raise ValueError(f"slab_size must be ≥ 1, got {slab_size}")
    flags = read_flags(path)
    times = pd.DatetimeIndex(flags["time"].values)
    prelim = flags["done"].values.astype(bool) & (flags["expver"].values == EXPVER_PRELIMINARY)
    if since is not None:
        prelim &= times >= _utc_naive(since)
    taken = {k for w in busy for k in range(w.start // slab_size, -(-w.stop // slab_size))}
    regions: list[slice] = []
    first = last = -1
    for i in np.flatnonzero(prelim):
        slab = int(i) // slab_size
        if slab in taken:
            continue
        if first >= 0 and any(k in taken for k in range(last // slab_size, slab + 1)):
            regions.append(slice(first, last + 1))
            first = -1
        first = int(i) if first < 0 else first
        last = int(i)
    if first >= 0:
        regions.append(slice(first, last + 1))
    return regions


def recheck_region(path: Path, store: xr.Dataset, fetch_groups: GroupFetch, where: slice,
                   slab_size: int | None = None, probe_oldest: bool = False) -> int:
    """Fetch only the preliminary times in ``where`` and replace those now final; return how many.

    With ``probe_oldest`` the oldest slab's preliminary times are fetched first, and the rest only
    if every one of them came back final. CDS publishes final ERA5 in time order (a month at a time,
    two to three months late), so while the oldest ERA5T time is still ERA5T no later one can be
    final: on most days the re-check then costs one slab, not the whole preliminary period.
    """
    flags = read_flags(path)
    index = np.arange(store.sizes["time"])[where]
    prelim = (flags["done"].values[where].astype(bool) & (flags["expver"].values[where] == EXPVER_PRELIMINARY))
    index = index[prelim]
    if index.size == 0:
        return 0
    size = slab_size or store_slab_size(path) or index.size
    # One group per slab: each fetched group is at most a slab in memory, and written into one shard.
    groups = [index[index // size == k] for k in np.unique(index // size)]
    times = pd.DatetimeIndex(store["time"].values)
    total = 0
    if probe_oldest:
        (fresh,) = fetch_groups([list(times[groups[0]])])
        total = replace_times(path, store, fresh, groups[0])
        if total < groups[0].size or len(groups) == 1:
            return total  # the oldest is still ERA5T (or nothing else is left): later times wait
        groups = groups[1:]
    fetched = fetch_groups([list(times[g]) for g in groups])
    return total + sum(replace_times(path, store, fresh, g) for g, fresh in zip(groups, fetched, strict=True))


def replace_preliminary(path: Path, fetch: Callable[[Sequence[pd.Timestamp]], xr.Dataset], slab_size: int,
                        since: pd.Timestamp | None = None) -> int:
    """Re-fetch the store's preliminary times (from ``since``) and replace those now final."""
    with store_lock(path):
        store = open_store(path)
        total = 0
        for where in recheck_regions(path, slab_size, since):
            total += recheck_region(path, store, lambda groups: (fetch(list(g)) for g in groups), where, slab_size)
        consolidate(path)
    return total
