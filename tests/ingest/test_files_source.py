"""FileSource: CDS deliveries on disk (NetCDF, GRIB, zip; real ERA5 samples) into contract slabs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from core.grid import get_grid
from core.schema import EXPVER_FINAL, EXPVER_PRELIMINARY, SCHEMA_VERSION, validate_analysis
from ingest.files import FileSource
from ingest.regrid import regrid
from ingest.sources import Source
from tests.ingest.cds_files import cds_field, cds_grid, write_cds_grib, write_cds_netcdf

BESIDE_CHECKOUT = Path(__file__).resolve().parents[3] / "shared" / "reanalysis"
REANALYSIS = Path(os.environ.get("SPHERECAST_REANALYSIS", BESIDE_CHECKOUT))
MEMBERS = REANALYSIS / "github-ecmwf-cfgrib" / "era5-levels-members.grib"
UK = REANALYSIS / "github-pydata-xarray-data" / "era5-2mt-2019-03-uk.grib"
TINY = get_grid("tiny")
JAN = pd.date_range("2024-01-31T00", periods=4, freq="6h")
FEB = pd.date_range("2024-02-01T00", periods=4, freq="6h")
PL, SL = ["geopotential", "temperature"], ["2m_temperature", "total_precipitation"]


@pytest.fixture(scope="module")
def deliveries(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two months as CDS delivers them: new and legacy NetCDF, GRIB with ERA5T, a zip, nested folders."""
    root = tmp_path_factory.mktemp("era5")
    (root / "2024-02").mkdir()
    write_cds_netcdf(root / "pl_2024-01.nc", JAN, PL, [500, 850], grid_deg=3.0)
    write_cds_netcdf(root / "sfc_2024-01.nc", JAN, SL, [], grid_deg=3.0)  # a zip, named .nc like CDS does
    write_cds_grib(root / "2024-02" / "pl.grib", FEB, PL, [500, 850], grid_deg=3.0, expver=[1, 1, 5, 5])
    write_cds_netcdf(root / "2024-02" / "sfc.nc", FEB, SL, [], grid_deg=3.0, expver=[1, 1, 5, 5], legacy=True)
    (root / "notes.txt").write_text("not a delivery")
    return root


def oracle(name: str, level: int | None, t: pd.Timestamp) -> np.ndarray:
    lat, lon = cds_grid(3.0)
    native = xr.Dataset({"f": (("latitude", "longitude"), cds_field(name, level, t, lat, lon).astype(np.float64))},
                        coords={"latitude": lat, "longitude": lon})
    return regrid(native, TINY)["f"].values


def as_store(ds: xr.Dataset) -> xr.Dataset:
    ds = ds.copy()
    ds["done"] = ("time", np.ones(ds.sizes["time"], np.uint8))
    ds.attrs.update(schema_version=SCHEMA_VERSION, grid=TINY.describe())
    return ds


def test_directory_of_deliveries_becomes_a_contract_slab(deliveries: Path) -> None:
    source = FileSource([str(deliveries)], TINY)
    assert isinstance(source, Source) and source.name == "era5-files"
    assert [p.name for p in source.files()] == ["pl.grib", "sfc.nc", "pl_2024-01.nc", "sfc_2024-01.nc"]
    times = list(JAN[2:]) + list(FEB)  # spans two months, four files, three formats
    ds = source.fetch(times, ["temperature", "2m_temperature", "geopotential"], [850, 500])
    validate_analysis(as_store(ds))
    assert list(ds.data_vars) == ["temperature", "2m_temperature", "geopotential", "expver"]
    assert ds["level"].values.tolist() == [850, 500] and ds["level"].dtype == np.int32
    assert ds["time"].values.tolist() == pd.DatetimeIndex(times).values.astype("datetime64[ns]").tolist()
    assert ds["expver"].values.tolist() == [EXPVER_FINAL] * 4 + [EXPVER_PRELIMINARY] * 2
    assert ds["temperature"].attrs == {"units": "K", "long_name": "Temperature"}
    for i, t in enumerate(times):
        np.testing.assert_allclose(ds["temperature"].sel(level=850).values[i], oracle("temperature", 850, t), atol=2e-3)
        np.testing.assert_allclose(ds["2m_temperature"].values[i], oracle("2m_temperature", None, t), atol=1e-2)
    rev = source.fetch(times[::-1], ["2m_temperature"], [])
    assert rev["time"].values.tolist() == ds["time"].values[::-1].tolist() and "level" not in rev.coords
    np.testing.assert_array_equal(rev["2m_temperature"].values[::-1], ds["2m_temperature"].values)


