"""Ensembles: seeded spherical-harmonic perturbations and residuals, the control member, the stores they write."""

from __future__ import annotations

from pathlib import Path

import eccodes
import numpy as np
import pytest
import torch
import xarray as xr
from torch_harmonics import RealSHT

from core.config_ops import EnsembleConfig
from core.fields import to_channels
from core.grid import get_grid
from core.schema import validate_ensemble_summary, validate_forecast
from models.data import open_analysis
from models.ensemble import (
    CONTROL,
    ensemble_states,
    ic_perturbation,
    residual_bank,
    stream_ensemble,
)
from models.forecast import forecast_states, load_forecaster, stream_forecast
from models.noise import ResidualNoise
from tests.models.conftest import CHANNELS

INIT = "2000-01-17T06"


@pytest.fixture(scope="module")
def forecaster(trained):
    config, path = trained
    model, meta = load_forecaster(path)
    analysis = open_analysis(config.paths.analysis_store)
    return model, meta, analysis, residual_bank(model, meta, analysis, count=16)


def _states(forecaster, lead_hours: int = 24, **settings) -> np.ndarray:
    model, meta, analysis, bank = forecaster
    ens = EnsembleConfig(**{"members": 3, "ic_scale": 0.5, "residual_scale": 0.5, **settings})
    return np.stack(list(ensemble_states(model, meta, analysis, INIT, lead_hours, ens, bank)))  # (lead, member, …)


def test_members_differ_and_are_reproducible_by_seed(forecaster) -> None:
    a, b = _states(forecaster), _states(forecaster)
    np.testing.assert_array_equal(a, b)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert np.abs(a[:, i] - a[:, j]).max() > 1e-3, (i, j)
    other = _states(forecaster, seed=1)
    np.testing.assert_array_equal(other[:, CONTROL], a[:, CONTROL])  # the control has nothing random in it
    assert np.abs(other[-1, 1:] - a[-1, 1:]).max() > 1e-3
    # A member depends on (seed, init, member) only, not on how many run beside it.
    np.testing.assert_allclose(_states(forecaster, members=2)[:, 1], a[:, 1], rtol=1e-5, atol=1e-3)


def test_residuals_alone_and_perturbations_alone_each_spread_the_members(forecaster) -> None:
    ic_only = _states(forecaster, residual_scale=0.0)
    res_only = _states(forecaster, ic_scale=0.0)
    assert np.abs(ic_only[0, 1] - ic_only[0, 0]).max() > 0  # lead 0 is the perturbed analysis
    np.testing.assert_array_equal(res_only[0, 1], res_only[0, 0])  # residuals start after lead 0
    assert np.abs(res_only[-1, 1] - res_only[-1, 0]).max() > 1e-3


def test_the_control_member_is_the_deterministic_forecast(forecaster) -> None:
    model, meta, analysis, _ = forecaster
    det = np.stack(list(forecast_states(model, meta, analysis, INIT, 24)))
    np.testing.assert_allclose(_states(forecaster)[:, CONTROL], det, rtol=1e-5, atol=1e-2)
    np.testing.assert_array_equal(_states(forecaster)[0, CONTROL], det[0])


@pytest.mark.parametrize("ic_lmax", [4, 10])
def test_perturbations_have_the_asked_rms_and_no_power_above_ic_lmax(ic_lmax: int) -> None:
    grid = get_grid("5.625deg")
    nlat, nlon = grid.shape
    diff_std = [300.0, 2.0, 0.5]
    ens = EnsembleConfig(members=4, ic_scale=0.3, ic_lmax=ic_lmax)
    meta = {"stats": {"diff_std": diff_std}}
    w = grid.weights / grid.weights.sum()
    for member in (1, 2, 3):
        p = ic_perturbation(meta, nlat, nlon, ens, INIT, member).double()
        rms = np.sqrt(((p.numpy() ** 2).mean(axis=-1) * w).sum(axis=-1))  # independent area mean
        np.testing.assert_allclose(rms, 0.3 * np.asarray(diff_std), rtol=1e-5)
        global_mean = (p.numpy().mean(axis=-1) * w).sum(axis=-1)  # no degree 0: no global offset
        assert np.all(np.abs(global_mean) < 0.02 * rms), global_mean / rms
        power = RealSHT(nlat, nlon, grid="equiangular", norm="ortho")(p.float()).abs().pow(2).sum(dim=-1)  # (C, l)
        above = power[:, ic_lmax + 1:].sum(dim=-1) / power.sum(dim=-1)
        assert float(above.max()) < 1e-6, above
        assert float(power[:, ic_lmax].min()) > 0  # reaches ic_lmax, not just below it
    assert torch.equal(ic_perturbation(meta, nlat, nlon, ens, INIT, CONTROL), torch.zeros(3, nlat, nlon))
    a, b = (ic_perturbation(meta, nlat, nlon, ens, t, 1) for t in (INIT, "2000-01-17T12"))
    assert not torch.allclose(a, b)  # another init time draws another perturbation


