"""Forecast download files: GRIB2 read back by cfgrib, CF-1.8 NetCDF judged by compliance-checker."""

from __future__ import annotations

import json
from pathlib import Path

import cfgrib
import eccodes
import netCDF4
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from compliance_checker.runner import CheckSuite, ComplianceChecker

from core.forecast_files import GRIB_BITS_PER_VALUE, write_formats, write_grib2, write_netcdf
from core.schema import validate_forecast
from core.variables import VARIABLES
from models.forecast import COORD_ATTRS, write_forecast

INIT = pd.Timestamp("2000-01-17T06")
LEVELS = (500, 850)
PRESSURE = ("geopotential", "temperature", "u_component_of_wind")
SINGLE = ("2m_temperature", "mean_sea_level_pressure", "10m_v_component_of_wind", "total_precipitation")


def make_forecast(nlat: int = 17, nlon: int = 32, leads: int = 4, step_h: int = 6, members: int = 0,
                  seed: int = 0) -> xr.Dataset:
    """A contract forecast with pressure and single-level variables, fields varying by lead, level and member."""
    rng = np.random.default_rng(seed)
    lat = np.linspace(90, -90, nlat)
    lon = np.arange(nlon) * 360.0 / nlon
    lead = (np.arange(leads) * step_h).astype("timedelta64[h]").astype("timedelta64[ns]")
    init = np.asarray([INIT.to_datetime64()], dtype="datetime64[ns]")
    extra = {"member": members} if members else {}
    data_vars = {}
    for name in PRESSURE + SINGLE:
        var = VARIABLES[name]
        lo, hi = var.valid_range
        lv = {"level": len(LEVELS)} if var.level_type == "pressure" else {}
        shape = {"init_time": 1, "lead_time": leads, **extra, **lv, "latitude": nlat, "longitude": nlon}
        centre = 0.1 * lo + 0.9 * hi if name == "mean_sea_level_pressure" else (lo + hi) / 2
        scale = (hi - lo) / 40 if name != "total_precipitation" else 0.002
        field = centre + scale * rng.standard_normal(tuple(shape.values()))
        if name == "total_precipitation":
            field = np.abs(field - centre)
        data_vars[name] = (tuple(shape), field.astype(np.float32), {"units": var.units, "long_name": var.long_name})
    coords = {"init_time": init, "lead_time": lead, "level": np.asarray(LEVELS, dtype=np.int32),
              "latitude": lat, "longitude": lon}
    if members:
        coords["member"] = np.arange(members, dtype=np.int32)
    attrs = {"Conventions": "CF-1.8", "title": "test forecast", "source": "tests", "time_step_hours": step_h,
             "history": "2000-01-17T12:00:00 tests.models.test_forecast_files"}  # as models.forecast sets them
    ds = xr.Dataset(data_vars, coords=coords, attrs=attrs)
    ds = ds.assign_coords(valid_time=(("init_time", "lead_time"), init[:, None] + lead[None, :]))
    for name, attrs in COORD_ATTRS.items():
        ds[name].attrs = dict(attrs)
    if members:
        # As models.ensemble labels it; "E" is no CF-1.8 axis, so the NetCDF writer must leave it out.
        ds["member"].attrs = {"standard_name": "realization", "long_name": "ensemble member", "units": "1",
                              "axis": "E"}
    return validate_forecast(ds)


def packing_bound(truth: np.ndarray) -> np.ndarray:
    """GRIB simple/CCSDS packing: each value within range/(2**bits − 1) of its field, plus float32 rounding."""
    axes = (-2, -1)
    spread = truth.max(axis=axes, keepdims=True) - truth.min(axis=axes, keepdims=True)
    return spread / (2**GRIB_BITS_PER_VALUE - 1) + np.abs(truth) * 2.0**-23


def read_grib(path: Path) -> dict[str, xr.DataArray]:
    """Every variable cfgrib finds in ``path``, by GRIB shortName (cfgrib splits by level type)."""
    out = {}
    for ds in cfgrib.open_datasets(str(path), backend_kwargs={"indexpath": ""}):
        for da in ds.data_vars.values():
            out[da.attrs["GRIB_shortName"]] = da.load()
    return out


