"""OGC API-EDR: interpolation weights alone, then position/area answers over HTTP against xarray's own reads."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from covjson_pydantic.coverage import Coverage
from fastapi.testclient import TestClient
from matplotlib.path import Path as MplPath
from scipy.interpolate import RegularGridInterpolator

from core.grid import get_grid
from core.runs import publish, staging_dir, write_manifest
from core.schema import validate_forecast
from core.testing import analysis_dataset
from serve.app import create_app
from serve.interp import bilinear_weights
from serve.settings import ServeSettings
from tests.serve.conftest import INIT, LATER_INIT, PROVENANCE

RUN = "20000101T00"
POS = f"/collections/{RUN}/position"
AREA = f"/collections/{RUN}/area"
COVJSON = "application/prs.coverage+json"


# Interpolation weights alone ----------------------------------------------------------------------


def _padded_interpolator(field: np.ndarray, lat: np.ndarray, lon: np.ndarray) -> RegularGridInterpolator:
    """scipy's bilinear on the field with column 0 repeated at 360°, latitudes ascending."""
    padded = np.concatenate([field, field[:, :1]], axis=1)[::-1]
    return RegularGridInterpolator((lat[::-1], np.append(lon, 360.0)), padded, method="linear")


def test_linear_field_is_reproduced_exactly_away_from_the_wrap() -> None:
    g = get_grid("5.625deg")
    field = 3.0 + 0.25 * g.longitudes[None, :] - 0.5 * g.latitudes[:, None]
    rng = np.random.default_rng(1)
    lat, lon = rng.uniform(-90, 90, 200), rng.uniform(0, 360 - 360 / g.nlon, 200)
    got = bilinear_weights(lat, lon, g.nlat, g.nlon).apply(field)
    np.testing.assert_allclose(got, 3.0 + 0.25 * lon - 0.5 * lat, rtol=0, atol=1e-10)


def test_smooth_field_matches_scipy_on_a_longitude_padded_grid() -> None:
    g = get_grid("tiny")
    la, lo = np.deg2rad(g.latitudes)[:, None], np.deg2rad(g.longitudes)[None, :]
    field = np.cos(la) * np.sin(3 * lo) + np.sin(2 * la) + 0.3 * np.cos(lo)
    rng = np.random.default_rng(2)
    lat = np.concatenate([rng.uniform(-90, 90, 300), [90.0, -90.0, 89.0, -89.5]])
    lon = np.concatenate([rng.uniform(0, 360, 300), [5.0, 355.0, 358.0, 359.99]])
    expected = _padded_interpolator(field, g.latitudes, g.longitudes)(np.stack([lat, lon], axis=1))
    got = bilinear_weights(lat, lon, g.nlat, g.nlon).apply(field)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    # And the same points given as negative longitudes.
    neg = lon > 180
    got_neg = bilinear_weights(lat[neg], lon[neg] - 360, g.nlat, g.nlon).apply(field)
    np.testing.assert_allclose(got_neg, expected[neg], rtol=0, atol=1e-12)


def test_longitude_wraps_between_the_last_column_and_360() -> None:
    g = get_grid("tiny")
    field = np.random.default_rng(3).normal(size=g.shape)
    dlon = 360 / g.nlon
    mid = bilinear_weights(np.array([0.0]), np.array([360 - dlon / 2]), g.nlat, g.nlon).apply(field)
    row = g.nlat // 2  # latitude 0 is a row of the tiny grid
    assert mid[0] == pytest.approx(0.5 * (field[row, -1] + field[row, 0]), abs=1e-12)
    a = bilinear_weights(np.array([12.3]), np.array([-0.1]), g.nlat, g.nlon).apply(field)
    b = bilinear_weights(np.array([12.3]), np.array([359.9]), g.nlat, g.nlon).apply(field)
    assert a[0] == b[0]
    at360 = bilinear_weights(np.array([0.0]), np.array([360.0]), g.nlat, g.nlon).apply(field)
    assert at360[0] == field[row, 0]


def test_poles_and_the_band_next_to_them() -> None:
    g = get_grid("tiny")
    field = np.random.default_rng(4).normal(size=g.shape)
    dlon = 360 / g.nlon
    north = bilinear_weights(np.array([90.0, 90.0]), np.array([3 * dlon, 3.5 * dlon]), g.nlat, g.nlon)
    got = north.apply(field)
    assert got[0] == field[0, 3] and got[1] == pytest.approx(0.5 * (field[0, 3] + field[0, 4]), abs=1e-12)
    south = bilinear_weights(np.array([-90.0]), np.array([2 * dlon]), g.nlat, g.nlon).apply(field)
    assert south[0] == field[-1, 2]
    dlat = 180 / (g.nlat - 1)
    between = bilinear_weights(np.array([-90 + dlat / 4]), np.array([2 * dlon]), g.nlat, g.nlon).apply(field)
    assert between[0] == pytest.approx(0.25 * field[-2, 2] + 0.75 * field[-1, 2], abs=1e-12)


