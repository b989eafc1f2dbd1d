"""Latitude-weighted verification metrics on xarray objects (WeatherBench conventions).

Weights are the grid's area weights (see :mod:`core.grid`), so a global mean is an area mean.
RMSE, bias, MAE and the ensemble CRPS come from the ``scores`` library (its weighted means are
xarray's normalised ``weighted(...).mean``); the anomaly correlation and the spread, which
``scores`` does not have in this form, are written here.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import scores.continuous as sc
import scores.probability as sp
import xarray as xr

from core.grid import grid_for_shape

SPATIAL = ("latitude", "longitude")
# Ferro's fair estimator: an unbiased CRPS of the distribution the members are drawn from, so a
# small ensemble is not penalised for its size (WeatherBench 2 reports the same estimator).
CRPS_METHOD = "fair"

Xr = xr.DataArray | xr.Dataset


def area_weights(lat: xr.DataArray) -> xr.DataArray:
    """Area weights along ``latitude`` summing to one."""
    nlat = lat.size
    w = grid_for_shape(nlat, 4).weights if nlat >= 3 else np.full(nlat, 1.0 / nlat)
    return xr.DataArray(w, dims=("latitude",), coords={"latitude": lat.values})


def weighted_mean(x: Xr, dims: Sequence[Hashable] = SPATIAL) -> Xr:
    """Area-weighted mean over ``dims`` (which must include latitude)."""
    return x.weighted(area_weights(x["latitude"])).mean(dims)


def rmse(forecast: Xr, truth: Xr, dims: Sequence[Hashable] = SPATIAL) -> Xr:
    """Latitude-weighted root-mean-square error over ``dims``."""
    return sc.rmse(forecast, truth, reduce_dims=list(dims), weights=area_weights(truth["latitude"]))


def bias(forecast: Xr, truth: Xr, dims: Sequence[Hashable] = SPATIAL) -> Xr:
    """Latitude-weighted mean error (forecast − truth) over ``dims``."""
    return sc.mean_error(forecast, truth, reduce_dims=list(dims), weights=area_weights(truth["latitude"]))


def mae(forecast: Xr, truth: Xr, dims: Sequence[Hashable] = SPATIAL) -> Xr:
    """Latitude-weighted mean absolute error (the CRPS of a single-valued forecast) over ``dims``."""
    return sc.mae(forecast, truth, reduce_dims=list(dims), weights=area_weights(truth["latitude"]))


def crps_ensemble(forecast: Xr, truth: Xr, member_dim: str = "member", dims: Sequence[Hashable] = SPATIAL) -> Xr:
    """Latitude-weighted CRPS of an ensemble over ``dims`` (fair estimator, see :data:`CRPS_METHOD`)."""
    if member_dim not in forecast.dims:
        raise ValueError(f"CRPS needs an ensemble: the forecast has no {member_dim!r} dimension")
    if forecast.sizes[member_dim] < 2:
        raise ValueError(f"the fair CRPS needs at least 2 members, got {forecast.sizes[member_dim]}")
    return sp.crps_for_ensemble(forecast, truth, member_dim, method=CRPS_METHOD, reduce_dims=list(dims),
                                weights=area_weights(truth["latitude"]))


def ensemble_spread(forecast: Xr, member_dim: str = "member", dims: Sequence[Hashable] = SPATIAL) -> Xr:
    """Square root of the latitude-weighted mean of the members' unbiased variance (compare with the mean's RMSE)."""
    return np.sqrt(weighted_mean(forecast.var(member_dim, ddof=1), dims))


def acc(forecast: Xr, truth: Xr, climatology: Xr, dims: Sequence[Hashable] = SPATIAL) -> Xr:
    """Latitude-weighted (centred) anomaly correlation coefficient against ``climatology``."""
    fa = forecast - climatology
    ta = truth - climatology
    fa = fa - weighted_mean(fa, dims)
    ta = ta - weighted_mean(ta, dims)
    return weighted_mean(fa * ta, dims) / np.sqrt(weighted_mean(fa**2, dims) * weighted_mean(ta**2, dims))


def relative_error(forecast: Xr, truth: Xr, climatology: Xr, dims: Sequence[Hashable] = SPATIAL) -> Xr:
    """RMSE divided by the RMS of the truth's anomaly from ``climatology`` (climatology scores 1)."""
    return rmse(forecast, truth, dims) / rmse(climatology, truth, dims)
