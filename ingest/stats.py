"""Normalization statistics over the training period only (never validation or test times).

Per channel: area-weighted ``mean`` and ``std`` of the field and ``diff_std``, the std of the
one-step (6 h) tendency, which GraphCast-style residual models predict in units of.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from core.errors import MissingInputError
from core.fields import to_channels
from core.grid import parse_grid_attr
from core.schema import validate_stats
from ingest.store import open_store


def compute_stats(store_path: Path, channels: list[str], start: datetime, end: datetime) -> xr.Dataset:
    """Statistics of ``channels`` over ``[start, end]``; every time there must be done."""
    store = open_store(store_path)
    period = store.sel(time=slice(pd.Timestamp(start), pd.Timestamp(end)))
    n = period.sizes["time"]
    if n < 2:
        raise MissingInputError(f"statistics period {start}..{end} holds {n} analysis times in {store_path}; need ≥ 2")
    done = period["done"].values.astype(bool)
    if not done.all():
        missing = period["time"].values[~done]
        raise MissingInputError(f"statistics period has {missing.size} times not yet ingested (first {missing[0]})")
    x = to_channels(period, channels).values.astype(np.float64)  # (time, channel, lat, lon)
    w = parse_grid_attr(store.attrs["grid"]).weights[None, None, :, None] / x.shape[-1]
    w = np.broadcast_to(w, (1,) + x.shape[1:])

    def wmean(a: np.ndarray) -> np.ndarray:
        return (a * w).sum(axis=(2, 3)).mean(axis=0)

    mean = wmean(x)
    std = np.sqrt(wmean((x - mean[None, :, None, None]) ** 2))
    diff = np.diff(x, axis=0)
    diff_std = np.sqrt(wmean((diff - wmean(diff)[None, :, None, None]) ** 2))
    step_h = int((store["time"].values[1] - store["time"].values[0]) / np.timedelta64(1, "h"))
    ds = xr.Dataset(
        {"mean": ("channel", mean), "std": ("channel", std), "diff_std": ("channel", diff_std)},
        coords={"channel": np.asarray(channels, dtype=str)},
        attrs={"period_start": str(pd.Timestamp(start)), "period_end": str(pd.Timestamp(end)),
               "dataset_version": store.attrs["dataset_version"], "grid": store.attrs["grid"],
               "time_step_hours": step_h, "samples": n},
    )
    return validate_stats(ds, channels)


def write_stats(ds: xr.Dataset, path: Path) -> Path:
    """Write statistics as NetCDF atomically (temp file + rename)."""
    validate_stats(ds)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    ds.to_netcdf(tmp)
    os.replace(tmp, path)
    return path


def read_stats(path: Path, channels: list[str] | None = None) -> xr.Dataset:
    """Load and validate statistics."""
    if not path.is_file():
        raise MissingInputError(f"statistics file {path} does not exist; run `spherecast ingest` first")
    with xr.open_dataset(path) as ds:
        return validate_stats(ds.load(), channels, what=f"stats {path}")