def test_nodes_get_weight_one_and_bad_points_are_refused() -> None:
    g = get_grid("1.5deg")
    w = bilinear_weights(g.latitudes[[0, 7, 60, 120]], g.longitudes[[0, 13, 239, 5]], g.nlat, g.nlon)
    assert np.array_equal(np.sort(w.w, axis=1), np.tile([0.0, 0.0, 0.0, 1.0], (4, 1)))
    for lat, lon in ((90.5, 0.0), (-91.0, 0.0), (0.0, -180.5), (0.0, 360.1), (np.nan, 0.0), (0.0, np.inf)):
        with pytest.raises(ValueError, match="latitude|longitude"):
            bilinear_weights(np.array([lat]), np.array([lon]), g.nlat, g.nlon)


# Answers over HTTP against xarray -----------------------------------------------------------------


@pytest.fixture(scope="module")
def zarr_ds(run_dir: Path) -> xr.Dataset:
    """The published run's forecast.zarr, read by xarray itself."""
    return xr.open_zarr(run_dir / "forecast.zarr", consolidated=False).load()


def _covjson(resp) -> dict:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith(COVJSON)
    Coverage.model_validate_json(resp.content)
    return resp.json()


def test_point_on_a_node_equals_the_stored_values(client: TestClient, zarr_ds: xr.Dataset) -> None:
    lat, lon = float(zarr_ds.latitude[5]), float(zarr_ds.longitude[9])
    cov = _covjson(client.get(POS, params={"coords": f"POINT({lon} {lat})"}))
    assert cov["domain"]["domainType"] == "PointSeries"
    assert cov["domain"]["axes"]["t"]["values"] == [pd.Timestamp(t).strftime("%Y-%m-%dT%H:%M:%SZ")
                                                    for t in zarr_ds.valid_time.values[0]]
    for name in ("geopotential", "u_component_of_wind", "v_component_of_wind"):
        expected = zarr_ds[name].sel(latitude=lat, longitude=lon, level=500).isel(init_time=0).values
        assert cov["ranges"][name]["values"] == [float(v) for v in expected]


def _neighbours(ds: xr.Dataset, name: str, lat: float, lon: float) -> np.ndarray:
    """Bilinear by hand from the four surrounding nodes read with xarray (lon in [0, 360))."""
    lats, lons = ds.latitude.values, ds.longitude.values
    i = int(np.flatnonzero(lats >= lat)[-1])
    j = int(np.flatnonzero(lons <= lon)[-1])
    j1 = (j + 1) % lons.size
    fy = (lats[i] - lat) / (lats[i] - lats[i + 1])
    fx = (lon - lons[j]) / (lons[1] - lons[0])
    da = ds[name].isel(init_time=0).sel(level=500).astype(np.float64)
    corner = {(a, b): da.isel(latitude=a, longitude=b).values for a in (i, i + 1) for b in (j, j1)}
    return ((1 - fy) * (1 - fx) * corner[i, j] + (1 - fy) * fx * corner[i, j1]
            + fy * (1 - fx) * corner[i + 1, j] + fy * fx * corner[i + 1, j1])


@pytest.mark.parametrize(("lat", "lon"), [(33.3, 47.1), (-80.0, 355.0), (86.0, 200.5), (-12.0, -3.0)])
def test_point_off_node_is_bilinear_of_its_four_neighbours(client: TestClient, zarr_ds: xr.Dataset,
                                                           lat: float, lon: float) -> None:
    cov = _covjson(client.get(POS, params={"coords": f"POINT({lon} {lat})", "parameter-name": "geopotential"}))
    expected = _neighbours(zarr_ds, "geopotential", lat, lon % 360)
    np.testing.assert_allclose(cov["ranges"]["geopotential"]["values"], expected, rtol=1e-12)
    assert cov["domain"]["axes"]["x"]["values"] == [lon]


