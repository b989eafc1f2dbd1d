"""GET /runs/{run}/subset over real published runs: every format equals xarray's own selection of forecast.zarr."""

from __future__ import annotations

import asyncio
import hashlib
import io
import zipfile
from pathlib import Path

import cfgrib
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from fastapi.testclient import TestClient

import serve.subset_formats as subset_formats
from core.forecast_files import GRIB_BITS_PER_VALUE
from core.runs import exclusive, run_name, staging_dir, write_manifest
from serve.app import create_app
from serve.settings import ServeSettings
from tests.serve.conftest import INIT, PROVENANCE, make_forecast, publish_run

RUN = run_name(INIT)
URL = f"/runs/{RUN}/subset"
# Grid points of the tiny grid (11.25° steps) on the box's edges: both edges must be in the answer.
BOX = "11.25,-22.5,56.25,45"


def oracle(run_dir: Path) -> xr.Dataset:
    """The run's forecast.zarr as xarray opens it: the independent side of every comparison."""
    return xr.open_zarr(run_dir / "forecast.zarr", zarr_format=3, consolidated=False, decode_timedelta=True)


def hours(*h: int) -> list[np.timedelta64]:
    return [np.timedelta64(x, "h") for x in h]


def open_nc(data: bytes, tmp_path: Path) -> xr.Dataset:
    # A fresh name each time: xarray caches open files by path, so a rewritten file would read as the old one.
    path = tmp_path / f"subset-{hashlib.sha256(data).hexdigest()[:16]}.nc"
    path.write_bytes(data)
    with xr.open_dataset(path, engine="netcdf4", decode_timedelta=True) as ds:
        return ds.load()


def open_zarr_zip(data: bytes, tmp_path: Path) -> xr.Dataset:
    path = tmp_path / f"subset-{hashlib.sha256(data).hexdigest()[:16]}.zarr.zip"
    path.write_bytes(data)
    with zarr.storage.ZipStore(path, mode="r") as store:
        return xr.open_zarr(store, zarr_format=3, consolidated=False, decode_timedelta=True).load()


