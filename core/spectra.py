"""Zonal energy spectra: power per zonal wavenumber, averaged over latitude with area weights.

Along each latitude row ``x_j`` (``n`` longitudes) with ``X_k = Σ_j x_j e^{−2πijk/n} / n``, the
one-sided power is ``P_k = c_k |X_k|²`` with ``c_0 = 1``, ``c_{n/2} = 1`` for even ``n`` and
``c_k = 2`` otherwise, so ``Σ_k P_k`` is the row's mean square (Parseval). The spectrum is the
area-weighted mean of ``P_k`` over rows: its sum is the field's global mean square, in the
field's units squared. A forecast that blurs loses power at high wavenumbers first, which
:func:`high_wavenumber_ratio` condenses into one number per lead and channel.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from core.metrics import area_weights


def _row_power(values: np.ndarray) -> np.ndarray:
    n = values.shape[-1]
    coef = np.fft.rfft(values, axis=-1) / n
    power = np.abs(coef) ** 2
    power[..., 1:] *= 2.0
    if n % 2 == 0:
        power[..., -1] /= 2.0  # the Nyquist term has no mirror image
    return power


def zonal_spectrum(field: xr.DataArray) -> xr.DataArray:
    """Area-weighted mean over latitude of the one-sided zonal power spectrum; dim ``wavenumber`` replaces lat/lon."""
    for dim in ("latitude", "longitude"):
        if dim not in field.dims:
            raise ValueError(f"a zonal spectrum needs dimension {dim!r}; the field has {field.dims}")
    power = xr.apply_ufunc(_row_power, field.astype(np.float64), input_core_dims=[["longitude"]],
                           output_core_dims=[["wavenumber"]])
    power = power.assign_coords(wavenumber=np.arange(power.sizes["wavenumber"]))
    return power.weighted(area_weights(field["latitude"])).mean("latitude")


def high_wavenumber_ratio(forecast_spectrum: xr.DataArray, truth_spectrum: xr.DataArray) -> xr.DataArray:
    """Forecast power over truth power summed over the upper half of wavenumbers (1 = as sharp as the truth)."""
    kmax = forecast_spectrum.sizes["wavenumber"] - 1
    high = forecast_spectrum["wavenumber"] >= max(1, (kmax + 1) // 2)
    return forecast_spectrum.where(high).sum("wavenumber") / truth_spectrum.where(high).sum("wavenumber")