def test_datetime_forms_select_valid_times(client: TestClient, zarr_ds: xr.Dataset) -> None:
    valid = [pd.Timestamp(t) for t in zarr_ds.valid_time.values[0]]
    cases = {valid[2].isoformat(): valid[2:3], f"{valid[1].isoformat()}Z/{valid[3].isoformat()}Z": valid[1:4],
             f"../{valid[1].isoformat()}": valid[:2], f"{valid[3].isoformat()}/..": valid[3:],
             "2000-01-01T05:00/2000-01-01T13:00": valid[1:3]}
    for text, want in cases.items():
        cov = _covjson(client.get(POS, params={"coords": "POINT(10 10)", "datetime": text}))
        got = [pd.Timestamp(t).tz_localize(None) for t in cov["domain"]["axes"]["t"]["values"]]
        assert got == want, text


def _csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_csv_equals_coveragejson_for_a_point(client: TestClient) -> None:
    params = {"coords": "POINT(-170.3 -44.4)", "datetime": "2000-01-01T06/.."}
    cov = _covjson(client.get(POS, params=params))
    resp = client.get(POS, params={**params, "f": "CSV"})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/csv")
    rows = _csv_rows(resp.text)
    assert [r["datetime"] for r in rows] == cov["domain"]["axes"]["t"]["values"]
    for name, rng in cov["ranges"].items():
        assert [float(r[name]) for r in rows] == rng["values"]
    assert {r["z"] for r in rows} == {"500"} and {r["longitude"] for r in rows} == {"-170.3"}


def _inside(ring: list[tuple[float, float]], lons: np.ndarray, lats: np.ndarray) -> np.ndarray:
    """matplotlib's point-in-polygon on the grid points, in the polygon's longitude frame."""
    west = min(p[0] for p in ring)
    frame = west + np.mod(lons - west, 360)
    xx, yy = np.meshgrid(frame, lats)
    return MplPath(ring).contains_points(np.stack([xx.ravel(), yy.ravel()], axis=1)).reshape(xx.shape), frame


@pytest.mark.parametrize("ring", [
    [(-30.5, -20.1), (40.2, -25.3), (60.7, 50.9), (-10.4, 70.2), (-30.5, -20.1)],  # across 0° as −30 … 60
    [(160.3, 10.2), (200.9, 14.1), (190.2, 60.3), (160.3, 10.2)],  # across the dateline as 160 … 200
    [(100.1, -88.0), (300.3, -88.0), (300.3, -40.4), (100.1, -40.4), (100.1, -88.0)],
])
def test_area_equals_xarray_at_the_inside_points(client: TestClient, zarr_ds: xr.Dataset, ring: list) -> None:
    wkt = "POLYGON((" + ", ".join(f"{x} {y}" for x, y in ring) + "))"
    params = {"coords": wkt, "parameter-name": "geopotential,v_component_of_wind", "datetime": "2000-01-01T12"}
    cov = _covjson(client.get(AREA, params=params))
    assert cov["domain"]["domainType"] == "Grid"
    mask, frame = _inside(ring, zarr_ds.longitude.values, zarr_ds.latitude.values)
    assert mask.sum() > 3
    xs, ys = np.array(cov["domain"]["axes"]["x"]["values"]), np.array(cov["domain"]["axes"]["y"]["values"])
    got_points = set()
    for name in ("geopotential", "v_component_of_wind"):
        rng = cov["ranges"][name]
        values = np.array(rng["values"], dtype=float).reshape(rng["shape"])[0, 0]
        field = zarr_ds[name].isel(init_time=0).sel(level=500, lead_time=pd.Timedelta(hours=12)).values
        for iy, lat in enumerate(ys):
            for ix, x in enumerate(xs):
                col = int(np.flatnonzero(np.isclose(frame, x))[0])
                row = int(np.flatnonzero(zarr_ds.latitude.values == lat)[0])
                if mask[row, col]:
                    assert values[iy, ix] == float(field[row, col])
                    got_points.add((row, col))
                else:
                    assert np.isnan(values[iy, ix])
    assert got_points == set(zip(*np.nonzero(mask), strict=True))
    rows = _csv_rows(client.get(AREA, params={**params, "f": "CSV"}).text)
    assert len(rows) == mask.sum()
    flat = {(float(r["latitude"]), float(r["longitude"])): float(r["geopotential"]) for r in rows}
    values = np.array(cov["ranges"]["geopotential"]["values"], dtype=float).reshape(ys.size, xs.size)
    assert flat == {(lat, x): values[iy, ix] for iy, lat in enumerate(ys) for ix, x in enumerate(xs)
                    if not np.isnan(values[iy, ix])}


