import numpy as np
import pandas as pd
import pytest
import xarray as xr

from core.fields import to_channels
from core.metrics import rmse
from core.testing import analysis_dataset
from core.verification import score_forecast

CH = ["geopotential_500", "u_component_of_wind_500", "v_component_of_wind_500"]


def persistence_forecast(analysis: xr.Dataset, init: int, steps: int) -> xr.Dataset:
    init_state = analysis.isel(time=[init] * (steps + 1)).drop_vars(["done", "expver"])
    leads = pd.to_timedelta(np.arange(steps + 1) * 6, unit="h").values
    fc = init_state.rename(time="lead_time").assign_coords(lead_time=leads).expand_dims(init_time=[analysis.time.values[init]])
    return fc.assign_coords(valid_time=(("init_time", "lead_time"), fc.init_time.values[:, None] + leads[None, :]))


def test_persistence_scores_as_persistence_and_unverifiable_leads_are_dropped() -> None:
    analysis = analysis_dataset(periods=8)
    analysis["done"][6:] = 0  # the last two analyses have not arrived yet
    fc = persistence_forecast(analysis, init=3, steps=4)  # valid times 3..7
    clim = to_channels(analysis, CH).mean("time")
    s = score_forecast(fc, analysis, CH, clim)
    assert s["lead_hours"].values.tolist() == [0, 6, 12]
    xr.testing.assert_allclose(s["rmse"], s["rmse_persistence"])
    assert float(s["rmse"].isel(lead_time=0).max()) == 0.0
    truth = to_channels(analysis.isel(time=5), CH)
    expected = rmse(to_channels(analysis.isel(time=3), CH), truth)
    np.testing.assert_allclose(s["rmse"].isel(lead_time=2).values, expected.values, rtol=1e-6)
    with pytest.raises(ValueError, match="no lead of this forecast"):
        score_forecast(persistence_forecast(analysis, init=6, steps=1), analysis, CH)