def test_available_times_and_missing_pieces_are_named(deliveries: Path) -> None:
    source = FileSource([str(deliveries / "**" / "*.nc"), str(deliveries / "2024-0?" / "*.grib")], TINY)
    assert len(source.files()) == 4
    assert FileSource([str(deliveries / "*.nc")], TINY).available_times(["2m_temperature"], []).tolist() == list(JAN)
    assert source.available_times(["temperature", "total_precipitation"], [500]).tolist() == list(JAN) + list(FEB)
    with pytest.raises(ValueError, match=r"time 2024-02-02T00 is in none of the files .* for temperature at 500 hPa"):
        source.fetch([FEB[-1], FEB[-1] + pd.Timedelta(hours=6)], ["temperature"], [500])
    with pytest.raises(ValueError, match="for geopotential at 250 hPa"):
        source.fetch(list(JAN[:1]), ["geopotential"], [250])
    with pytest.raises(ValueError, match=r"time 2024-01-31T00 is in none of the files .* for 10m_u_component_of_wind"):
        source.fetch(list(JAN[:1]), ["10m_u_component_of_wind"], [])
    with pytest.raises(ValueError, match="unknown variable 't2m'"):
        source.fetch(list(JAN[:1]), ["t2m"], [])
    with pytest.raises(ValueError, match=r"no ERA5 files match \['/nowhere/\*\.grib'\]"):
        FileSource(["/nowhere/*.grib"], TINY).fetch(list(JAN[:1]), ["temperature"], [500])


def test_dataset_version_ignores_files_but_not_grid(deliveries: Path, tmp_path: Path) -> None:
    one = FileSource([str(deliveries / "pl_2024-01.nc")], TINY).dataset_version()
    assert one == FileSource([str(deliveries)], TINY).dataset_version()  # appending files keeps the version
    assert one != FileSource([str(deliveries)], get_grid("5.625deg")).dataset_version()


def test_final_delivery_replaces_an_era5t_one(tmp_path: Path) -> None:
    write_cds_netcdf(tmp_path / "a_era5t.nc", FEB[2:], ["2m_temperature"], [], grid_deg=3.0, expver=[5, 5], seed=9)
    source = FileSource([str(tmp_path)], TINY)
    prelim = source.fetch(list(FEB[2:]), ["2m_temperature"], [])
    assert prelim["expver"].values.tolist() == [EXPVER_PRELIMINARY] * 2
    write_cds_grib(tmp_path / "b_final.grib", FEB, ["2m_temperature"], [], grid_deg=3.0)
    source.refresh()
    final = source.fetch(list(FEB[2:]), ["2m_temperature"], [])
    assert final["expver"].values.tolist() == [EXPVER_FINAL] * 2
    np.testing.assert_allclose(final["2m_temperature"].values[1], oracle("2m_temperature", None, FEB[3]), atol=1e-2)
    assert np.abs(final["2m_temperature"].values - prelim["2m_temperature"].values).max() > 0.1


def test_bad_files_and_grid_conflicts_name_the_files(tmp_path: Path) -> None:
    good = write_cds_grib(tmp_path / "good.grib", JAN, ["temperature"], [500], grid_deg=3.0)
    other = write_cds_netcdf(tmp_path / "other.nc", FEB, ["temperature"], [500], grid_deg=6.0)
    with pytest.raises(ValueError, match=r"good\.grib' \(61x120\) and .*other\.nc' \(31x60\) are on different grids"):
        FileSource([str(good), str(other)], TINY).available_times(["temperature"], [500])
    corrupt = tmp_path / "corrupt.grib"
    corrupt.write_bytes(good.read_bytes()[:20000])
    with pytest.raises(ValueError, match=r"corrupt\.grib"):
        FileSource([str(good), str(corrupt)], TINY).fetch(list(JAN), ["temperature"], [500])
    nc = write_cds_netcdf(tmp_path / "full.nc", FEB, ["temperature"], [500], grid_deg=3.0).read_bytes()
    (tmp_path / "cut.nc").write_bytes(nc[: len(nc) // 2])
    with pytest.raises(ValueError, match=r"cut\.nc"):
        FileSource([str(tmp_path / "cut.nc")], TINY).fetch(list(FEB), ["temperature"], [500])


def real(path: Path) -> Path:
    if not REANALYSIS.is_dir():
        pytest.skip(f"real reanalysis folder {REANALYSIS} is absent (it sits beside the checkout)")
    return path


def test_real_era5_members_grib_onto_tiny_grid() -> None:
    # Ensemble (EDA) file: FileSource takes member 0, documented in ingest.delivered.
    source = FileSource([str(real(MEMBERS))], TINY)
    times = source.available_times(["geopotential", "temperature"], [500, 850])
    assert [str(t) for t in times] == ["2017-01-01 00:00:00", "2017-01-01 12:00:00",
                                       "2017-01-02 00:00:00", "2017-01-02 12:00:00"]
    ds = source.fetch(times, ["geopotential", "temperature"], [500, 850])
    validate_analysis(as_store(ds))
    z500, t850 = ds["geopotential"].sel(level=500), ds["temperature"].sel(level=850)
    assert 4.5e4 < float(z500.min()) and float(z500.max()) < 5.9e4
    assert 230.0 < float(t850.min()) and float(t850.max()) < 310.0
    assert ds["expver"].values.tolist() == [EXPVER_FINAL] * 4
    # z500 falls from the tropics to the poles
    assert float(z500.isel(latitude=8).mean()) > float(z500.isel(latitude=0).mean()) + 3000


def test_real_regional_uk_grib_is_rejected_as_not_global() -> None:
    source = FileSource([str(real(UK))], TINY)
    with pytest.raises(ValueError, match=r"era5-2mt-2019-03-uk\.grib' is not global \(33x49, latitude 58…50"):
        source.fetch([pd.Timestamp("2019-03-01T00")], ["2m_temperature"], [])