def test_collections_are_edr_metadata_newest_first(client: TestClient) -> None:
    body = client.get("/collections").json()
    assert [c["id"] for c in body["collections"]] == ["20000101T06", RUN]
    assert {link["rel"] for link in body["links"]} == {"self", "alternate"}
    col = client.get(f"/collections/{RUN}").json()
    for key in ("id", "links", "extent", "parameter_names", "data_queries", "crs", "output_formats"):
        assert key in col
    assert col["extent"]["spatial"]["bbox"] == [[-180.0, -90.0, 180.0, 90.0]]
    assert col["extent"]["temporal"]["values"][0] == "2000-01-01T00:00:00Z" and len(col["extent"]["temporal"]["values"]) == 5
    assert col["extent"]["vertical"]["values"] == ["500"]
    assert col["parameter_names"]["geopotential"]["unit"]["symbol"]["value"] == "m**2 s**-2"
    assert set(col["data_queries"]) == {"position", "area"} and col["crs"] == ["CRS84"]
    assert col["output_formats"] == ["CoverageJSON", "CSV"]
    assert client.head(f"/collections/{RUN}").status_code == 200
    assert client.head(POS, params={"coords": "POINT(1 1)"}).status_code == 200
    assert client.get(POS, params={"coords": "POINT(1 1)", "member": "0"}).status_code == 200
    assert client.get(POS, params={"coords": "POINT(1 1)", "member": "1"}).status_code == 404  # not an ensemble
    assert client.get("/collections/20000109T00").status_code == 404
    assert client.get("/collections/2000010T00").status_code == 422
    assert LATER_INIT and INIT  # the two fixture runs listed above


@pytest.mark.parametrize(("path", "params", "names"), [
    (POS, {"coords": "POINT(0 90.5)"}, "latitude"),
    (POS, {"coords": "POINT(nan 1)"}, "coords"),
    (POS, {"coords": "POINT(-181 1)"}, "longitude"),
    (POS, {"coords": "POINT(1)"}, "coords"),
    (POS, {}, "coords"),
    (POS, {"coords": "POINT(0 1)", "parameter-name": "geopotential,t2m"}, "parameter-name"),
    (POS, {"coords": "POINT(0 1)", "z": "850"}, "z"),
    (POS, {"coords": "POINT(0 1)", "z": "x"}, "z"),
    (POS, {"coords": "POINT(0 1)", "z": "500/nan"}, "z"),
    (POS, {"coords": "POINT(1e999 1)"}, "longitude"),
    (POS, {"coords": "POINT(0 1)", "f": "GeoJSON"}, "f"),
    (POS, {"coords": "POINT(0 1)", "bbox": "0,0,1,1"}, "bbox"),
    (POS, {"coords": "POINT(0 1)", "crs": "EPSG:3857"}, "crs"),
    (POS, {"coords": "POINT(0 1)", "member": "-1"}, "member"),
    (POS, {"coords": "POINT(0 1)", "f": "csv"}, "'f'"),
    (POS, {"coords": "POINT(0 1)", "datetime": ""}, "datetime"),
    (POS, {"coords": "POINT(0 1)", "datetime": "2000-01-01T03"}, "datetime"),
    (POS, {"coords": "POINT(0 1)", "datetime": "2001-01-01/.."}, "datetime"),
    (POS, {"coords": "POINT(0 1)", "datetime": "yesterday"}, "datetime"),
    (AREA, {"coords": "POLYGON((0 0, 10 0, 10 10, 0 1))"}, "close"),
    (AREA, {"coords": "POLYGON((0 0, 10 0, 0 0))"}, "4 positions"),
    (AREA, {"coords": "POLYGON((0 0, 10 0, 10 10, 0 0)"}, "coords"),
    (AREA, {"coords": "POLYGON((0 0, 10 x, 10 10, 0 0))"}, "coords"),
    (AREA, {"coords": "POLYGON((0 0, 10 0, 10 95, 0 0))"}, "latitude"),
    (AREA, {"coords": "POLYGON((-180 0, 200 0, 10 10, -180 0))"}, "360"),
])
def test_bad_input_is_422_naming_the_parameter(client: TestClient, path: str, params: dict, names: str) -> None:
    resp = client.get(path, params=params)
    assert resp.status_code == 422, resp.text
    assert names in resp.json()["detail"]


def test_area_over_the_cap_is_413_with_the_estimate(forecasts_dir: Path) -> None:
    small = TestClient(create_app(ServeSettings(forecasts_dir=forecasts_dir, area_max_points=50)))
    resp = small.get(AREA, params={"coords": "POLYGON((0 0, 40 0, 40 40, 0 0))", "parameter-name": "geopotential"})
    assert resp.status_code == 413
    # Bounding box 0 … 40°: 4 rows × 4 columns (0, 11.25, 22.5, 33.75) × 1 parameter × 5 times × 1 level.
    assert "80 values" in resp.json()["detail"] and "coords" in resp.json()["detail"]
    assert small.get(AREA, params={"coords": "POLYGON((0 0, 20 0, 20 20, 0 0))", "parameter-name": "geopotential",
                                   "datetime": "2000-01-01T00"}).status_code == 200