GRIB_NAMES = {"geopotential": "z", "temperature": "t", "u_component_of_wind": "u", "2m_temperature": "2t",
              "mean_sea_level_pressure": "msl", "10m_v_component_of_wind": "10v", "total_precipitation": "tp"}


def assert_grib_matches(path: Path, ds: xr.Dataset) -> None:
    """cfgrib reads ``path`` back as ``ds``: paramId, levels, time, step, grid and values within packing."""
    got = read_grib(path)
    assert sorted(got) == sorted(GRIB_NAMES.values())
    for name, short in GRIB_NAMES.items():
        da, var = got[short], VARIABLES[name]
        assert da.attrs["GRIB_paramId"] == var.param_id, name
        assert pd.Timestamp(da["time"].values) == INIT
        np.testing.assert_array_equal(da["step"].values, ds["lead_time"].values)
        np.testing.assert_allclose(da["latitude"].values, ds["latitude"].values, atol=1e-6)
        np.testing.assert_allclose(da["longitude"].values, ds["longitude"].values, atol=1e-6)
        np.testing.assert_array_equal(da["valid_time"].values, ds["valid_time"].values[0])
        truth = ds[name].isel(init_time=0)
        dims = ["step"]
        if "member" in ds.dims:
            np.testing.assert_array_equal(da["number"].values, ds["member"].values)
            dims.append("number")
        else:
            assert "number" not in da.dims
        if var.level_type == "pressure":
            assert sorted(da["isobaricInhPa"].values.tolist()) == sorted(LEVELS)
            da = da.sel(isobaricInhPa=list(LEVELS))  # cfgrib orders pressure from the ground up
            dims.append("isobaricInhPa")
        want = truth.transpose("lead_time", *(["member"] if "member" in ds.dims else []), ...).values
        have = da.transpose(*dims, "latitude", "longitude").values.astype(np.float64)
        err = np.abs(have - want)
        assert np.all(err <= packing_bound(want)), f"{name}: max error {err.max():g}"


def test_grib2_reads_back_with_cfgrib_to_the_forecast(tmp_path: Path) -> None:
    ds = make_forecast()
    path = write_grib2(ds, tmp_path / "forecast.grib2")
    assert_grib_matches(path, ds)
    with open(path, "rb") as f:
        keys = []
        while (h := eccodes.codes_grib_new_from_file(f)) is not None:
            keys.append({k: eccodes.codes_get(h, k) for k in (
                "edition", "shortName", "typeOfLevel", "dataDate", "dataTime", "stepRange", "gridType",
                "productDefinitionTemplateNumber", "packingType", "bitsPerValue")})
            eccodes.codes_release(h)
    assert len(keys) == 4 * (len(PRESSURE) * len(LEVELS) + len(SINGLE))  # one message per lead, variable, level
    assert {k["edition"] for k in keys} == {2} and {k["gridType"] for k in keys} == {"regular_ll"}
    assert {(k["dataDate"], k["dataTime"]) for k in keys} == {(20000117, 600)}
    assert {k["packingType"] for k in keys} == {"grid_ccsds"}
    levels = {k["shortName"]: k["typeOfLevel"] for k in keys}
    assert levels == {"z": "isobaricInhPa", "t": "isobaricInhPa", "u": "isobaricInhPa", "2t": "heightAboveGround",
                      "msl": "meanSea", "10v": "heightAboveGround", "tp": "surface"}
    # tp is ERA5's hourly accumulation: the hour ending at the valid time (statistical template 8).
    assert sorted({k["stepRange"] for k in keys if k["shortName"] == "tp"}) == ["0", "11-12", "17-18", "5-6"]
    assert {k["productDefinitionTemplateNumber"] for k in keys if k["shortName"] == "tp"} == {8}
    assert {k["productDefinitionTemplateNumber"] for k in keys if k["shortName"] != "tp"} == {0}


