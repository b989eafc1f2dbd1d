import numpy as np
import pandas as pd
import pytest
import xarray as xr

from core.fields import from_channels, to_channels
from core.metrics import acc, bias, relative_error, rmse, weighted_mean
from core.schema import validate_analysis, validate_forecast, validate_stats
from core.testing import analysis_dataset

CHANNELS = ["geopotential_500", "u_component_of_wind_500", "v_component_of_wind_500"]


def forecast_from(ds: xr.Dataset) -> xr.Dataset:
    leads = pd.to_timedelta(np.arange(ds.sizes["time"]) * 6, unit="h")
    fc = ds.drop_vars(["done", "expver"]).rename(time="lead_time").assign_coords(lead_time=leads.values)
    fc = fc.expand_dims(init_time=[ds["time"].values[0]])
    return fc.assign_coords(valid_time=(("init_time", "lead_time"), ds["time"].values[None, :]))


def test_factory_output_passes_and_roundtrips_channels() -> None:
    ds = analysis_dataset(levels=(500, 850))
    stack = to_channels(ds, ["geopotential_850", "geopotential_500"])
    assert list(stack.channel.values) == ["geopotential_850", "geopotential_500"]
    back = from_channels(to_channels(ds, CHANNELS), CHANNELS)
    xr.testing.assert_identical(back["u_component_of_wind"], ds["u_component_of_wind"].sel(level=[500]))
    validate_forecast(forecast_from(ds.sel(level=[500])))


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d.drop_attrs(), "missing root attribute 'schema_version'"),
        (lambda d: d.isel(latitude=slice(None, None, -1)), "latitude must run from 90 to -90"),
        (lambda d: d.isel(time=[0, 1, 3]), "time axis is not regular"),
        (lambda d: d.rename(geopotential="z"), "'z' is not in the vocabulary"),
        (lambda d: d.assign(geopotential=d.geopotential.astype("float64")), "expected float32"),
        (lambda d: d.assign(geopotential=d.geopotential.assign_attrs(units="m")), "has units 'm'"),
        (lambda d: d.drop_vars("done"), "'done'(time)"),
        (lambda d: d.assign_coords(longitude=d.longitude - 180), "longitude must run 0"),
    ],
)
def test_bad_analysis_names_the_problem(mutate, needle: str) -> None:
    ds = analysis_dataset()
    with pytest.raises(ValueError, match="analysis store") as info:
        validate_analysis(mutate(ds))
    assert needle in str(info.value)


def test_forecast_contract_rejects_wrong_valid_time() -> None:
    fc = forecast_from(analysis_dataset())
    with pytest.raises(ValueError, match="valid_time is not init_time"):
        validate_forecast(fc.assign_coords(valid_time=fc.valid_time + np.timedelta64(1, "h")))


def test_stats_contract() -> None:
    ds = xr.Dataset({k: ("channel", [1.0, 2.0]) for k in ("mean", "std", "diff_std")},
                    coords={"channel": ["a_1", "b"]},
                    attrs={"period_start": "x", "period_end": "y", "dataset_version": "v", "grid": "g", "time_step_hours": 6})
    validate_stats(ds)
    with pytest.raises(ValueError, match="no statistics for channels"):
        validate_stats(ds, ["c"])
    with pytest.raises(ValueError, match="'std' must be positive"):
        validate_stats(ds.assign(std=("channel", [0.0, 1.0])))


def test_metrics_against_numpy_oracle() -> None:
    ds = analysis_dataset(periods=3)
    truth = ds.geopotential
    fc = truth + xr.DataArray(np.linspace(-1, 1, truth.sizes["latitude"]), dims="latitude")
    lat = np.deg2rad(truth.latitude.values)
    edges = np.concatenate([[np.pi / 2], (lat[:-1] + lat[1:]) / 2, [-np.pi / 2]])
    w = np.sin(edges[:-1]) - np.sin(edges[1:])
    w = w / w.sum()
    err = (fc - truth).values
    expected = np.sqrt((err**2 * w[:, None]).mean(-1).sum(-1))
    np.testing.assert_allclose(rmse(fc, truth).values, expected, rtol=1e-6)
    np.testing.assert_allclose(bias(fc, truth).values, (err * w[:, None]).mean(-1).sum(-1), atol=1e-6)
    assert float(weighted_mean(xr.ones_like(truth)).max()) == pytest.approx(1.0)
    clim = truth.mean("time")
    np.testing.assert_allclose(relative_error(clim, truth, clim).values, 1.0)
    np.testing.assert_allclose(acc(truth, truth, clim).values, 1.0, rtol=1e-6)
    np.testing.assert_allclose(acc(2 * clim - truth, truth, clim).values, -1.0, rtol=1e-6)
