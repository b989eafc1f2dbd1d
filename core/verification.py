"""Score one forecast against the analysis and the persistence and climatology baselines."""

from __future__ import annotations

import numpy as np
import xarray as xr

from core.fields import to_channels
from core.metrics import acc, bias, rmse


def score_forecast(forecast: xr.Dataset, analysis: xr.Dataset, channels: list[str],
                   climatology: xr.DataArray | None = None) -> xr.Dataset:
    """Per lead and channel: RMSE, bias (and ACC when a climatology is given) of model and persistence.

    Only leads whose valid time is a completed analysis time are scored; ``climatology`` is a
    ``(channel, latitude, longitude)`` time mean of the training period.
    """
    fc = to_channels(forecast, channels).isel(init_time=0)
    valid = forecast["valid_time"].values[0]
    have = analysis["time"].values
    done = analysis["done"].values.astype(bool)
    keep = np.flatnonzero(np.isin(valid, have[done])).tolist()
    if not keep:
        raise ValueError("no lead of this forecast has a completed analysis to verify against")
    fc = fc.isel(lead_time=keep)
    truth = to_channels(analysis.sel(time=valid[keep]), channels).rename(time="lead_time")
    truth = truth.assign_coords(lead_time=fc["lead_time"].values)
    init = fc.isel(lead_time=0, drop=True)
    out = xr.Dataset({
        "rmse": rmse(fc, truth), "bias": bias(fc, truth),
        "rmse_persistence": rmse(xr.zeros_like(truth) + init, truth),
    })
    if climatology is not None:
        clim = climatology.sel(channel=channels)
        out["rmse_climatology"] = rmse(xr.zeros_like(truth) + clim, truth)
        out["acc"] = acc(fc, truth, clim)
        out["acc_persistence"] = acc(xr.zeros_like(truth) + init, truth, clim)
    out = out.assign_coords(lead_hours=("lead_time", (fc["lead_time"].values / np.timedelta64(1, "h")).astype(int)))
    return out
