"""Every verification number against an independent numpy computation on a tiny case.

The oracles below use only numpy and the grid's area-weight formula written out again, never
``core.metrics``: RMSE, bias, MAE, ACC, the fair and the plain (ECDF) ensemble CRPS, the spread,
and zonal spectra through ``numpy.fft.rfft`` (plus Parseval as a second, independent check).
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from core.metrics import CRPS_METHOD, acc, bias, crps_ensemble, ensemble_spread, mae, rmse
from core.spectra import high_wavenumber_ratio, zonal_spectrum
from core.verification import score_lead

NLAT, NLON = 5, 8
LAT = np.linspace(90, -90, NLAT)
LON = np.arange(NLON) * 360.0 / NLON
CH = ["geopotential_500", "u_component_of_wind_500"]


def numpy_weights(lat_deg: np.ndarray) -> np.ndarray:
    edges = np.concatenate([[90.0], (lat_deg[:-1] + lat_deg[1:]) / 2, [-90.0]])
    w = np.sin(np.deg2rad(edges[:-1])) - np.sin(np.deg2rad(edges[1:]))
    return w / w.sum()


W = numpy_weights(LAT)


def wmean(x: np.ndarray) -> np.ndarray:
    """Area mean over the last two axes (lat, lon)."""
    return (x.mean(-1) * W).sum(-1)


def field(values: np.ndarray, member: bool = False) -> xr.DataArray:
    dims = (("member",) if member else ()) + ("channel", "latitude", "longitude")
    return xr.DataArray(values, dims=dims, coords={"channel": CH, "latitude": LAT, "longitude": LON})


@pytest.fixture()
def case() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(42)
    truth = rng.normal(size=(2, NLAT, NLON)) * [[[3.0]], [[1.0]]]
    return {"truth": truth, "fc": truth + rng.normal(0.5, 1.0, size=truth.shape),
            "clim": rng.normal(size=truth.shape), "ens": truth + rng.normal(0.2, 1.5, size=(4,) + truth.shape)}


def test_deterministic_metrics_equal_numpy(case: dict[str, np.ndarray]) -> None:
    t, f, c = case["truth"], case["fc"], case["clim"]
    np.testing.assert_allclose(rmse(field(f), field(t)).values, np.sqrt(wmean((f - t) ** 2)), rtol=1e-12)
    np.testing.assert_allclose(bias(field(f), field(t)).values, wmean(f - t), rtol=1e-12)
    np.testing.assert_allclose(mae(field(f), field(t)).values, wmean(np.abs(f - t)), rtol=1e-12)
    fa, ta = f - c, t - c
    fa = fa - wmean(fa)[:, None, None]
    ta = ta - wmean(ta)[:, None, None]
    expected_acc = wmean(fa * ta) / np.sqrt(wmean(fa**2) * wmean(ta**2))
    np.testing.assert_allclose(acc(field(f), field(t), field(c)).values, expected_acc, rtol=1e-12)


def test_crps_is_the_fair_estimator_and_differs_from_the_ecdf_one(case: dict[str, np.ndarray]) -> None:
    e, t = case["ens"], case["truth"]
    m = e.shape[0]
    skill = np.abs(e - t).mean(0)
    pair = np.abs(e[:, None] - e[None, :]).sum((0, 1))
    fair = skill - pair / (2 * m * (m - 1))
    ecdf = skill - pair / (2 * m * m)
    assert CRPS_METHOD == "fair"
    got = crps_ensemble(field(e, member=True), field(t)).values
    np.testing.assert_allclose(got, wmean(fair), rtol=1e-12)
    assert not np.allclose(got, wmean(ecdf))
    spread = np.sqrt(wmean(e.var(0, ddof=1)))
    np.testing.assert_allclose(ensemble_spread(field(e, member=True)).values, spread, rtol=1e-12)
    with pytest.raises(ValueError, match="no 'member' dimension"):
        crps_ensemble(field(t), field(t))
    with pytest.raises(ValueError, match="at least 2 members"):
        crps_ensemble(field(e[:1], member=True), field(t))


def test_zonal_spectrum_equals_rfft_and_keeps_parseval(case: dict[str, np.ndarray]) -> None:
    t = case["truth"]
    for nlon in (NLON, 7):  # even (a Nyquist term) and odd
        x = t[..., :nlon]
        da = xr.DataArray(x, dims=("channel", "latitude", "longitude"),
                          coords={"channel": CH, "latitude": LAT, "longitude": np.arange(nlon) * 360.0 / nlon})
        coef = np.fft.rfft(x, axis=-1) / nlon
        power = np.abs(coef) ** 2
        factor = np.full(power.shape[-1], 2.0)
        factor[0] = 1.0
        if nlon % 2 == 0:
            factor[-1] = 1.0
        expected = ((power * factor) * W[:, None]).sum(-2)
        got = zonal_spectrum(da)
        assert got.dims == ("channel", "wavenumber") and got.sizes["wavenumber"] == nlon // 2 + 1
        np.testing.assert_allclose(got.values, expected, rtol=1e-12)
        np.testing.assert_allclose(got.sum("wavenumber").values, ((x**2).mean(-1) * W).sum(-1), rtol=1e-12)
    spec = zonal_spectrum(field(t))
    np.testing.assert_allclose(high_wavenumber_ratio(spec, spec).values, 1.0)
    np.testing.assert_allclose(high_wavenumber_ratio(spec * 0.5, spec).values, 0.5)
    with pytest.raises(ValueError, match="needs dimension 'longitude'"):
        zonal_spectrum(field(t).isel(longitude=0))


def test_score_lead_scores_model_and_both_baselines(case: dict[str, np.ndarray]) -> None:
    t, f, c, e = case["truth"], case["fc"], case["clim"], case["ens"]
    persistence = t + 2.0
    metrics, spectra = score_lead(field(f), field(t), field(c), field(persistence))
    assert set(metrics) == {"model", "persistence", "climatology"}
    assert "acc" not in metrics["climatology"] and "acc" in metrics["persistence"]
    np.testing.assert_allclose(metrics["persistence"]["rmse"].values, 2.0, rtol=1e-12)
    np.testing.assert_allclose(metrics["persistence"]["bias"].values, 2.0, rtol=1e-12)
    np.testing.assert_allclose(metrics["climatology"]["rmse"].values, np.sqrt(wmean((c - t) ** 2)), rtol=1e-12)
    np.testing.assert_allclose(metrics["model"]["crps"].values, wmean(np.abs(f - t)), rtol=1e-12)
    assert set(spectra) == {"truth", "model", "persistence", "climatology"}
    # An ensemble is scored by its mean, its fair CRPS and its spread; its spectrum is the members' mean spectrum.
    metrics, spectra = score_lead(field(e, member=True), field(t), field(c), field(persistence))
    np.testing.assert_allclose(metrics["model"]["rmse"].values, np.sqrt(wmean((e.mean(0) - t) ** 2)), rtol=1e-12)
    assert "spread" in metrics["model"] and float(metrics["model"]["members"][0]) == 4
    member_spectra = np.stack([zonal_spectrum(field(x)).values for x in e]).mean(0)
    np.testing.assert_allclose(spectra["model"].values, member_spectra, rtol=1e-12)
    with pytest.raises(ValueError, match="forecast grid 5x4 differs"):
        score_lead(field(f).isel(longitude=slice(0, 4)), field(t))