def test_a_perturbation_keeps_the_form_of_the_checkpoints_pole_rows() -> None:
    nlat, nlon = get_grid("5.625deg").shape
    ens = EnsembleConfig(members=2, ic_scale=0.3, ic_lmax=8)
    plain = ic_perturbation({"stats": {"diff_std": [300.0, 2.0, 0.5]}}, nlat, nlon, ens, INIT, 1)
    meta = {"stats": {"diff_std": [300.0, 2.0, 0.5]}, "pole_modes": [[0, 1, -1], [0, 1, -1]]}
    kept = ic_perturbation(meta, nlat, nlon, ens, INIT, 1)
    assert torch.equal(kept[:, 1:-1], plain[:, 1:-1]) and torch.equal(kept[2], plain[2])  # free: untouched
    torch.testing.assert_close(kept[0], plain[0], rtol=1e-5, atol=1e-4)  # already constant on its pole rows
    for row in (0, -1):  # scalar harmonics give every channel a constant pole row: a wind's (wavenumber 1) is 0
        assert float(plain[1, row].abs().min()) > 0 and float(kept[1, row].abs().max()) < 1e-6 * float(plain[1, row].abs().max())


def test_stream_writes_members_mean_and_spread_equal_to_numpy(forecaster, tmp_path: Path) -> None:
    model, meta, analysis, bank = forecaster
    ens = EnsembleConfig(members=4, ic_scale=0.5, residual_scale=0.5, seed=3)
    returned = stream_ensemble(model, meta, analysis, INIT, 24, tmp_path / "run", ens, formats=("netcdf", "grib2"),
                               residual_bank=bank)
    members = validate_forecast(xr.open_zarr(tmp_path / "run" / "forecast.zarr", consolidated=False).load())
    summary = validate_ensemble_summary(xr.open_zarr(tmp_path / "run" / "ensemble.zarr", consolidated=False).load())
    assert members["member"].values.tolist() == [0, 1, 2, 3]
    assert np.issubdtype(members["member"].dtype, np.integer)
    assert members["geopotential"].dims == ("init_time", "lead_time", "member", "level", "latitude", "longitude")
    assert members.attrs["ensemble_members"] == 4 and members.attrs["ensemble_seed"] == 3
    xr.testing.assert_equal(returned.load(), members)
    expected = _states(forecaster, members=4, seed=3)  # (lead, member, channel, lat, lon)
    got = to_channels(members.isel(init_time=0), CHANNELS).transpose("lead_time", "member", "channel", ...).values
    np.testing.assert_array_equal(got, expected)
    for name in ("geopotential", "u_component_of_wind", "v_component_of_wind"):
        x = members[name].values.astype(np.float64)
        np.testing.assert_allclose(summary[name].values, x.mean(axis=2), rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(summary[f"{name}_spread"].values, x.std(axis=2), rtol=1e-5, atol=1e-4)
        assert summary[f"{name}_spread"].attrs["units"] == members[name].attrs["units"]
    assert (summary["geopotential_spread"].isel(lead_time=-1) > 0).all()
    nc = xr.open_dataset(tmp_path / "run" / "forecast.nc", engine="netcdf4").load()
    np.testing.assert_array_equal(nc["geopotential"].transpose(*members["geopotential"].dims).values,
                                  members["geopotential"].values)
    numbers = []
    with open(tmp_path / "run" / "forecast.grib2", "rb") as f:
        while (h := eccodes.codes_grib_new_from_file(f)) is not None:
            numbers.append(eccodes.codes_get(h, "perturbationNumber"))
            eccodes.codes_release(h)
    assert sorted(set(numbers)) == [0, 1, 2, 3] and len(numbers) == 5 * 4 * 3  # leads × members × channels


def test_one_member_writes_the_deterministic_files(forecaster, tmp_path: Path) -> None:
    model, meta, analysis, bank = forecaster
    stream_ensemble(model, meta, analysis, INIT, 12, tmp_path / "ens", EnsembleConfig(members=1, ic_scale=1.0),
                    formats=("netcdf",), residual_bank=bank)
    stream_forecast(model, meta, analysis, INIT, 12, tmp_path / "det", formats=("netcdf",))
    names = sorted(p.name for p in (tmp_path / "ens").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "det").iterdir()) and "ensemble.zarr" not in names
    for name in ("forecast.zarr", "forecast.nc"):
        a, b = (xr.open_zarr(d / name, consolidated=False).load() if name.endswith("zarr")
                else xr.open_dataset(d / name, engine="netcdf4").load() for d in (tmp_path / "ens", tmp_path / "det"))
        xr.testing.assert_equal(a, b)
        for v in a.variables:
            assert a[v].attrs == b[v].attrs, v
        assert {k: v for k, v in a.attrs.items() if k != "history"} == {
            k: v for k, v in b.attrs.items() if k != "history"}
        assert "member" not in a.dims


