"""Day-of-year × hour-of-day climatology of the analysis store's training years, smoothed and cached.

For day of year ``d`` (1…366) and hour ``h`` the climatology is the mean of every completed
training-period analysis at hour ``h`` whose day of year lies within ±``window`` days of ``d``
(circularly on a 366-day year): ``Σ_window sums / Σ_window counts``. Where that window holds no
sample (a training period shorter than a year) the hour's mean over the whole period stands in,
and ``count`` records how many samples each value rests on (0 = the stand-in).

Built one analysis time at a time into per-(day, hour) sums; the sums for one latitude band at a
time stay under a memory budget (a 0.25° grid takes several passes), and each band is written
into a Zarr store built aside and renamed into place. The store is cached under
``<verification>/climatology/`` keyed by the store's ``dataset_version``, the period, the window,
the grid and the period's ``done``/``expver``/``replaced`` flags, so an ERA5T time of the training
years replaced by final ERA5 builds a new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import dask.array
import numpy as np
import pandas as pd
import xarray as xr

from core.errors import DataContractError, MissingInputError
from core.schema import FLAG_VARIABLES
from core.variables import VARIABLES, parse_channel

log = logging.getLogger(__name__)

DAYS = 366
CLIM_DIR = "climatology"
DEFAULT_MAX_BYTES = 512 * 2**20
CHUNK_BYTES = 16 * 2**20
READ_BYTES = 64 * 2**20


def store_channels(store: xr.Dataset) -> list[str]:
    """Every channel of an analysis (or forecast) dataset, in vocabulary order, levels ascending.

    The order is fixed by the vocabulary, not by the store's listing, which Zarr does not promise.
    """
    out: list[str] = []
    for name, var in VARIABLES.items():
        if name not in store.data_vars or name in FLAG_VARIABLES:
            continue
        if var.level_type == "pressure":
            out.extend(f"{name}_{int(lv)}" for lv in sorted(store["level"].values))
        else:
            out.append(name)
    return out


def channel_array(ds: xr.Dataset, channels: list[str], **index: int | slice) -> xr.DataArray:
    """``(…, channel, latitude, longitude)`` float64 of ``ds.isel(**index)``, read variable by variable.

    The same stack as :func:`core.fields.to_channels` without its per-call merging, which costs
    more than reading a small field; this is the inner loop of the climatology and the scores.
    """
    parts, cache = [], {}
    for ch in channels:
        name, level = parse_channel(ch)
        if name not in ds.data_vars:
            raise DataContractError(f"dataset has no variable {name!r} (needed for channel {ch!r})")
        if name not in cache:
            cache[name] = ds[name].isel(**{k: v for k, v in index.items() if k in ds[name].dims})
        da = cache[name]
        if level is not None:
            levels = ds["level"].values.tolist()
            if level not in levels:
                raise DataContractError(f"dataset has no level {level} for {name!r} (needed for channel {ch!r})")
            da = da.isel(level=levels.index(level))
        lead = [d for d in da.dims if d not in ("latitude", "longitude")]
        parts.append(np.asarray(da.transpose(*lead, "latitude", "longitude").values, dtype=np.float64))
    ref = cache[parse_channel(channels[0])[0]]
    dims = [d for d in ref.dims if d not in ("level", "latitude", "longitude")]
    coords = {d: ref[d].values for d in dims if d in ref.coords}
    coords.update(channel=list(channels), latitude=ref["latitude"].values, longitude=ref["longitude"].values)
    return xr.DataArray(np.stack(parts, axis=len(dims)), dims=(*dims, "channel", "latitude", "longitude"),
                        coords=coords)


def _period_mask(store: xr.Dataset, start: pd.Timestamp, end: pd.Timestamp) -> np.ndarray:
    times = pd.DatetimeIndex(store["time"].values)
    done = store["done"].values.astype(bool)
    return np.asarray((times >= start) & (times <= end)) & done


def climatology_key(store: xr.Dataset, start: pd.Timestamp, end: pd.Timestamp, window_days: int) -> str:
    """Cache key of a climatology: dataset version, period, window, grid, channels and the period's flags."""
    mask = _period_mask(store, start, end)
    flags = hashlib.sha256(mask.tobytes())
    for name in ("expver", "replaced"):
        if name in store.data_vars:
            flags.update(np.asarray(store[name].values)[mask].tobytes())
    ident = {"dataset_version": str(store.attrs.get("dataset_version")), "start": start.isoformat(),
             "end": end.isoformat(), "window_days": window_days, "grid": str(store.attrs.get("grid")),
             "channels": store_channels(store), "flags": flags.hexdigest()}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _smooth(values: np.ndarray, window_days: int) -> np.ndarray:
    """Circular running sum over ±``window_days`` along axis 0."""
    if window_days == 0:
        return values.copy()
    if 2 * window_days + 1 >= values.shape[0]:
        return np.broadcast_to(values.sum(0, keepdims=True), values.shape).copy()
    out = values.copy()
    for k in range(1, window_days + 1):
        out += np.roll(values, k, axis=0) + np.roll(values, -k, axis=0)
    return out