def test_grib2_with_members_is_an_ensemble_read_back_by_number(tmp_path: Path) -> None:
    ds = make_forecast(members=3, leads=3).transpose("init_time", "lead_time", "member", ...)
    path = write_grib2(ds, tmp_path / "forecast.grib2")
    assert_grib_matches(path, ds)
    with open(path, "rb") as f:
        seen = set()
        while (h := eccodes.codes_grib_new_from_file(f)) is not None:
            seen.add((eccodes.codes_get(h, "productDefinitionTemplateNumber"),
                      eccodes.codes_get(h, "perturbationNumber"), eccodes.codes_get(h, "numberOfForecastsInEnsemble")))
            eccodes.codes_release(h)
    assert seen == {(t, m, 3) for t in (1, 11) for m in range(3)}  # 11: the members' accumulations (tp)


def test_grib2_from_a_lazy_zarr_store_equals_the_in_memory_write(tmp_path: Path) -> None:
    ds = make_forecast(nlat=33, nlon=64, leads=5)
    write_forecast(ds, tmp_path / "direct", formats=["grib2"])
    with xr.open_zarr(tmp_path / "direct" / "forecast.zarr", consolidated=False) as lazy:
        assert lazy["geopotential"].chunks is not None
        write_grib2(lazy, tmp_path / "lazy.grib2")
    assert (tmp_path / "lazy.grib2").read_bytes() == (tmp_path / "direct" / "forecast.grib2").read_bytes()


def cf_report(path: Path, tmp_path: Path) -> dict:
    CheckSuite.load_all_available_checkers()
    out = tmp_path / "cf.json"
    ComplianceChecker.run_checker(str(path), ["cf:1.8"], 0, "normal", output_filename=str(out), output_format="json")
    return json.loads(out.read_text())["cf:1.8"]


def failures(report: dict, priority: str) -> list[str]:
    return [m for r in report[priority] if r["value"][0] < r["value"][1] for m in r["msgs"]]


@pytest.mark.parametrize("members", [0, 2])
def test_netcdf_has_no_cf_1_8_errors(tmp_path: Path, members: int) -> None:
    path = write_netcdf(make_forecast(members=members), tmp_path / "forecast.nc")
    report = cf_report(path, tmp_path)
    assert report["possible_points"] > 100  # the checker really ran its CF-1.8 checks
    assert failures(report, "high_priorities") == []
    # What CF-1.8 still warns about is the contract's naming and dim order, nothing else.
    for msg in failures(report, "medium_priorities"):
        assert "should begin with a letter" in msg or "not in the recommended order" in msg, msg
    with netCDF4.Dataset(path) as nc:
        for name in ("init_time", "lead_time", "valid_time", "latitude", "longitude", "level"):
            assert "_FillValue" not in nc.variables[name].ncattrs(), name
        assert "dtype" not in nc.variables["lead_time"].ncattrs()
        if members:
            assert nc.variables["member"].standard_name == "realization"
            assert "axis" not in nc.variables["member"].ncattrs()
        assert {nc.variables[n].dtype for n in ("init_time", "valid_time", "lead_time")} == {np.dtype("int32")}
        for name in PRESSURE + SINGLE:
            assert nc.variables[name].standard_name == VARIABLES[name].standard_name


