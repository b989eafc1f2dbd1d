"""Fixtures for models tests: a tiny on-disk analysis store + stats (makani-style) and configs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from core.config import Config, config_from_dict
from core.fields import to_channels
from core.grid import get_grid
from core.testing import analysis_dataset

REPO = Path(__file__).resolve().parents[2]

CHANNELS = ["geopotential_500", "u_component_of_wind_500", "v_component_of_wind_500"]
PERIODS = 80  # 20 days, 6-hourly: 2000-01-01 .. 2000-01-20T18
TRAIN = {"train_start": "2000-01-01", "train_end": "2000-01-15T18", "val_start": "2000-01-16", "val_end": "2000-01-20T18"}


def moving_planet(grid: str = "tiny", periods: int = PERIODS, seed: int = 0) -> xr.Dataset:
    """A contract-valid analysis whose fields are a wave-2 pattern drifting east: predictable, not persistent."""
    ds = analysis_dataset(grid, periods=periods, seed=seed)
    g = get_grid(grid)
    lat, lon = np.deg2rad(g.latitudes), np.deg2rad(g.longitudes)
    t = np.arange(periods)[:, None, None]
    for name, amp, centre in (("geopotential", 2000.0, 5.5e4), ("u_component_of_wind", 10.0, 0.0),
                              ("v_component_of_wind", 5.0, 0.0)):
        field = centre + amp * np.cos(lat)[None, :, None] * np.cos(2 * (lon[None, None, :] - 0.3 * t))
        ds[name].values[:, 0] = field.astype(np.float32)
    return ds


def stats_for(ds: xr.Dataset, start: str, end: str) -> xr.Dataset:
    """Area-weighted per-channel mean/std and 1-step tendency std over ``[start, end]`` (like ingest)."""
    x = to_channels(ds.sel(time=slice(start, end)), CHANNELS).values.astype(np.float64)
    w = get_grid(ds.attrs["grid"].split(":")[0]).weights[None, None, :, None] / x.shape[-1]

    def wmean(a: np.ndarray) -> np.ndarray:
        return (a * w).sum(axis=(2, 3)).mean(axis=0)

    mean = wmean(x)
    std = np.sqrt(wmean((x - mean[None, :, None, None]) ** 2))
    d = np.diff(x, axis=0)
    diff_std = np.sqrt(wmean((d - wmean(d)[None, :, None, None]) ** 2))
    return xr.Dataset(
        {"mean": ("channel", mean), "std": ("channel", std), "diff_std": ("channel", diff_std)},
        coords={"channel": CHANNELS},
        attrs={"period_start": start, "period_end": end, "dataset_version": ds.attrs["dataset_version"],
               "grid": ds.attrs["grid"], "time_step_hours": 6},
    )


def write_data(root: Path, ds: xr.Dataset) -> None:
    """Write ``ds`` as ``<root>/data/analysis.zarr`` and its training-period stats as ``stats.nc``."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    ds.to_zarr(data / "analysis.zarr", zarr_format=3, consolidated=False)
    stats_for(ds, TRAIN["train_start"], TRAIN["train_end"]).to_netcdf(data / "stats.nc")


def tiny_config(root: Path, **train: object) -> Config:
    """Config for the tiny grid under ``root``: short periods, a step cap, small batch, 1 thread."""
    t = {**TRAIN, "max_steps": 12, "batch_size": 4, "threads": 1, "budget_minutes": 5.0, **train}
    return config_from_dict({"paths": {"root": str(root)}, "grid": {"preset": "tiny"}, "train": t})


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # Polite on a shared 2-core machine and avoids oversubscription between tests.
    torch.set_num_threads(1)


@pytest.fixture
def tiny_data(tmp_path: Path) -> Callable[..., Config]:
    """Factory: write a tiny store (optionally with some times not done) and return its config."""

    def make(not_done: tuple[int, ...] = (), **train: object) -> Config:
        ds = moving_planet()
        ds["done"].values[list(not_done)] = 0
        write_data(tmp_path, ds)
        return tiny_config(tmp_path, **train)

    return make


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Path]:
    """One short in-process training run shared by checkpoint and forecast tests."""
    from models.train import train

    root = tmp_path_factory.mktemp("trained")
    write_data(root, moving_planet())
    config = tiny_config(root, max_steps=8)
    return config, train(config)
