"""Decoding CDS deliveries (new/legacy NetCDF, GRIB, zip) into contract names, and the factory that fakes them."""

from __future__ import annotations

import logging
import os
import shutil
import zipfile
from pathlib import Path

import cfgrib
import eccodes
import netCDF4
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from core.schema import EXPVER_FINAL, EXPVER_PRELIMINARY, EXPVER_UNKNOWN
from core.variables import VARIABLES
from ingest.delivered import decode_many, describe_delivered, open_delivered, sniff_format
from tests.ingest.cds_files import cds_field, cds_grid, write_cds_grib, write_cds_netcdf

BESIDE_CHECKOUT = Path(__file__).resolve().parents[3] / "shared" / "reanalysis"
REANALYSIS = Path(os.environ.get("SPHERECAST_REANALYSIS", BESIDE_CHECKOUT))
MEMBERS = REANALYSIS / "github-ecmwf-cfgrib" / "era5-levels-members.grib"
TIMES = pd.date_range("2024-03-31T12", periods=4, freq="6h")
PL = ["geopotential", "temperature"]
# Packing tolerances: GRIB 16-bit over the field's range; legacy int16 over the valid range.
GRIB_ATOL = {"geopotential": 0.2, "temperature": 1e-3, "2m_temperature": 1e-3, "total_precipitation": 1e-7}


def oracle(variable: str, level: int | None, time: object, grid_deg: float = 3.0, seed: int = 0) -> np.ndarray:
    lat, lon = cds_grid(grid_deg)
    return cds_field(variable, level, time, lat, lon, seed)


def test_factory_new_netcdf_has_the_cds_structure(tmp_path: Path) -> None:
    path = write_cds_netcdf(tmp_path / "pl.nc", TIMES, PL, [500, 850], grid_deg=3.0, expver=[1, 1, 5, 5])
    assert path.read_bytes()[:4] == b"\x89HDF"
    with netCDF4.Dataset(path) as nc:
        assert nc.variables["valid_time"].dtype == np.int64
        assert nc.variables["valid_time"].units == "seconds since 1970-01-01"
        assert nc.variables["expver"].dtype is str
        assert list(nc.variables["expver"][:]) == ["0001", "0001", "0005", "0005"]
        assert nc.variables["number"].dimensions == ()
        assert nc.variables["z"].dimensions == ("valid_time", "pressure_level", "latitude", "longitude")
        assert nc.variables["z"].GRIB_paramId == 129 and nc.variables["z"].GRIB_shortName == "z"
        assert nc.variables["pressure_level"][:].tolist() == [850.0, 500.0]  # decreasing, like CDS
    raw = xr.open_dataset(path)
    assert raw["latitude"].values[0] == 90 and raw["longitude"].values[-1] == 357
    np.testing.assert_array_equal(raw["t"].sel(pressure_level=850).isel(valid_time=1).values,
                                  oracle("temperature", 850, TIMES[1]))


def test_factory_rejects_what_cds_cannot_deliver(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="two datasets"):
        write_cds_netcdf(tmp_path / "x.nc", TIMES, ["temperature", "2m_temperature"], [500])
    with pytest.raises(ValueError, match="expver must give 1 or 5"):
        write_cds_grib(tmp_path / "x.grib", TIMES, ["2m_temperature"], [], expver=[1, 2, 1, 1])
    for name in VARIABLES:  # every recipe stays inside the vocabulary's valid range
        lo, hi = VARIABLES[name].valid_range
        for level in ((1, 500, 1000) if VARIABLES[name].level_type == "pressure" else (None,)):
            f = oracle(name, level, TIMES[0], grid_deg=6.0)
            assert lo <= f.min() and f.max() <= hi and f.std() > 0, name


