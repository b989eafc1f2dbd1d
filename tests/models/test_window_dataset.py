"""Training windows: done flags respected, contents equal the store, sampler-compatible."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from core.fields import to_channels
from models.data import WindowDataset, open_analysis, time_stride
from tests.models.conftest import CHANNELS, moving_planet


@pytest.fixture
def store(tmp_path):
    ds = moving_planet(periods=20)
    ds["done"].values[[5, 12]] = 0
    path = tmp_path / "analysis.zarr"
    ds.to_zarr(path, zarr_format=3, consolidated=False)
    return open_analysis(path), ds


def test_windows_skip_every_time_that_is_not_done(store) -> None:
    analysis, _ = store
    ds = WindowDataset(analysis, CHANNELS, "2000-01-01", "2000-01-05T18", steps=2, time_step_hours=6)
    starts = [int(np.where(ds.times == t)[0][0]) for t in ds.init_times]
    # A start i needs i, i+1, i+2 done and inside the 20-time period.
    expected = [i for i in range(18) if not {i, i + 1, i + 2} & {5, 12}]
    assert starts == expected
    assert len(ds) == len(expected)


def test_window_contents_equal_the_store(store) -> None:
    analysis, raw = store
    ds = WindowDataset(analysis, CHANNELS, "2000-01-01", "2000-01-05T18", steps=3, time_step_hours=6)
    x0, targets = ds[2]
    t0 = pd.Timestamp(ds.init_times[2])
    truth = to_channels(raw, CHANNELS)
    assert x0.dtype == torch.float32 and x0.shape == (3, 17, 32)
    np.testing.assert_array_equal(x0.numpy(), truth.sel(time=t0).values)
    assert targets.shape == (3, 3, 17, 32)
    for k in range(3):
        np.testing.assert_array_equal(targets[k].numpy(), truth.sel(time=t0 + pd.Timedelta(hours=6 * (k + 1))).values)


def test_period_bounds_limit_the_targets(store) -> None:
    analysis, _ = store
    ds = WindowDataset(analysis, CHANNELS, "2000-01-01T06", "2000-01-02T18", steps=1, time_step_hours=6)
    assert pd.Timestamp(ds.init_times[0]) == pd.Timestamp("2000-01-01T06")
    assert pd.Timestamp(ds.init_times[-1]) == pd.Timestamp("2000-01-02T12")  # its target is the last time


def test_stride_for_a_finer_store(tmp_path) -> None:
    ds = moving_planet(periods=12)
    hourly = ds.assign_coords(time=pd.date_range("2000-01-01", periods=12, freq="3h").values)
    assert time_stride(hourly, 6) == 2
    windows = WindowDataset(hourly, CHANNELS, "2000-01-01", "2000-01-02T09", steps=2, time_step_hours=6)
    x0, y = windows[0]
    np.testing.assert_array_equal(y[0].numpy(), to_channels(hourly.isel(time=2), CHANNELS).values)
    with pytest.raises(ValueError, match="multiple"):
        time_stride(hourly, 4)


def test_distributed_sampler_splits_windows_between_ranks(store) -> None:
    analysis, _ = store
    ds = WindowDataset(analysis, CHANNELS, "2000-01-01", "2000-01-05T18", steps=1, time_step_hours=6)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0, drop_last=True)
        loader = DataLoader(ds, batch_size=2, sampler=sampler, drop_last=True)
        for x0, y in loader:
            assert x0.shape == (2, 3, 17, 32) and y.shape == (2, 1, 3, 17, 32)
        seen.append(set(sampler))
    assert not seen[0] & seen[1]  # disjoint shares
    assert len(seen[0]) == len(seen[1]) == len(ds) // 2


def test_missing_store_and_bad_steps_raise(tmp_path, store) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        open_analysis(tmp_path / "nope.zarr")
    with pytest.raises(ValueError, match="steps"):
        WindowDataset(store[0], CHANNELS, "2000-01-01", "2000-01-02", steps=0, time_step_hours=6)


def test_non_finite_values_at_done_times_are_refused(tmp_path) -> None:
    ds = moving_planet(periods=8)
    ds["geopotential"].values[3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        WindowDataset(ds, CHANNELS, "2000-01-01", "2000-01-02T18", steps=1, time_step_hours=6)
    ds["done"].values[3] = 0  # the same NaNs at a time that is not done are fine
    assert len(WindowDataset(ds, CHANNELS, "2000-01-01", "2000-01-02T18", steps=1, time_step_hours=6)) == 5


def test_time_mean_uses_done_times_only() -> None:
    ds = moving_planet(periods=8)
    ds["geopotential"].values[3] = 1e9
    ds["done"].values[3] = 0
    windows = WindowDataset(ds, CHANNELS, "2000-01-01", "2000-01-02T18", steps=1, time_step_hours=6)
    clim = windows.time_mean()
    done = to_channels(ds.isel(time=[0, 1, 2, 4, 5, 6, 7]), CHANNELS).values.mean(axis=0)
    np.testing.assert_allclose(clim.numpy(), done, rtol=1e-5)
