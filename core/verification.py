"""Score forecasts against the analysis and the persistence and climatology baselines.

:func:`score_forecast` scores a whole in-memory forecast (the demo); :func:`score_lead` scores one
lead of the model and both baselines with every metric, for deferred verification.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from core.errors import DataContractError, MissingInputError
from core.fields import to_channels
from core.metrics import acc, bias, crps_ensemble, ensemble_spread, mae, rmse
from core.spectra import high_wavenumber_ratio, zonal_spectrum


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
        raise MissingInputError("no lead of this forecast has a completed analysis to verify against")
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


def score_lead(forecast: xr.DataArray, truth: xr.DataArray, climatology: xr.DataArray | None = None,
               persistence: xr.DataArray | None = None, member_dim: str = "member"
               ) -> tuple[dict[str, dict[str, xr.DataArray]], dict[str, xr.DataArray]]:
    """Scores of one lead for the model and the baselines, and the zonal spectra of each and of the truth.

    Inputs are ``(channel, [member], latitude, longitude)`` fields on the same grid. Returns
    ``{system: {metric: DataArray(channel)}}`` and ``{"truth"|system: DataArray(channel, wavenumber)}``.
    An ensemble (a ``member`` dim) is scored by its mean (RMSE, bias, ACC), its fair CRPS and its
    spread; single-valued forecasts get CRPS = MAE, which is what the CRPS is for one value.
    ACC is absent for climatology (its anomaly is zero) and for every system without a climatology.
    """
    for name, arr in (("forecast", forecast), ("climatology", climatology), ("persistence", persistence)):
        if arr is not None and (arr.sizes["latitude"], arr.sizes["longitude"]) != (
                truth.sizes["latitude"], truth.sizes["longitude"]):
            raise DataContractError(f"{name} grid {arr.sizes['latitude']}x{arr.sizes['longitude']} differs from the "
                                    f"truth's {truth.sizes['latitude']}x{truth.sizes['longitude']}")
    ensemble = member_dim in forecast.dims
    point = {"model": forecast.mean(member_dim) if ensemble else forecast}
    if persistence is not None:
        point["persistence"] = persistence
    if climatology is not None:
        point["climatology"] = climatology
    # One stacked array (system, channel, lat, lon): each metric is one call, not one per system.
    names = list(point)
    stack = xr.concat([point[n].drop_vars(member_dim, errors="ignore") for n in names], dim="system",
                      coords="minimal", compat="override").assign_coords(system=names)
    rmse_s, bias_s = rmse(stack, truth), bias(stack, truth)
    mae_s = mae(stack, truth)
    acc_s = acc(stack, truth, climatology) if climatology is not None else None
    spec_s = zonal_spectrum(xr.concat([truth.expand_dims(system=["truth"]), stack], dim="system",
                                      coords="minimal", compat="override"))
    spectra = {"truth": spec_s.sel(system="truth", drop=True)}
    if ensemble:
        spectra["model"] = zonal_spectrum(forecast).mean(member_dim)
    metrics: dict[str, dict[str, xr.DataArray]] = {}
    for system in names:
        m = {"rmse": rmse_s.sel(system=system, drop=True), "bias": bias_s.sel(system=system, drop=True)}
        if acc_s is not None and system != "climatology":
            m["acc"] = acc_s.sel(system=system, drop=True)
        if system == "model" and ensemble:
            m["crps"] = crps_ensemble(forecast, truth, member_dim)
            m["spread"] = ensemble_spread(forecast, member_dim)
        else:
            m["crps"] = mae_s.sel(system=system, drop=True)
        spectra.setdefault(system, spec_s.sel(system=system, drop=True))
        m["spectral_ratio"] = high_wavenumber_ratio(spectra[system], spectra["truth"])
        metrics[system] = m
    if ensemble:
        metrics["model"]["members"] = xr.full_like(metrics["model"]["rmse"], forecast.sizes[member_dim])
    return metrics, spectra