def test_new_netcdf_decodes_to_contract_with_expver_per_time(tmp_path: Path) -> None:
    ds = open_delivered(write_cds_netcdf(tmp_path / "pl.nc", TIMES, PL, [500, 850], grid_deg=3.0, expver=[1, 1, 5, 5]))
    assert set(ds.data_vars) == {"geopotential", "temperature", "expver"}
    assert ds["geopotential"].dims == ("time", "level", "latitude", "longitude")
    assert ds["geopotential"].dtype == np.float32 and ds["level"].dtype == np.int32
    assert ds["geopotential"].attrs == {"units": "m**2 s**-2", "long_name": "Geopotential"}
    assert ds["time"].values.tolist() == TIMES.values.astype("datetime64[ns]").tolist()
    assert ds["expver"].dtype == np.int8 and ds["expver"].values.tolist() == [1, 1, 5, 5]
    np.testing.assert_array_equal(ds["geopotential"].sel(level=500).isel(time=3).values,
                                  oracle("geopotential", 500, TIMES[3]))


def test_legacy_netcdf_combines_the_expver_dimension(tmp_path: Path) -> None:
    path = write_cds_netcdf(tmp_path / "legacy.nc", TIMES, ["2m_temperature"], [], grid_deg=3.0,
                            expver=[1, 1, 1, 5], legacy=True)
    assert path.read_bytes()[:3] == b"CDF"
    raw = xr.open_dataset(path)
    assert raw["t2m"].dims == ("time", "expver", "latitude", "longitude")
    assert bool(raw["t2m"].sel(expver=5).isel(time=0).isnull().all())
    assert bool(raw["t2m"].sel(expver=1).isel(time=3).isnull().all())
    ds = open_delivered(path)
    assert ds["expver"].values.tolist() == [1, 1, 1, 5]
    assert ds["2m_temperature"].dims == ("time", "latitude", "longitude") and ds["2m_temperature"].dtype == np.float32
    for i in (0, 3):
        np.testing.assert_allclose(ds["2m_temperature"].isel(time=i).values, oracle("2m_temperature", None, TIMES[i]),
                                   atol=5e-3)
    single = open_delivered(write_cds_netcdf(tmp_path / "one.nc", TIMES, PL, [500], grid_deg=3.0, legacy=True))
    assert single["expver"].values.tolist() == [EXPVER_UNKNOWN] * 4  # legacy files did not record it
    assert single["level"].values.tolist() == [500]


def test_factory_grib_reads_back_with_cfgrib_and_ecmwf_keys(tmp_path: Path) -> None:
    path = write_cds_grib(tmp_path / "pl.grib", TIMES, PL, [500, 850], grid_deg=3.0, expver=[1, 1, 5, 5])
    raw = xr.open_dataset(path, engine="cfgrib", backend_kwargs={"indexpath": ""})
    assert raw["isobaricInhPa"].values.tolist() == [850, 500] and raw["z"].attrs["GRIB_paramId"] == 129
    np.testing.assert_allclose(raw["z"].sel(isobaricInhPa=500).isel(time=2).values,
                               oracle("geopotential", 500, TIMES[2]), atol=GRIB_ATOL["geopotential"])
    with open(path, "rb") as f:
        keys = []
        while (h := eccodes.codes_grib_new_from_file(f)) is not None:
            keys.append(tuple(eccodes.codes_get(h, k) for k in ("class", "stream", "type", "expver", "bitsPerValue")))
            eccodes.codes_release(h)
    assert len(keys) == 16 and keys[0] == ("ea", "oper", "an", "0001", 16) and keys[-1][3] == "0005"
    assert not list(tmp_path.glob("*.idx"))


def test_grib_decodes_expver_per_message_and_accumulations(tmp_path: Path) -> None:
    ds = open_delivered(write_cds_grib(tmp_path / "pl.grib", TIMES, PL, [500, 850], grid_deg=3.0, expver=[1, 1, 5, 5]))
    assert ds["expver"].values.tolist() == [1, 1, 5, 5]  # cfgrib's read_keys would say "0001" throughout
    assert ds["temperature"].dims == ("time", "level", "latitude", "longitude")
    np.testing.assert_allclose(ds["temperature"].sel(level=850).isel(time=1).values,
                               oracle("temperature", 850, TIMES[1]), atol=GRIB_ATOL["temperature"])
    sfc = write_cds_grib(tmp_path / "sfc.grib", TIMES, ["2m_temperature", "total_precipitation"], [], grid_deg=3.0)
    raw = cfgrib.open_datasets(str(sfc), backend_kwargs={"indexpath": ""})
    assert any("step" in d["tp"].dims for d in raw if "tp" in d)  # tp is forecast base time × step
    ds = open_delivered(sfc)
    assert ds["time"].values.tolist() == TIMES.values.astype("datetime64[ns]").tolist()
    for i, t in enumerate(TIMES):
        for name in ("2m_temperature", "total_precipitation"):
            np.testing.assert_allclose(ds[name].isel(time=i).values, oracle(name, None, t), atol=GRIB_ATOL[name])


