"""The running sums behind the statistics, saved beside them so the next refresh reads only what changed.

File: ``<store parent>/<store name without .zarr>.stats-state.nc`` by default (``analysis.stats-state.nc``
beside ``analysis.zarr`` and ``stats.nc``), NetCDF, written atomically (temp file + rename, or one upload):

- coords ``time`` (the training period's analysis times) and ``channel``;
- ``mean``, ``m2`` ``(time, channel)`` float64: each time's area-weighted mean and sum of squared
  deviations; ``dmean``, ``dm2``: the same of the tendency ending at that time (NaN where not computed);
- ``done``, ``expver``, ``replaced`` ``(time)``: the store's flags when the entry was computed;
- attrs ``state_format``, ``store_id`` (device, inode of the store directory and the mtime of its
  ``latitude`` metadata, written once at creation: a rebuilt store has another; on an object store its URL
  and that object's ETag), ``dataset_version``, ``grid``, ``time_step_hours``, ``period_start``, ``period_end``.

An entry is reused only while the store's identity attrs match and its time's flags are unchanged (an
ERA5T time replaced by final ERA5 flips ``replaced`` and ``expver``); a tendency entry also needs the
previous time's entry reused. Everything else is read again. The totals are always re-merged from the
entries (:func:`ingest.stats_moments.combine`), so a replaced time never needs a reverse (subtracting)
update and no rounding accumulates across refreshes. A state that cannot be read is ignored (logged)
and rebuilt; the statistics never depend on it being present.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from core.location import as_location, exists, is_remote, load_netcdf, stamp, write_netcdf
from ingest.stats_moments import Moments

log = logging.getLogger(__name__)

STATE_FORMAT = "spherecast-stats-state-1"
IDENTITY = ("state_format", "store_id", "dataset_version", "grid", "time_step_hours")
FLAG_NAMES = ("done", "expver", "replaced")


def default_state_path(store_path: Path) -> Path:
    """Where the running sums of statistics over ``store_path`` live unless the caller says otherwise."""
    store_path = as_location(store_path)
    stem = store_path.name[:-5] if store_path.name.endswith(".zarr") else store_path.name
    return store_path.with_name(f"{stem}.stats-state.nc")


def store_identity(store_path: Path, attrs: dict, step_hours: int) -> dict[str, str | int]:
    """The attrs a saved state must share with the store for its entries to be reused."""
    store_path = as_location(store_path)
    # The latitude array is written once, when the store is created (appends and replacements never
    # touch it): its metadata's mtime stamps this build even if a rebuilt store reuses the inode.
    lat = store_path / "latitude" / "zarr.json"
    if is_remote(store_path):
        # No inode on an object store: the URL and the object's own version stamp (ETag, else its time).
        store_id = f"{store_path}:{(stamp(lat) or (0, 0))[1]}"
    else:
        st = os.stat(store_path)
        born = lat.stat().st_mtime_ns if lat.is_file() else 0
        store_id = f"{st.st_dev}:{st.st_ino}:{born}"
    return {"state_format": STATE_FORMAT, "store_id": store_id,
            "dataset_version": str(attrs["dataset_version"]), "grid": str(attrs["grid"]),
            "time_step_hours": int(step_hours)}


def load_state(path: Path, identity: dict, channels: list[str]) -> xr.Dataset | None:
    """The saved state if it exists and belongs to this store and channel list, else None (logged)."""
    if not exists(path):
        return None
    try:
        state = load_netcdf(path)
    except (OSError, ValueError) as exc:
        log.warning("statistics state %s unreadable (%s): recomputing from the store", path, exc)
        return None
    differs = [k for k in IDENTITY if str(state.attrs.get(k)) != str(identity[k])]
    if differs or [str(c) for c in state["channel"].values] != list(channels):
        log.info("statistics state %s is for another store or channel list (%s): recomputing", path,
                 ", ".join(differs) or "channels")
        return None
    return state


def reuse(state: xr.Dataset | None, times: pd.DatetimeIndex, flags: np.ndarray, out: Moments) -> np.ndarray:
    """Copy the state's still-valid entries into ``out`` (rows = ``times``); the rows whose field entry was reused."""
    fresh = np.zeros(len(times), dtype=bool)
    if state is None or state.sizes["time"] == 0:
        return fresh
    pos = times.get_indexer(pd.DatetimeIndex(state["time"].values))
    saved = np.stack([state[f].values.astype(np.int64) for f in FLAG_NAMES], axis=1)
    ok = pos >= 0
    ok[ok] = (saved[ok] == flags[pos[ok]]).all(axis=1)
    # An entry summed from fill values (a shard missing when it was read) is never reused: read it again.
    ok &= np.isfinite(state["mean"].values).all(axis=1) & np.isfinite(state["m2"].values).all(axis=1)
    rows = pos[ok]
    fresh[rows] = True
    for name in ("mean", "m2", "dmean", "dm2"):
        getattr(out, name)[rows] = state[name].values[ok]
    # A tendency entry is valid only if both of its times are: the previous one's data may have changed.
    stale_pair = np.ones(len(times), dtype=bool)
    stale_pair[1:] = ~(fresh[1:] & fresh[:-1])
    out.dmean[stale_pair] = np.nan
    out.dm2[stale_pair] = np.nan
    return fresh


def save_state(path: Path, identity: dict, channels: list[str], times: pd.DatetimeIndex, flags: np.ndarray,
               moments: Moments, period: tuple[str, str]) -> None:
    """Write the period's entries atomically; a failure is logged, never raised (the state is a cache)."""
    ds = xr.Dataset(
        {name: (("time", "channel"), getattr(moments, name)) for name in ("mean", "m2", "dmean", "dm2")},
        coords={"time": times.values.astype("datetime64[ns]"), "channel": np.asarray(channels, dtype=str)},
        attrs={**identity, "period_start": period[0], "period_end": period[1]},
    )
    for k, name in enumerate(FLAG_NAMES):
        ds[name] = ("time", flags[:, k].astype(np.int8))
    try:
        write_netcdf(ds, path)
    except OSError as exc:
        log.warning("could not save the statistics state %s (%s): the next refresh reads the whole period", path, exc)


def forget_times(path: Path, times: pd.DatetimeIndex) -> int:
    """Mark the entries of ``times`` stale (their chunks were rewritten in place): the next refresh reads them.

    A repair rewrites a damaged time with the same flags it had, so the flags alone would let its old
    entry (computed from whatever was read before) be reused. Its ``done`` entry is set to -1, which no
    store flag equals; the number of entries marked is returned. A missing or unreadable state is left
    alone: the next refresh then reads the whole period anyway.
    """
    if not exists(path):
        return 0
    try:
        state = load_netcdf(path)
    except (OSError, ValueError):
        return 0
    hit = np.asarray(pd.DatetimeIndex(state["time"].values).isin(pd.DatetimeIndex(times)))
    if not hit.any():
        return 0
    done = state["done"].values.copy()
    done[hit] = -1
    state["done"] = ("time", done.astype(np.int8))
    try:
        write_netcdf(state, path)
    except OSError:
        path.unlink(missing_ok=True)  # a stale state must not survive: without it the refresh reads everything
    return int(hit.sum())
