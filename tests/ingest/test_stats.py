from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from core.fields import to_channels
from core.grid import get_grid
from core.testing import analysis_dataset
from ingest.stats import compute_stats, read_stats, write_stats
from ingest.store import StoreLayout, create_store, open_store, write_slab

VARS = ("geopotential", "u_component_of_wind", "v_component_of_wind")
CH = ["geopotential_500", "u_component_of_wind_500", "v_component_of_wind_500"]


def store_from(ds: xr.Dataset, path: Path, upto: int | None = None) -> Path:
    create_store(path, StoreLayout(get_grid("tiny"), VARS, (500,), pd.DatetimeIndex(ds.time.values), "t", "v1"))
    store = open_store(path)
    n = ds.sizes["time"] if upto is None else upto
    write_slab(path, store, ds.isel(time=slice(0, n)), 0)
    return path


def test_stats_match_oracle_and_ignore_later_times(tmp_path: Path) -> None:
    ds = analysis_dataset(periods=8)
    path = store_from(ds, tmp_path / "a.zarr")
    start, end = ds.time.values[0], ds.time.values[5]
    st = compute_stats(path, CH, start, end)
    x = to_channels(ds.isel(time=slice(0, 6)), CH).values.astype(float)
    w = get_grid("tiny").weights[None, None, :, None] / 32
    mean = (x * w).sum((2, 3)).mean(0)
    std = np.sqrt((((x - mean[None, :, None, None]) ** 2) * w).sum((2, 3)).mean(0))
    # Zero-mean winds: their means are rounding noise (~1e-17), compared on the scale of the field.
    np.testing.assert_allclose(st["mean"].values, mean, rtol=1e-10, atol=1e-10 * std.max())
    np.testing.assert_allclose(st["std"].values, std, rtol=1e-10)
    d = np.diff(x, axis=0)
    dm = (d * w).sum((2, 3)).mean(0)
    np.testing.assert_allclose(st["diff_std"].values, np.sqrt((((d - dm[None, :, None, None]) ** 2) * w).sum((2, 3)).mean(0)), rtol=1e-10)
    # Validation-period values must not leak into the statistics.
    ds2 = ds.copy(deep=True)
    ds2["geopotential"][6:] = ds2["geopotential"][6:] * 3
    st2 = compute_stats(store_from(ds2, tmp_path / "b.zarr"), CH, start, end)
    xr.testing.assert_allclose(st, st2)
    out = write_stats(st, tmp_path / "stats.nc")
    back = read_stats(out, CH)
    assert back.attrs["period_end"] == str(pd.Timestamp(end)) and back.attrs["dataset_version"] == "v1"


def test_stats_refuse_incomplete_period(tmp_path: Path) -> None:
    ds = analysis_dataset(periods=8)
    path = store_from(ds, tmp_path / "a.zarr", upto=4)
    with pytest.raises(ValueError, match="4 times not yet ingested"):
        compute_stats(path, CH, ds.time.values[0], ds.time.values[-1])
    with pytest.raises(ValueError, match="does not exist"):
        read_stats(tmp_path / "missing.nc")