def test_one_grib_with_single_and_pressure_levels(tmp_path: Path) -> None:
    a = write_cds_grib(tmp_path / "a.grib", TIMES, ["temperature"], [850], grid_deg=3.0)
    b = write_cds_grib(tmp_path / "b.grib", TIMES[:2], ["2m_temperature"], [], grid_deg=3.0, expver=[5, 5])
    both = tmp_path / "both.grib"
    both.write_bytes(a.read_bytes() + b.read_bytes())
    ds = open_delivered(both)
    assert {"temperature", "2m_temperature"} <= set(ds.data_vars)
    assert ds["temperature"].dims == ("time", "level", "latitude", "longitude")
    assert ds["expver"].values.tolist() == [5, 5, 1, 1]  # one field preliminary → the time is preliminary
    info = describe_delivered(both)
    assert info.fields[("2m_temperature", None)] == set(TIMES[:2].values.astype("datetime64[ns]"))
    assert info.fields[("temperature", 850)] == set(TIMES.values.astype("datetime64[ns]"))


def test_cds_zip_and_format_sniffed_by_content(tmp_path: Path) -> None:
    path = write_cds_netcdf(tmp_path / "sfc.nc", TIMES, ["2m_temperature", "total_precipitation"], [], grid_deg=3.0)
    assert zipfile.is_zipfile(path) and sniff_format(path) == "zip"
    ds = open_delivered(path)
    np.testing.assert_array_equal(ds["total_precipitation"].isel(time=2).values,
                                  oracle("total_precipitation", None, TIMES[2]))
    disguised = tmp_path / "really_grib.nc"
    shutil.copy(write_cds_grib(tmp_path / "t.grib", TIMES, ["2m_temperature"], [], grid_deg=3.0), disguised)
    assert sniff_format(disguised) == "grib" and "2m_temperature" in open_delivered(disguised)