def test_netcdf_read_back_by_netcdf4_equals_the_zarr_store(tmp_path: Path) -> None:
    paths = write_forecast(make_forecast(), tmp_path / "run", formats=["netcdf"])
    assert [p.name for p in paths] == ["forecast.zarr", "forecast.nc"]
    z = xr.open_zarr(paths[0], consolidated=False).load()
    with netCDF4.Dataset(paths[1]) as nc:
        init = netCDF4.num2date(nc.variables["init_time"][:], nc.variables["init_time"].units,
                                only_use_cftime_datetimes=False, only_use_python_datetimes=True)
        assert [pd.Timestamp(t) for t in init] == [INIT]
        valid = netCDF4.num2date(nc.variables["valid_time"][:].ravel(), nc.variables["valid_time"].units,
                                 only_use_cftime_datetimes=False, only_use_python_datetimes=True)
        assert [pd.Timestamp(t) for t in valid] == list(pd.DatetimeIndex(z["valid_time"].values[0]))
        assert nc.variables["lead_time"].units == "hours"
        assert nc.variables["lead_time"][:].tolist() == [0, 6, 12, 18]
        for name in PRESSURE + SINGLE:
            np.testing.assert_array_equal(np.asarray(nc.variables[name][:]), z[name].values)
            assert nc.variables[name].dimensions == z[name].dims
    with xr.open_dataset(paths[1], engine="netcdf4", decode_timedelta=True) as back:
        xr.testing.assert_equal(validate_forecast(back.load()), z)


def test_unknown_format_and_a_grid_grib_cannot_hold_are_refused(tmp_path: Path) -> None:
    ds = make_forecast(leads=2)
    with pytest.raises(ValueError, match=r"unknown forecast file format\(s\) \['geotiff'\]"):
        write_formats(ds, tmp_path, ["netcdf", "geotiff"])
    assert list(tmp_path.iterdir()) == []  # refused before anything is written
    with pytest.raises(ValueError, match="cannot hold a longitude step"):
        write_grib2(make_forecast(nlat=5, nlon=7, leads=2), tmp_path / "forecast.grib2")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_file_already_there(tmp_path: Path) -> None:
    good = make_forecast(leads=2)
    for fmt, name in (("grib2", "forecast.grib2"), ("netcdf", "forecast.nc")):
        write_formats(good, tmp_path, [fmt])
        before = (tmp_path / name).read_bytes()
        bad = good.copy(deep=True)
        bad["temperature"].values[0, 1, 0, 3, 4] = np.nan
        bad["lead_time"] = bad["lead_time"] + np.timedelta64(30, "m")
        bad = bad.assign_coords(valid_time=bad["init_time"] + bad["lead_time"])
        with pytest.raises(ValueError, match="whole hour"):
            write_formats(bad, tmp_path, [fmt])
        assert (tmp_path / name).read_bytes() == before
    nan = good.copy(deep=True)
    nan["temperature"].values[0, 1, 0, 3, 4] = np.nan
    with pytest.raises(ValueError, match="non-finite values"):
        write_grib2(nan, tmp_path / "forecast.grib2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forecast.grib2", "forecast.nc"]  # no temporary left


# VmHWM, not ru_maxrss: Linux carries the parent's (pytest's) peak into ru_maxrss across fork and exec.
_PEAK = """
import sys, xarray as xr
from core.forecast_files import write_formats
with xr.open_zarr(sys.argv[1], consolidated=False) as lazy:
    write_formats(lazy, sys.argv[2], ["netcdf", "grib2"])
print(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
"""


def test_memory_stays_flat_however_many_leads_are_written(tmp_path: Path) -> None:
    import subprocess
    import sys

    peaks = {}
    for leads in (2, 41):
        store = tmp_path / f"l{leads}" / "forecast.zarr"
        write_forecast(make_forecast(nlat=121, nlon=240, leads=leads, seed=leads), store.parent, formats=[])
        # A fresh process per run: its peak RSS is the writers' alone, reading the store lazily.
        run = subprocess.run([sys.executable, "-c", _PEAK, str(store), str(store.parent)], capture_output=True,
                             text=True, check=True, cwd=Path(__file__).resolve().parents[2])
        peaks[leads] = int(run.stdout.split()[-1]) / 1024  # KiB → MiB
        assert {p.name for p in store.parent.iterdir()} == {"forecast.zarr", "forecast.nc", "forecast.grib2"}
    per_lead = 10 * 121 * 240 * 4 / 2**20  # 10 float32 fields a lead: 1.1 MiB
    # 39 more leads hold 43 MiB; a writer that kept them (or HDF5's chunk cache) would grow by that much.
    assert peaks[41] - peaks[2] < 10 * per_lead, peaks
