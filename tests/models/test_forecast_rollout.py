"""Forecast rollout and files: contract-valid, lead 0 is the analysis, NetCDF equals Zarr, clear errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from core.fields import to_channels
from core.schema import validate_forecast
from models.data import open_analysis
from models.forecast import load_forecaster, rollout, write_forecast
from tests.models.conftest import CHANNELS, moving_planet


@pytest.fixture(scope="module")
def forecaster(trained):
    config, path = trained
    model, meta = load_forecaster(path)
    return model, meta, open_analysis(config.paths.analysis_store)


def test_rollout_follows_the_contract(forecaster) -> None:
    model, meta, analysis = forecaster
    ds = rollout(model, meta, analysis, "2000-01-17T06", 48)
    validate_forecast(ds)
    assert ds.sizes == {"init_time": 1, "lead_time": 9, "level": 1, "latitude": 17, "longitude": 32}
    assert list(ds["lead_time"].values.astype("timedelta64[h]").astype(int)) == list(range(0, 49, 6))
    assert pd.Timestamp(ds["valid_time"].values[0, -1]) == pd.Timestamp("2000-01-19T06")
    assert set(ds.data_vars) == {"geopotential", "u_component_of_wind", "v_component_of_wind"}
    assert all(ds[v].dtype == np.float32 for v in ds.data_vars)
    assert ds["geopotential"].attrs["units"] == "m**2 s**-2"
    assert ds["latitude"].attrs["units"] == "degrees_north"
    assert ds["lead_time"].attrs["standard_name"] == "forecast_period"
    assert ds.attrs["checkpoint_weights_sha256"] == meta["weights_sha256"]
    assert ds.attrs["dataset_version"] == meta["dataset_version"]
    lead0 = to_channels(ds.isel(init_time=0, lead_time=0), CHANNELS).values
    truth = to_channels(analysis.sel(time="2000-01-17T06"), CHANNELS).values
    np.testing.assert_array_equal(lead0, truth)  # lead 0 is the analysis itself
    assert not np.array_equal(ds["geopotential"].values[0, 1], ds["geopotential"].values[0, 0])


def test_written_netcdf_reopens_equal_to_the_zarr(forecaster, tmp_path) -> None:
    model, meta, analysis = forecaster
    ds = rollout(model, meta, analysis, "2000-01-17", 24)
    paths = write_forecast(ds, tmp_path / "staging")
    assert [p.name for p in paths] == ["forecast.zarr", "forecast.nc", "forecast.grib2"]
    z = xr.open_zarr(paths[0], consolidated=False).load()
    # CF carries lead_time as plain hours (no xarray dtype attribute): ask for the timedelta decoding.
    with xr.open_dataset(paths[1], engine="netcdf4", decode_timedelta=True) as nc:
        n = nc.load()
    validate_forecast(z)
    validate_forecast(n)
    xr.testing.assert_identical(z, ds)
    xr.testing.assert_equal(n, z)
    assert z["geopotential"].encoding["chunks"][:2] == (1, 1)  # one chunk per lead
    with xr.open_dataset(paths[1], engine="netcdf4", decode_timedelta=False) as raw:
        assert raw["lead_time"].attrs["units"] == "hours"
        assert raw["lead_time"].values.tolist() == [0, 6, 12, 18, 24]


def test_init_time_not_done_or_absent_is_refused(forecaster) -> None:
    model, meta, analysis = forecaster
    flagged = analysis.copy()
    flagged["done"] = flagged["done"].copy(data=flagged["done"].values.copy())
    flagged["done"].values[68] = 0
    with pytest.raises(ValueError, match="not complete"):
        rollout(model, meta, flagged, flagged["time"].values[68], 24)
    with pytest.raises(ValueError, match="not an analysis time"):
        rollout(model, meta, analysis, "2001-01-01", 24)


def test_lead_not_a_multiple_of_the_step_is_refused(forecaster) -> None:
    model, meta, analysis = forecaster
    with pytest.raises(ValueError, match="multiple of the model step"):
        rollout(model, meta, analysis, "2000-01-17", 10)


def test_missing_channel_is_refused(forecaster) -> None:
    model, meta, analysis = forecaster
    with pytest.raises(ValueError, match="v_component_of_wind"):
        rollout(model, meta, analysis.drop_vars("v_component_of_wind"), "2000-01-17", 6)


def test_other_grid_runs_zero_shot(trained) -> None:
    _, path = trained
    model, meta = load_forecaster(path)  # trained on 17×32
    analysis = moving_planet(grid="5.625deg", periods=8)
    ds = rollout(model, meta, analysis, "2000-01-01T06", 12)
    validate_forecast(ds)
    assert ds.sizes["latitude"] == 33 and ds.sizes["longitude"] == 64
    assert ds.attrs["grid"] == analysis.attrs["grid"] and ds.attrs["model_grid"] == meta["grid"]
    assert np.isfinite(ds["geopotential"].values).all()


def test_a_zero_hour_forecast_is_the_analysis_alone(forecaster) -> None:
    model, meta, analysis = forecaster
    ds = rollout(model, meta, analysis, "2000-01-17T06", 0)
    assert ds.sizes["lead_time"] == 1
    np.testing.assert_array_equal(to_channels(ds.isel(init_time=0, lead_time=0), CHANNELS).values,
                                  to_channels(analysis.sel(time="2000-01-17T06"), CHANNELS).values)