# A run with two levels, a single-level variable and members ----------------------------------------


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory: pytest.TempPathFactory) -> tuple[TestClient, xr.Dataset]:
    """A published ensemble run (2 members, levels 500 and 850, temperature and 2m_temperature): zarr + manifest."""
    a = analysis_dataset(grid="tiny", start="2001-02-03T00", periods=3, levels=(500, 850),
                         variables=("temperature", "2m_temperature")).drop_vars(["done", "expver"])
    lead = a["time"].values - a["time"].values[0]
    ds = a.rename(time="lead_time").assign_coords(lead_time=lead)
    ds = xr.concat([ds, ds + np.float32(1.5)], dim=pd.Index(np.arange(2, dtype=np.int32), name="member"))
    ds = ds.expand_dims(init_time=[np.datetime64("2001-02-03T00", "ns")])
    ds = ds.transpose("init_time", "lead_time", "member", ...)
    ds = ds.assign_coords(valid_time=(("init_time", "lead_time"), ds["init_time"].values[:, None] + lead[None, :]))
    for name in ds.data_vars:
        ds[name].attrs = a[name].attrs
    validate_forecast(ds)
    forecasts = tmp_path_factory.mktemp("edr") / "forecasts"
    tmp = staging_dir(forecasts, "20010203T00")
    ds.to_zarr(tmp / "forecast.zarr", zarr_format=3, consolidated=False)
    write_manifest(tmp, pd.Timestamp("2001-02-03"), provenance=PROVENANCE)
    publish(tmp, forecasts / "20010203T00")
    return TestClient(create_app(ServeSettings(forecasts_dir=forecasts))), ds


def test_levels_members_and_single_level_parameters(ensemble: tuple[TestClient, xr.Dataset]) -> None:
    client, ds = ensemble
    pos = "/collections/20010203T00/position"
    lat, lon = float(ds.latitude[3]), float(ds.longitude[4])
    cov = _covjson(client.get(pos, params={"coords": f"POINT({lon} {lat})", "parameter-name": "temperature",
                                           "datetime": "2001-02-03T06", "member": "1"}))
    assert cov["domain"]["domainType"] == "VerticalProfile" and cov["domain"]["axes"]["z"]["values"] == [500, 850]
    want = ds["temperature"].sel(member=1, latitude=lat, longitude=lon).isel(init_time=0, lead_time=1).values
    assert cov["ranges"]["temperature"]["values"] == [float(v) for v in want]
    cov = _covjson(client.get(pos, params={"coords": f"POINT({lon} {lat})", "parameter-name": "temperature",
                                           "z": "850"}))
    want = ds["temperature"].sel(member=0, latitude=lat, longitude=lon, level=850).isel(init_time=0).values
    assert cov["domain"]["domainType"] == "PointSeries" and cov["ranges"]["temperature"]["values"] == [float(v) for v in want]
    both = _covjson(client.get(pos, params={"coords": f"POINT({lon} {lat})", "parameter-name": "temperature"}))
    assert "domainType" not in both["domain"] and both["ranges"]["temperature"]["shape"] == [3, 2, 1, 1]
    single = _covjson(client.get(pos, params={"coords": f"POINT({lon} {lat})", "parameter-name": "2m_temperature"}))
    assert "z" not in single["domain"]["axes"] and single["ranges"]["2m_temperature"]["axisNames"] == ["t", "y", "x"]
    want = ds["2m_temperature"].sel(member=0, latitude=lat, longitude=lon).isel(init_time=0).values
    assert single["ranges"]["2m_temperature"]["values"] == [float(v) for v in want]
    for params, name in (({"parameter-name": "temperature,2m_temperature"}, "parameter-name"),
                         ({"parameter-name": "2m_temperature", "z": "500"}, "z"),
                         ({}, "parameter-name"),
                         ({"parameter-name": "temperature", "z": "100/200"}, "z")):
        resp = client.get(pos, params={"coords": "POINT(1 1)", **params})
        assert resp.status_code == 422 and name in resp.json()["detail"], resp.text
    resp = client.get(pos, params={"coords": "POINT(1 1)", "parameter-name": "temperature", "member": "2"})
    assert resp.status_code == 404 and "member 2" in resp.json()["detail"]
    col = client.get("/collections/20010203T00").json()
    assert col["extent"]["vertical"]["values"] == ["500", "850"]
    assert "extent" in col["parameter_names"]["temperature"] and "extent" not in col["parameter_names"]["2m_temperature"]