def build_climatology(store: xr.Dataset, start: pd.Timestamp, end: pd.Timestamp, window_days: int,
                      path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
    """Compute the smoothed day-of-year × hour climatology of ``store`` over ``[start, end]`` into Zarr ``path``."""
    if window_days < 0:
        raise ValueError(f"climatology window must be ≥ 0 days, got {window_days}")
    mask = _period_mask(store, start, end)
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        raise MissingInputError(f"the analysis store has no completed time between {start} and {end} to build a "
                                "climatology from (check train.train_start/train_end)")
    channels = store_channels(store)
    times = pd.DatetimeIndex(store["time"].values[idx])
    hours = np.unique(times.hour)
    doy_i = times.day_of_year.values - 1
    hour_i = np.searchsorted(hours, times.hour.values)
    nlat, nlon, nch = store.sizes["latitude"], store.sizes["longitude"], len(channels)
    per_row = DAYS * hours.size * nch * nlon * 8
    rows = max(1, min(nlat, max_bytes // per_row))
    counts = np.zeros((DAYS, hours.size))
    np.add.at(counts, (doy_i, hour_i), 1.0)
    counts_s = _smooth(counts, window_days)
    hour_counts = counts.sum(0)

    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    coords = {"dayofyear": np.arange(1, DAYS + 1), "hour": hours.astype(np.int32),
              "channel": np.asarray(channels, dtype=object),
              "latitude": store["latitude"].values, "longitude": store["longitude"].values}
    shape = (DAYS, hours.size, nch, nlat, nlon)
    # Chunks follow the bands (aligned region writes) and hold ~16 MiB of days each.
    days = int(max(1, min(DAYS, CHUNK_BYTES // (hours.size * nch * rows * nlon * 4))))
    chunks = (days, hours.size, nch, rows, nlon)
    template = xr.Dataset(
        # A lazy template: only metadata (and the small ``count``) is written before the bands.
        {"climatology": (tuple(coords), dask.array.zeros(shape, dtype=np.float32, chunks=chunks)),
         "count": (("dayofyear", "hour"), np.where(counts_s > 0, counts_s, 0).astype(np.int32))},
        coords=coords,
        attrs={"dataset_version": str(store.attrs.get("dataset_version")), "grid": str(store.attrs.get("grid")),
               "period_start": start.isoformat(), "period_end": end.isoformat(), "window_days": window_days,
               "samples": int(idx.size)})
    template.to_zarr(tmp, zarr_format=3, consolidated=False, compute=False, mode="w",
                     encoding={"climatology": {"chunks": chunks}})
    for lo in range(0, nlat, rows):
        hi = min(nlat, lo + rows)
        sums = np.zeros((DAYS, hours.size, nch, hi - lo, nlon))
        # Consecutive times are read together (each read has a fixed cost), a batch at most READ_BYTES.
        batch = max(1, READ_BYTES // (nch * (hi - lo) * nlon * 8))
        a = 0
        while a < idx.size:
            # The batch ends before it would span more than ``batch`` store times (undone gaps included).
            b = a + int(np.searchsorted(idx[a:], idx[a] + batch))
            sel, a = slice(a, b), b
            first, last = int(idx[sel][0]), int(idx[sel][-1])
            block = channel_array(store, channels, time=slice(first, last + 1), latitude=slice(lo, hi)).values
            np.add.at(sums, (doy_i[sel], hour_i[sel]), block[idx[sel] - first])
        hour_mean = sums.sum(0) / np.where(hour_counts > 0, hour_counts, np.nan)[:, None, None, None]
        smoothed = _smooth(sums, window_days)
        with np.errstate(invalid="ignore", divide="ignore"):
            clim = smoothed / counts_s[:, :, None, None, None]
        clim = np.where(counts_s[:, :, None, None, None] > 0, clim, hour_mean[None])
        part = xr.Dataset({"climatology": (tuple(coords), clim.astype(np.float32))})
        part.to_zarr(tmp, region={"dayofyear": slice(None), "hour": slice(None), "channel": slice(None),
                                  "latitude": slice(lo, hi), "longitude": slice(None)}, consolidated=False)
        log.info("climatology rows %d–%d of %d from %d times", lo, hi, nlat, idx.size)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def cached_climatology(store: xr.Dataset, start: pd.Timestamp, end: pd.Timestamp, window_days: int,
                       verification_dir: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> xr.Dataset:
    """The climatology for this store and period, built once and opened lazily from the cache."""
    key = climatology_key(store, start, end, window_days)
    path = Path(verification_dir) / CLIM_DIR / f"clim-{key}.zarr"
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_climatology(store, start, end, window_days, path, max_bytes)
    ds = xr.open_zarr(path, consolidated=False, chunks=None)
    return ds.assign_attrs(key=key)


def climatology_at(clim: xr.Dataset, valid_time: pd.Timestamp | np.datetime64, channels: list[str]) -> xr.DataArray:
    """The climatology's ``(channel, latitude, longitude)`` field for a valid time (nearest hour of day)."""
    t = pd.Timestamp(valid_time)
    missing = [c for c in channels if c not in clim["channel"].values]
    if missing:
        raise DataContractError(f"the climatology has no channels {missing}")
    hours = clim["hour"].values
    dist = np.abs(((hours - t.hour) + 12) % 24 - 12)
    field = clim["climatology"].isel(dayofyear=t.day_of_year - 1, hour=int(np.argmin(dist)))
    return field.sel(channel=channels).drop_vars(["dayofyear", "hour"]).load()