def run_hashes(run_dir: Path) -> dict[str, str]:
    return {p.relative_to(run_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def dateline_concat(ds: xr.Dataset, west: float, east: float) -> xr.Dataset:
    """xarray's own cut of a box across 0°: the part from ``west`` to 360, then 0 to ``east`` shifted by 360."""
    a = ds.sel(longitude=slice(west, 360))
    b = ds.sel(longitude=slice(0, east))
    return xr.concat([a, b.assign_coords(longitude=b["longitude"] + 360)], dim="longitude")


@pytest.mark.parametrize("fmt", ["nc", "zarr.zip"])
def test_nc_and_zarr_zip_equal_xarrays_selection_exactly(client: TestClient, run_dir: Path, tmp_path: Path,
                                                         fmt: str) -> None:
    r = client.get(URL, params={"bbox": BOX, "variables": "u_component_of_wind,geopotential", "levels": "500",
                                "leads": "6,18", "format": fmt})
    assert r.status_code == 200, r.text
    ext = "nc" if fmt == "nc" else "zarr.zip"
    assert r.headers["content-disposition"] == f'attachment; filename="spherecast_{RUN}_subset.{ext}"'
    assert r.headers["content-type"].startswith("application/x-netcdf" if fmt == "nc" else "application/zip")
    got = open_nc(r.content, tmp_path) if fmt == "nc" else open_zarr_zip(r.content, tmp_path)
    want = oracle(run_dir)[["geopotential", "u_component_of_wind"]].sel(
        latitude=slice(45, -22.5), longitude=slice(11.25, 56.25), level=[500], lead_time=hours(6, 18)).load()
    assert got.sizes["latitude"] == 7 and got.sizes["longitude"] == 5  # both edges of the box are in
    xr.testing.assert_equal(got, want)  # values, dims and every coordinate (valid_time included)
    assert int(r.headers["x-estimated-size"]) == sum(want[n].size * 4 for n in want.data_vars)
    assert got.attrs["geospatial_lon_min"] == 11.25 and got.attrs["source_grid"].startswith("tiny:")


def test_grib2_reads_back_with_cfgrib_within_the_packing_bound(client: TestClient, run_dir: Path,
                                                               tmp_path: Path) -> None:
    r = client.get(URL, params={"bbox": "160,-30,-160,30", "leads": "0,12,24", "format": "grib2"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-grib2"
    path = tmp_path / "subset.grib2"
    path.write_bytes(r.content)
    want = oracle(run_dir).sel(latitude=slice(30, -30), longitude=slice(160, 200), lead_time=hours(0, 12, 24)).load()
    got = {da.attrs["GRIB_shortName"]: da.load() for ds in cfgrib.open_datasets(str(path), backend_kwargs={
        "indexpath": ""}) for da in ds.data_vars.values()}
    assert sorted(got) == ["u", "v", "z"]
    for short, name in (("z", "geopotential"), ("u", "u_component_of_wind"), ("v", "v_component_of_wind")):
        da = got[short]
        np.testing.assert_allclose(da["latitude"].values, want["latitude"].values, atol=1e-6)
        np.testing.assert_allclose(da["longitude"].values, [168.75, 180.0, 191.25], atol=1e-6)
        np.testing.assert_array_equal(da["step"].values, want["lead_time"].values)
        np.testing.assert_array_equal(da["valid_time"].values, want["valid_time"].values[0])
        truth = want[name].sel(level=500).isel(init_time=0).values.astype(np.float64)
        spread = truth.max(axis=(-2, -1), keepdims=True) - truth.min(axis=(-2, -1), keepdims=True)
        bound = spread / (2**GRIB_BITS_PER_VALUE - 1) + np.abs(truth) * 2.0**-23
        assert np.all(np.abs(da.values - truth) <= bound), name


def test_csv_rows_equal_the_selection_to_float32_text_precision(client: TestClient, run_dir: Path) -> None:
    r = client.get(URL, params={"bbox": "-30,-30,30,30", "variables": "geopotential,v_component_of_wind",
                                "leads": "0,24", "format": "csv"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/csv; charset=utf-8"
    table = pd.read_csv(io.StringIO(r.text), dtype=str)
    assert list(table.columns) == ["init_time", "valid_time", "lead_hours", "latitude", "longitude",
                                   "geopotential_500", "v_component_of_wind_500"]
    want = dateline_concat(oracle(run_dir), 330, 30).sel(latitude=slice(30, -30), lead_time=hours(0, 24)).load()
    nlat, nlon = want.sizes["latitude"], want.sizes["longitude"]
    assert len(table) == 2 * nlat * nlon  # rows: lead, then latitude (north first), then longitude
    np.testing.assert_array_equal(table["lead_hours"].astype(int), np.repeat([0, 24], nlat * nlon))
    np.testing.assert_array_equal(table["latitude"].astype(float), np.tile(np.repeat(want["latitude"].values, nlon), 2))
    np.testing.assert_array_equal(table["longitude"].astype(float), np.tile(want["longitude"].values, 2 * nlat))
    assert (table["init_time"] == "2000-01-01T00:00:00Z").all()
    valid = pd.to_datetime(table["valid_time"]).dt.tz_localize(None).values
    np.testing.assert_array_equal(valid, np.repeat(want["valid_time"].values[0], nlat * nlon))
    for name in ("geopotential", "v_component_of_wind"):
        expected = want[name].sel(level=500).isel(init_time=0).values.ravel()
        np.testing.assert_array_equal(table[f"{name}_500"].astype(np.float32).values, expected)


def test_boxes_across_the_dateline_and_0_equal_xarrays_concat_in_either_longitude_convention(
        client: TestClient, run_dir: Path, tmp_path: Path) -> None:
    ds = oracle(run_dir)
    cases = {  # the same box written in −180 … 180 and in 0 … 360
        "dateline": (["160,-20,-160,20", "160,-20,200,20"], ds.sel(longitude=slice(160, 200))),
        "0 meridian": (["-30,-20,30,20", "330,-20,30,20"], dateline_concat(ds, 330, 30)),
    }
    for name, (boxes, want) in cases.items():
        want = want.sel(latitude=slice(20, -20)).load()
        answers = []
        for bbox in boxes:
            r = client.get(URL, params={"bbox": bbox})
            assert r.status_code == 200, (name, bbox, r.text)
            answers.append(r.content)
            xr.testing.assert_equal(open_nc(r.content, tmp_path), want)
        got = open_nc(answers[0], tmp_path)
        assert np.all(np.diff(got["longitude"].values) > 0), name  # one increasing longitude axis
    assert open_nc(answers[0], tmp_path)["longitude"].values.tolist() == [337.5, 348.75, 360.0, 371.25, 382.5]


def test_default_is_everything_and_subsets_cut_only_what_is_asked(client: TestClient, run_dir: Path,
                                                                  tmp_path: Path) -> None:
    ds = oracle(run_dir).load()
    r = client.get(URL)
    assert r.status_code == 200 and r.headers["content-disposition"].endswith('subset.nc"')
    xr.testing.assert_equal(open_nc(r.content, tmp_path), ds)
    whole = client.get(URL, params={"bbox": "-180,-90,180,90"})
    xr.testing.assert_equal(open_nc(whole.content, tmp_path), ds)  # 360° wide: the run's own axis 0 … 360−Δ
    r = client.get(URL, params={"variables": "v_component_of_wind", "leads": "24,0", "levels": "500"})
    xr.testing.assert_equal(open_nc(r.content, tmp_path), ds[["v_component_of_wind"]].isel(lead_time=[0, 4]))


def test_an_ensemble_run_is_cut_by_members(tmp_path: Path) -> None:
    fc = make_forecast(leads=2)
    members = []
    for m in range(3):  # each member a distinct field, so a wrong member cannot pass
        member = fc.copy(deep=True)
        for name in member.data_vars:
            member[name] = member[name] + np.float32(m)
            member[name].attrs = fc[name].attrs
        members.append(member)
    ens = xr.concat(members, dim=pd.Index(np.arange(3, dtype=np.int32), name="member"))
    ens = ens.transpose("init_time", "lead_time", "member", ...)
    ens["valid_time"] = fc["valid_time"]
    publish_run(tmp_path / "forecasts", ens)
    client = TestClient(create_app(ServeSettings(forecasts_dir=tmp_path / "forecasts")))
    r = client.get(URL, params={"members": "2,0", "bbox": BOX, "format": "zarr.zip"})
    assert r.status_code == 200, r.text
    want = oracle(tmp_path / "forecasts" / RUN).isel(member=[0, 2]).sel(latitude=slice(45, -22.5),
                                                                        longitude=slice(11.25, 56.25))
    xr.testing.assert_equal(open_zarr_zip(r.content, tmp_path), want.load())
    r = client.get(URL, params={"members": "0", "leads": "6", "bbox": "0,0,0,0", "format": "csv"})
    assert r.text.splitlines()[0].startswith("init_time,valid_time,lead_hours,member,latitude,longitude,")
    assert client.get(URL, params={"members": "5"}).json()["detail"].endswith("known: 0, 1, 2")


def test_413_gives_the_estimate_and_head_gives_headers_without_a_body(run_dir: Path, forecasts_dir: Path) -> None:
    values = 3 * 5 * 17 * 32  # variables × leads × latitudes × longitudes, float32
    client = TestClient(create_app(ServeSettings(forecasts_dir=forecasts_dir, subset_max_bytes=values * 4 - 1)))
    r = client.get(URL)
    assert r.status_code == 413 and r.headers["x-estimated-size"] == str(values * 4)
    assert r.json()["detail"] == (f"the subset's estimated size, {values * 4} bytes, exceeds the cap of "
                                  f"{values * 4 - 1} bytes; narrow bbox, variables, levels or leads")
    assert client.head(URL).status_code == 413
    r = client.head(URL, params={"leads": "0", "format": "grib2"})
    assert r.status_code == 200 and r.content == b""
    assert r.headers["x-estimated-size"] == str(values * 4 // 5)
    assert r.headers["content-type"] == "application/x-grib2"
    assert r.headers["content-disposition"] == f'attachment; filename="spherecast_{RUN}_subset.grib2"'
    csv = client.head(URL, params={"leads": "0", "format": "csv"})
    assert int(csv.headers["x-estimated-size"]) == 17 * 32 * (64 + 14 * 3)  # rows × (coordinates + 3 values)


BAD = [
    ("bbox=1,2,3", "'bbox'"), ("bbox=a,b,c,d", "'bbox'"), ("bbox=0,10,20,-10", "'bbox' is reversed"),
    ("bbox=0,nan,20,10", "'bbox'"), ("bbox=0,-10,inf,10", "'bbox'"), ("bbox=0,-91,20,10", "'bbox' south"),
    ("bbox=-181,-10,20,10", "'bbox' west"), ("bbox=0,-10,361,10", "'bbox' east"),
    ("bbox=1,1,2,2", "grid spacing is 11.25°"), ("variables=geopotential,relative_humidity", "'variables'"),
    ("levels=500,700", "'levels' asks for 700 hPa"), ("levels=five", "'levels'"), ("leads=7", "known: 0 h, 6 h"),
    ("members=0", "'members'"), ("format=geotiff", "offered: nc, grib2, csv, zarr.zip"),
    ("varibles=geopotential", "'varibles' is not known"), ("bbox=0,0,10,10&bbox=0,0,20,20", "'bbox' is given 2"),
    ("variables=", "'variables'"), ("format=grib2&bbox=-30,-20,30,20", "'format' grib2 cannot hold this bbox"),
]


@pytest.mark.parametrize(("query", "named"), BAD, ids=[q for q, _ in BAD])
def test_bad_input_is_a_422_naming_the_parameter_and_changes_nothing(client: TestClient, run_dir: Path,
                                                                     query: str, named: str) -> None:
    before = run_hashes(run_dir)
    r = client.get(f"{URL}?{query}")
    assert r.status_code == 422, r.text
    assert named in r.json()["detail"]
    assert client.head(f"{URL}?{query}").status_code == 422
    assert run_hashes(run_dir) == before


def test_openapi_documents_the_formats_and_error_codes(client: TestClient) -> None:
    op = client.get("/openapi.json").json()["paths"]["/runs/{run}/subset"]["get"]
    assert sorted(op["responses"]["200"]["content"]) == ["application/x-grib2", "application/x-netcdf",
                                                         "application/zip", "text/csv"]
    assert {"404", "413", "422", "503"} <= set(op["responses"])
    assert op["responses"]["413"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    params = {p["name"]: p for p in op["parameters"]}
    assert set(params) == {"run", "bbox", "variables", "levels", "leads", "members", "format"}
    assert params["format"]["schema"]["enum"] == ["nc", "grib2", "csv", "zarr.zip"]


def test_a_run_without_forecast_zarr_or_not_published_is_a_404(client: TestClient, tmp_path: Path) -> None:
    assert client.get("/runs/19990101T00/subset").status_code == 404
    assert client.get("/runs/1999010100/subset").status_code == 422
    forecasts = tmp_path / "forecasts"
    staging = staging_dir(forecasts, RUN)
    make_forecast().to_netcdf(staging / "forecast.nc")
    write_manifest(staging, pd.Timestamp(INIT), provenance=PROVENANCE)
    staging.rename(forecasts / RUN)
    r = TestClient(create_app(ServeSettings(forecasts_dir=forecasts))).get(URL)
    assert r.status_code == 404 and "forecast.zarr" in r.json()["detail"]


@pytest.mark.parametrize("fmt", ["nc", "grib2", "zarr.zip", "csv"])
def test_temporary_files_are_gone_after_the_response(client: TestClient, run_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    monkeypatch.setattr(subset_formats, "SCRATCH_DIR", tmp_path)
    r = client.get(URL, params={"bbox": BOX, "format": fmt})
    assert r.status_code == 200 and len(r.content) > 0
    assert list(tmp_path.iterdir()) == []
    with exclusive(run_dir) as free:
        assert free  # the reader lock went with the response


# ASGI 2.3 servers report the client gone through receive(); 2.4 ones by a send that raises OSError.
@pytest.mark.parametrize(("spec", "fmt"), [("2.3", "nc"), ("2.3", "grib2"), ("2.3", "zarr.zip"), ("2.3", "csv"),
                                           ("2.4", "nc"), ("2.4", "csv")])
def test_a_client_gone_mid_stream_leaves_no_temporary_file_and_no_lock(forecasts_dir: Path, run_dir: Path,
                                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        fmt: str, spec: str) -> None:
    monkeypatch.setattr(subset_formats, "SCRATCH_DIR", tmp_path)
    monkeypatch.setattr(subset_formats, "MIN_BLOCK", 4096)  # many blocks, so the client leaves mid-file
    app = create_app(ServeSettings(forecasts_dir=forecasts_dir, chunk_size=4096))
    query = b"format=" + fmt.encode() + (b"&variables=geopotential" if fmt == "csv" else b"")
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": URL, "raw_path": URL.encode(), "query_string": query,
             "root_path": "", "headers": [(b"host", b"test")], "client": ("127.0.0.1", 1), "server": ("test", 80)}
    seen: list[dict] = []
    gone = asyncio.Event()
    held_mid_stream: list[bool] = []

    requested: list[bool] = []

    async def receive() -> dict:
        if not requested:
            requested.append(True)
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        seen.append(message)
        if message["type"] == "http.response.body":
            with exclusive(run_dir) as free:
                held_mid_stream.append(not free)
            assert list(tmp_path.iterdir()) or fmt == "csv"  # the temporary file exists while streaming
            gone.set()
            if spec == "2.4":
                raise OSError("client went away")  # what a 2.4 server raises on a send after a disconnect
            await asyncio.sleep(0.05)

    async def call() -> None:
        try:
            await asyncio.wait_for(app(scope, receive, send), timeout=60)  # a hang fails instead of blocking
        except Exception as exc:  # 2.4: starlette turns the OSError into ClientDisconnect
            assert type(exc).__name__ == "ClientDisconnect", exc

    asyncio.run(call())
    assert seen[0]["status"] == 200
    bodies = [m for m in seen if m["type"] == "http.response.body"]
    assert bodies and all(m["more_body"] for m in bodies)  # the body never finished
    assert held_mid_stream[0]  # the run was locked against retention while the client read
    assert list(tmp_path.iterdir()) == []
    with exclusive(run_dir) as free:
        assert free


def test_a_1_5_degree_run_at_era5_size(tmp_path: Path) -> None:
    forecasts = tmp_path / "forecasts"
    run_dir = publish_run(forecasts, make_forecast(grid="1.5deg", leads=3), dpi=20)
    client = TestClient(create_app(ServeSettings(forecasts_dir=forecasts)))
    ds = oracle(run_dir)
    assert (ds.sizes["latitude"], ds.sizes["longitude"]) == (121, 240)
    r = client.get(URL, params={"bbox": "-30,30,40,75", "leads": "6,12"})
    assert r.status_code == 200, r.text
    want = dateline_concat(ds, 330, 40).sel(latitude=slice(75, 30), lead_time=hours(6, 12)).load()
    assert (want.sizes["latitude"], want.sizes["longitude"]) == (31, 47)
    xr.testing.assert_equal(open_nc(r.content, tmp_path), want)
    r = client.get(URL, params={"bbox": "170,-45,-170,-10", "format": "csv", "variables": "geopotential"})
    table = pd.read_csv(io.StringIO(r.text))
    want = ds["geopotential"].sel(latitude=slice(-10, -45), longitude=slice(170, 190), level=500).load()
    np.testing.assert_array_equal(table["geopotential_500"].to_numpy(np.float32), want.values.ravel())
    np.testing.assert_array_equal(np.unique(table["longitude"]), want["longitude"].values)
    r = client.get(URL, params={"format": "zarr.zip", "leads": "0"})
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        assert "geopotential/zarr.json" in zf.namelist()
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())


@pytest.mark.parametrize(("fmt", "gzipped"), [("csv", True), ("nc", False), ("grib2", False), ("zarr.zip", False)])
def test_only_csv_subsets_are_gzipped(client: TestClient, fmt: str, gzipped: bool) -> None:
    # NetCDF-4, GRIB2 (CCSDS) and zip are compressed already: gzip would only spend the server's CPU.
    r = client.get(f"/runs/{RUN}/subset", params={"format": fmt, "bbox": "0,-30,90,30"},
                   headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200, r.text
    assert (r.headers.get("content-encoding") == "gzip") is gzipped
    assert len(r.content) > 0