def _damaged(tmp_path: Path) -> dict[str, Path]:
    grib = write_cds_grib(tmp_path / "ok.grib", TIMES, PL, [500], grid_deg=3.0).read_bytes()
    nc4 = write_cds_netcdf(tmp_path / "ok.nc", TIMES, PL, [500], grid_deg=3.0).read_bytes()
    nc3 = write_cds_netcdf(tmp_path / "ok3.nc", TIMES, PL, [500], grid_deg=3.0, legacy=True).read_bytes()
    files = {"empty.grib": b"", "random.nc": os.urandom(4000), "truncated.grib": grib[: len(grib) * 2 // 3],
             "spliced.grib": grib[:5000] + os.urandom(300) + grib[len(grib) // 2:],
             "junk_tail.grib": grib + b"not grib at all",
             "truncated4.nc": nc4[: len(nc4) * 9 // 10], "truncated3.nc": nc3[: len(nc3) * 9 // 10],
             "broken.zip": b"PK\x03\x04" + os.urandom(500)}
    out = {}
    for name, data in files.items():
        out[name] = tmp_path / name
        out[name].write_bytes(data)
    return out


def test_damaged_files_raise_one_value_error_naming_the_file(tmp_path: Path) -> None:
    for name, path in _damaged(tmp_path).items():
        with pytest.raises(ValueError, match=name.replace(".", r"\.")) as err:
            open_delivered(path)
        assert "Traceback" not in str(err.value), name


def test_wrong_units_and_grid_order(tmp_path: Path) -> None:
    path = write_cds_netcdf(tmp_path / "c.nc", TIMES[:2], ["2m_temperature"], [], grid_deg=3.0)
    with netCDF4.Dataset(path, "a") as nc:
        nc.variables["t2m"].units = "degC"
    with pytest.raises(ValueError, match=r"c\.nc.*'t2m' \(2m_temperature\) has units 'degC'"):
        open_delivered(path)
    raw = xr.open_dataset(write_cds_netcdf(tmp_path / "d.nc", TIMES[:2], ["2m_temperature"], [], grid_deg=3.0)).load()
    flipped = raw.isel(latitude=slice(None, None, -1)).roll(longitude=60, roll_coords=True)
    flipped = flipped.assign_coords(longitude=((flipped["longitude"] + 180) % 360) - 180)
    assert flipped["longitude"].values[0] == -180 and flipped["latitude"].values[0] == -90
    flipped.to_netcdf(tmp_path / "e.nc")
    ds = open_delivered(tmp_path / "e.nc")
    assert ds["latitude"].values[0] == 90 and ds["longitude"].values.tolist() == cds_grid(3.0)[1].tolist()
    np.testing.assert_array_equal(ds["2m_temperature"].isel(time=1).values, oracle("2m_temperature", None, TIMES[1]))


def test_decode_many_merges_months_variables_and_prefers_final(tmp_path: Path) -> None:
    march, april = TIMES[:2], TIMES[2:]
    files = [write_cds_netcdf(tmp_path / "t_mar.nc", march, ["temperature"], [500], grid_deg=3.0),
             write_cds_grib(tmp_path / "t_apr.grib", april, ["temperature"], [500], grid_deg=3.0),
             write_cds_netcdf(tmp_path / "z.nc", TIMES, ["geopotential"], [500, 850], grid_deg=3.0),
             # ERA5T delivery of one April time with other values, then its final replacement
             write_cds_netcdf(tmp_path / "t2m_prelim.nc", april[:1], ["2m_temperature"], [], grid_deg=3.0,
                              expver=[5], seed=7),
             write_cds_netcdf(tmp_path / "t2m_final.nc", april, ["2m_temperature"], [], grid_deg=3.0)]
    ds = decode_many(files)
    assert ds["time"].values.tolist() == TIMES.values.astype("datetime64[ns]").tolist()
    assert set(ds["level"].values.tolist()) == {500, 850}
    np.testing.assert_allclose(ds["temperature"].sel(level=500).isel(time=3).values,
                               oracle("temperature", 500, TIMES[3]), atol=GRIB_ATOL["temperature"])
    np.testing.assert_array_equal(ds["2m_temperature"].sel(time=april[0]).values,
                                  oracle("2m_temperature", None, april[0]))
    assert ds["expver"].values.tolist() == [EXPVER_FINAL] * 4
    only = decode_many(files[3:4], variables=["2m_temperature"])
    assert only["expver"].values.tolist() == [EXPVER_PRELIMINARY]
    coarse = write_cds_netcdf(tmp_path / "coarse.nc", march, ["temperature"], [500], grid_deg=6.0)
    with pytest.raises(ValueError, match=r"t_mar\.nc.*coarse\.nc.*different grids"):
        decode_many([files[0], coarse])


def test_real_ensemble_grib_uses_member_zero(caplog: pytest.LogCaptureFixture) -> None:
    if not MEMBERS.is_file():
        pytest.skip(f"real reanalysis sample {MEMBERS} is absent")
    with caplog.at_level(logging.WARNING, logger="ingest.delivered"):
        ds = open_delivered(MEMBERS)
    assert "ensemble of 10 members; using member 0" in caplog.text
    raw = xr.open_dataset(MEMBERS, engine="cfgrib", backend_kwargs={"indexpath": ""})
    np.testing.assert_array_equal(ds["geopotential"].sel(level=500).values,
                                  raw["z"].sel(number=0, isobaricInhPa=500).values)
    assert ds.sizes["time"] == 4 and ds["expver"].values.tolist() == [EXPVER_FINAL] * 4
    assert ds["level"].values.tolist() == [850, 500]
