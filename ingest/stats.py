"""Normalization statistics over the training period only (never validation or test times).

Per channel: area-weighted ``mean`` and ``std`` of the field and ``diff_std``, the std of the
one-step (6 h) tendency, which GraphCast-style residual models predict in units of.

Computed as a streaming reduction (:mod:`ingest.stats_moments`): the period is read in blocks of at
most ``budget_bytes`` of float32 fields, each time is reduced to its per-channel moments in float64,
and the moments are merged with Chan et al.'s parallel-variance formula. Memory is one block plus
``(times, channels)`` numbers, whatever the period. The per-time moments are saved beside the store
(:mod:`ingest.stats_state`), so a refresh after an append reads only the new times (and the last old
one, for the tendency into the first new one), and a time whose flags changed (ERA5T replaced by
final) is read again with its neighbours; a moved period reads only the times it newly covers.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from core.errors import MissingInputError
from core.grid import parse_grid_attr
from core.location import as_location, exists, load_netcdf, write_netcdf
from core.schema import validate_stats
from ingest.stats_moments import DEFAULT_BUDGET, READS, BlockReader, Moments, combine, contiguous, read_moments
from ingest.stats_state import FLAG_NAMES, default_state_path, load_state, reuse, save_state, store_identity
from ingest.store import open_store, read_flags

__all__ = ["DEFAULT_BUDGET", "READS", "compute_stats", "default_state_path", "read_stats", "write_stats"]

log = logging.getLogger(__name__)


def compute_stats(store_path: Path, channels: list[str], start: datetime, end: datetime, *,
                  state_path: Path | None = None, incremental: bool = True,
                  budget_bytes: int = DEFAULT_BUDGET) -> xr.Dataset:
    """Statistics of ``channels`` over ``[start, end]``; every time there must be done.

    ``state_path`` (default :func:`default_state_path`) keeps the per-time sums between calls;
    ``incremental=False`` neither reads nor writes it (a from-scratch pass).
    """
    store_path = as_location(store_path)
    store = open_store(store_path)
    times = pd.DatetimeIndex(store["time"].values)
    lo = int(times.searchsorted(pd.Timestamp(start)))
    hi = int(times.searchsorted(pd.Timestamp(end), side="right"))
    n = hi - lo
    if n < 2:
        raise MissingInputError(f"statistics period {start}..{end} holds {n} analysis times in {store_path}; need ≥ 2")
    raw = read_flags(store_path)
    flags = np.stack([raw[f].values[lo:hi].astype(np.int64) for f in FLAG_NAMES], axis=1)
    done = flags[:, 0].astype(bool)
    if not done.all():
        missing = times[lo:hi][~done]
        raise MissingInputError(f"statistics period has {missing.size} times not yet ingested (first {missing[0]})")
    step_h = int((times[1] - times[0]) / pd.Timedelta(1, "h"))
    grid = parse_grid_attr(store.attrs["grid"])
    period = times[lo:hi]
    moments = Moments.empty(n, len(channels))
    state_file = as_location(state_path) if state_path is not None else default_state_path(store_path)
    identity = store_identity(store_path, store.attrs, step_h)
    fresh = reuse(load_state(state_file, identity, channels) if incremental else None, period, flags, moments)
    # Times to read: every stale entry, and both ends of every stale tendency (adjacent, so one run).
    rows = set(np.flatnonzero(~fresh).tolist())
    for r in np.flatnonzero(np.isnan(moments.dmean[1:, 0])) + 1:
        rows.update((int(r) - 1, int(r)))
    runs = contiguous(r + lo for r in rows)
    before = READS.times
    reader = BlockReader(store_path, channels, grid.weights, budget_bytes)
    read_moments(reader, runs, moments, lo)
    log.info("statistics over %s..%s: read %d of %d times (%d per block), %d reused from %s", period[0], period[-1],
             READS.times - before, n, reader.block, int(fresh.sum()), state_file if incremental else "nothing")
    mean, var = combine(moments.mean, moments.m2)
    _, dvar = combine(moments.dmean[1:], moments.dm2[1:])
    if incremental:
        save_state(state_file, identity, channels, period, flags, moments,
                   (str(pd.Timestamp(start)), str(pd.Timestamp(end))))
    ds = xr.Dataset(
        {"mean": ("channel", mean), "std": ("channel", np.sqrt(var)), "diff_std": ("channel", np.sqrt(dvar))},
        coords={"channel": np.asarray(channels, dtype=str)},
        attrs={"period_start": str(pd.Timestamp(start)), "period_end": str(pd.Timestamp(end)),
               "dataset_version": store.attrs["dataset_version"], "grid": store.attrs["grid"],
               "time_step_hours": step_h, "samples": n},
    )
    return validate_stats(ds, channels)


def write_stats(ds: xr.Dataset, path: Path) -> Path:
    """Write statistics as NetCDF atomically (temp file + rename, or one upload to an object store)."""
    validate_stats(ds)
    path = as_location(path)
    write_netcdf(ds, path)
    return path


def read_stats(path: Path, channels: list[str] | None = None) -> xr.Dataset:
    """Load and validate statistics."""
    path = as_location(path)
    if not exists(path):
        raise MissingInputError(f"statistics file {path} does not exist; run `spherecast ingest` first")
    return validate_stats(load_netcdf(path), channels, what=f"stats {path}")
