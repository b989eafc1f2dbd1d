"""The day-of-year × hour climatology against a direct numpy smoothed mean, across a year boundary,
built in latitude bands under a tiny memory budget, cached by store state, and its bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from core.climatology import build_climatology, cached_climatology, climatology_at, store_channels
from core.fields import to_channels
from core.schema import EXPVER_PRELIMINARY
from core.testing import analysis_dataset

START, END = pd.Timestamp("1999-12-20"), pd.Timestamp("2000-01-09T12")


def numpy_climatology(store: xr.Dataset, start: pd.Timestamp, end: pd.Timestamp, window: int) -> np.ndarray:
    """(366, hours, channel, lat, lon): mean of samples within ±window days (circular), else the hour's mean."""
    times = pd.DatetimeIndex(store["time"].values)
    keep = (times >= start) & (times <= end) & store["done"].values.astype(bool)
    values = to_channels(store, store_channels(store)).values[keep].astype(np.float64)
    doy, hour = times[keep].day_of_year.values, times[keep].hour.values
    hours = np.unique(hour)
    out = np.empty((366, hours.size) + values.shape[1:])
    for d in range(1, 367):
        dist = np.abs(doy - d)
        dist = np.minimum(dist, 366 - dist)
        for j, h in enumerate(hours):
            sel = (dist <= window) & (hour == h)
            out[d - 1, j] = values[sel].mean(0) if sel.any() else values[hour == h].mean(0)
    return out


@pytest.fixture()
def store() -> xr.Dataset:
    ds = analysis_dataset(start="1999-12-15", periods=2 * 30, step_hours=12, levels=(500, 850))
    ds["done"][-3:] = 0  # not yet arrived: must not count
    return ds


def test_climatology_equals_numpy_smoothed_mean_in_one_pass_and_in_bands(store: xr.Dataset, tmp_path: Path) -> None:
    expected = numpy_climatology(store, START, END, 3)
    one = xr.open_zarr(build_climatology(store, START, END, 3, tmp_path / "one.zarr"), consolidated=False, chunks=None)
    assert one["climatology"].dims == ("dayofyear", "hour", "channel", "latitude", "longitude")
    assert one["hour"].values.tolist() == [0, 12]
    assert one["channel"].values.tolist() == store_channels(store)
    np.testing.assert_allclose(one["climatology"].values, expected, rtol=1e-6)
    # The window wraps the year: 31 Dec is 2 days (through day 366) from 1 Jan, and both are covered.
    assert one["count"].sel(dayofyear=366, hour=0).item() > 0
    # A budget of five latitude rows per pass (4 passes) gives the same numbers.
    row_bytes = 366 * 2 * len(store_channels(store)) * store.sizes["longitude"] * 8
    bands = build_climatology(store, START, END, 3, tmp_path / "bands.zarr", max_bytes=5 * row_bytes)
    np.testing.assert_array_equal(xr.open_zarr(bands, consolidated=False, chunks=None)["climatology"].values,
                                  one["climatology"].values)
    # Days whose window holds no sample fall back to the hour's mean and say so with count 0.
    assert one["count"].sel(dayofyear=180, hour=12).item() == 0
    field = climatology_at(one, pd.Timestamp("2001-06-29T13"), ["geopotential_850"])
    np.testing.assert_allclose(field.values[0], expected[179, 1, 1], rtol=1e-6)


def test_window_zero_is_the_plain_doy_hour_mean(store: xr.Dataset, tmp_path: Path) -> None:
    got = xr.open_zarr(build_climatology(store, START, END, 0, tmp_path / "c.zarr"), consolidated=False, chunks=None)
    np.testing.assert_allclose(got["climatology"].values, numpy_climatology(store, START, END, 0), rtol=1e-6)


def test_cache_is_reused_and_rebuilt_when_training_truth_changes(store: xr.Dataset, tmp_path: Path) -> None:
    a = cached_climatology(store, START, END, 3, tmp_path)
    files = sorted((tmp_path / "climatology").iterdir())
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    b = cached_climatology(store, START, END, 3, tmp_path)
    assert b.attrs["key"] == a.attrs["key"] and files[0].stat().st_mtime_ns == mtime
    changed = store.copy(deep=True)
    changed["expver"][12] = EXPVER_PRELIMINARY  # 21 Dec, inside the period
    c = cached_climatology(changed, START, END, 3, tmp_path)
    assert c.attrs["key"] != a.attrs["key"]
    assert cached_climatology(store, START, END, 5, tmp_path).attrs["key"] not in (a.attrs["key"], c.attrs["key"])


def test_bad_inputs_name_the_problem(store: xr.Dataset, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no completed time between"):
        build_climatology(store, pd.Timestamp("1990-01-01"), pd.Timestamp("1990-02-01"), 3, tmp_path / "x.zarr")
    with pytest.raises(ValueError, match="window must be ≥ 0"):
        build_climatology(store, START, END, -1, tmp_path / "x.zarr")
    clim = cached_climatology(store, START, END, 3, tmp_path)
    with pytest.raises(ValueError, match="no channels"):
        climatology_at(clim, START, ["2m_temperature"])
    assert not (tmp_path / "x.zarr").exists()
