"""Latitude-weighted verification metrics on xarray objects (WeatherBench conventions).

Weights are the grid's area weights (see :mod:`core.grid`), so a global mean is an area mean.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import xarray as xr

from core.grid import grid_for_shape

SPATIAL = ("latitude", "longitude")


def area_weights(lat: xr.DataArray) -> xr.DataArray:
    """Area weights along ``latitude`` summing to one."""
    nlat = lat.size
    w = grid_for_shape(nlat, 4).weights if nlat >= 3 else np.full(nlat, 1.0 / nlat)
    return xr.DataArray(w, dims=("latitude",), coords={"latitude": lat.values})


def weighted_mean(x: xr.DataArray | xr.Dataset, dims: Sequence[Hashable] = SPATIAL) -> xr.DataArray | xr.Dataset:
    """Area-weighted mean over ``dims`` (which must include latitude)."""
    return x.weighted(area_weights(x["latitude"])).mean(dims)


def rmse(forecast: xr.DataArray | xr.Dataset, truth: xr.DataArray | xr.Dataset,
         dims: Sequence[Hashable] = SPATIAL) -> xr.DataArray | xr.Dataset:
    """Latitude-weighted root-mean-square error over ``dims``."""
    return np.sqrt(weighted_mean((forecast - truth) ** 2, dims))


def bias(forecast: xr.DataArray | xr.Dataset, truth: xr.DataArray | xr.Dataset,
         dims: Sequence[Hashable] = SPATIAL) -> xr.DataArray | xr.Dataset:
    """Latitude-weighted mean error (forecast − truth) over ``dims``."""
    return weighted_mean(forecast - truth, dims)


def acc(forecast: xr.DataArray | xr.Dataset, truth: xr.DataArray | xr.Dataset,
        climatology: xr.DataArray | xr.Dataset, dims: Sequence[Hashable] = SPATIAL) -> xr.DataArray | xr.Dataset:
    """Latitude-weighted anomaly correlation coefficient against ``climatology``."""
    fa = forecast - climatology
    ta = truth - climatology
    fa = fa - weighted_mean(fa, dims)
    ta = ta - weighted_mean(ta, dims)
    return weighted_mean(fa * ta, dims) / np.sqrt(weighted_mean(fa**2, dims) * weighted_mean(ta**2, dims))


def relative_error(forecast: xr.DataArray | xr.Dataset, truth: xr.DataArray | xr.Dataset,
                   climatology: xr.DataArray | xr.Dataset, dims: Sequence[Hashable] = SPATIAL) -> xr.DataArray | xr.Dataset:
    """RMSE divided by the RMS of the truth's anomaly from ``climatology`` (climatology scores 1)."""
    return rmse(forecast, truth, dims) / rmse(climatology, truth, dims)
