"""Streaming forecasts: each lead is in the store before the next is computed, and the files equal a direct write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from core.fields import to_channels
from core.schema import validate_forecast
from models.data import open_analysis
from models.forecast import forecast_states, load_forecaster, rollout, stream_forecast, write_forecast
from tests.models.conftest import CHANNELS

INIT = "2000-01-17T06"


@pytest.fixture(scope="module")
def forecaster(trained):
    config, path = trained
    model, meta = load_forecaster(path)
    return model, meta, open_analysis(config.paths.analysis_store)


def test_each_lead_is_in_the_store_before_the_next_is_computed(forecaster, tmp_path: Path) -> None:
    model, meta, analysis = forecaster
    expected = np.stack(list(forecast_states(model, meta, analysis, INIT, 24)))  # (lead, channel, lat, lon)
    store = tmp_path / "run" / "forecast.zarr"
    seen: list[int] = []

    def check(k: int) -> None:
        # Read back from disk while the rollout is paused after lead k.
        with xr.open_zarr(store, consolidated=False) as fc:
            stack = to_channels(fc.isel(init_time=0), CHANNELS).transpose("lead_time", "channel", ...).values
        np.testing.assert_array_equal(stack[k], expected[k])
        assert np.isnan(stack[k + 1:]).all()  # later leads are not computed yet: still the template's fill
        seen.append(k)

    stream_forecast(model, meta, analysis, INIT, 24, tmp_path / "run", on_lead=check)
    assert seen == [0, 1, 2, 3, 4]


def test_streamed_files_equal_the_in_memory_forecast_written_directly(forecaster, tmp_path: Path) -> None:
    model, meta, analysis = forecaster
    streamed = stream_forecast(model, meta, analysis, INIT, 48, tmp_path / "streamed")
    direct = rollout(model, meta, analysis, INIT, 48)
    write_forecast(direct, tmp_path / "direct")
    for name in ("forecast.zarr", "forecast.nc"):
        opened = [xr.open_zarr(d / name, consolidated=False) if name.endswith("zarr") else
                  xr.open_dataset(d / name, engine="netcdf4", decode_timedelta=True) for d in (tmp_path / "streamed", tmp_path / "direct")]
        a, b = (ds.load() for ds in opened)
        validate_forecast(a)
        xr.testing.assert_equal(a, b)
        for v in a.variables:
            assert a[v].attrs == b[v].attrs, v
        assert {k: v for k, v in a.attrs.items() if k != "history"} == {
            k: v for k, v in b.attrs.items() if k != "history"}
        for ds in opened:
            ds.close()
    assert streamed["geopotential"].chunks is not None  # returned lazily: the caller never holds every lead
    with xr.open_zarr(tmp_path / "streamed" / "forecast.zarr", consolidated=False) as z:
        assert z["geopotential"].encoding["chunks"][:2] == (1, 1)  # one chunk per lead, as a direct write


def test_a_non_finite_lead_stops_the_stream_naming_the_lead(forecaster, tmp_path: Path) -> None:
    model, meta, analysis = forecaster
    saved = model.diff_std.clone()
    model.diff_std.fill_(float("nan"))  # every step's tendency becomes NaN
    try:
        written: list[int] = []
        with pytest.raises(FloatingPointError, match="non-finite at lead 6 h"):
            stream_forecast(model, meta, analysis, INIT, 24, tmp_path / "run", on_lead=written.append)
        assert written == [0]
    finally:
        with torch.no_grad():
            model.diff_std.copy_(saved)