def test_bad_ensemble_inputs_fail_clearly(forecaster, tmp_path: Path) -> None:
    model, meta, analysis, bank = forecaster
    with pytest.raises(ValueError, match="members must be ≥ 1"):
        EnsembleConfig(members=0)
    with pytest.raises(ValueError, match="no residual bank"):
        next(ensemble_states(model, meta, analysis, INIT, 12, EnsembleConfig(members=2, residual_scale=1.0)))
    wrong = ResidualNoise(torch.zeros(2, 3, 5, 8) + torch.arange(2.0)[:, None, None, None])
    with pytest.raises(ValueError, match="residual bank is"):
        next(ensemble_states(model, meta, analysis, INIT, 12, EnsembleConfig(members=2, residual_scale=1.0), wrong))
    with pytest.raises(ValueError, match="multiple of the model step"):
        stream_ensemble(model, meta, analysis, INIT, 7, tmp_path / "x", EnsembleConfig(members=2), formats=())
    assert not (tmp_path / "x").exists()


def test_schema_checks_the_member_dimension_and_the_summary(forecaster, tmp_path: Path) -> None:
    model, meta, analysis, bank = forecaster
    stream_ensemble(model, meta, analysis, INIT, 6, tmp_path / "run", EnsembleConfig(members=2), formats=(),
                    residual_bank=bank)
    members = xr.open_zarr(tmp_path / "run" / "forecast.zarr", consolidated=False).load()
    summary = xr.open_zarr(tmp_path / "run" / "ensemble.zarr", consolidated=False).load()
    with pytest.raises(ValueError, match="member has dtype"):
        validate_forecast(members.assign_coords(member=members["member"].values.astype(float)))
    with pytest.raises(ValueError, match="member must run 0"):
        validate_forecast(members.assign_coords(member=[1, 2]))
    with pytest.raises(ValueError, match="has dims"):
        validate_forecast(members.transpose("member", ...))
    with pytest.raises(ValueError, match="no spread for"):
        validate_ensemble_summary(summary.drop_vars("geopotential_spread"))
    with pytest.raises(ValueError, match="has no ensemble mean"):
        validate_ensemble_summary(summary.drop_vars("geopotential"))
    with pytest.raises(ValueError, match="belong in forecast.zarr"):
        validate_ensemble_summary(summary.expand_dims(member=[0], axis=2))


def test_residual_bank_is_measured_once_and_reused_from_its_cache(forecaster, tmp_path: Path) -> None:
    model, meta, analysis, _ = forecaster
    first = residual_bank(model, meta, analysis, count=8, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("residuals-")
    torch.save(first.bank * 2, files[0])  # a reused bank is read back, not measured again
    again = residual_bank(model, meta, analysis, count=8, cache_dir=tmp_path)
    torch.testing.assert_close(again.bank, first.bank * 2)
    assert torch.equal(residual_bank(model, meta, analysis, count=8).bank, first.bank)  # measuring is deterministic
