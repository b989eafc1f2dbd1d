"""Pixel → lon/lat of every map region (GET /maps/regions/{region}.json) and product fields (/maps/products/…).

The lattice the viewer interpolates is checked against cartopy's own inverse transform of the pixel
centres of a map actually rendered by :class:`serve.render.MapRenderer`.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import cartopy.crs as ccrs
import numpy as np
import pytest
from fastapi.testclient import TestClient

from core.config import MapBox
from serve.app import create_app
from serve.georef import lonlat_at
from serve.products import fallback, products_for
from serve.regions import REGIONS, Region, box_region
from serve.render import MapRenderer
from serve.settings import ServeSettings

BOXES = (MapBox(name="alps", lon_min=2.0, lon_max=18.0, lat_min=42.0, lat_max=50.0),
         MapBox(name="pacific", lon_min=150.0, lon_max=250.0, lat_min=10.0, lat_max=60.0,
                projection="LambertConformal"))
DPI = 40


@pytest.fixture(scope="module")
def box_client(forecasts_dir: Path) -> TestClient:
    """The app with two user boxes configured, one across the dateline."""
    return TestClient(create_app(ServeSettings(forecasts_dir=forecasts_dir, map_boxes=BOXES)))


def _distance_deg(lon1: np.ndarray, lat1: np.ndarray, lon2: np.ndarray, lat2: np.ndarray) -> np.ndarray:
    """Great-circle distance in degrees."""
    p1, p2, dl = np.radians(lat1), np.radians(lat2), np.radians(lon2 - lon1)
    c = np.sin(p1) * np.sin(p2) + np.cos(p1) * np.cos(p2) * np.cos(dl)
    return np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))


def _rendered_pixels(region: Region) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Pixel centres of a rendered map (image fractions) and their lon/lat by cartopy (NaN off the globe)."""
    lat = np.linspace(90, -90, 17)
    lon = np.arange(32) * 11.25
    renderer = MapRenderer(fallback("geopotential_500"), region, lat, lon, DPI, earth=False)
    try:
        renderer.render({"geopotential_500": np.full((17, 32), 5.5e4, np.float32)}, "t")
        w, h = (int(round(v)) for v in renderer.fig.bbox.size)
        bbox = renderer.ax.get_window_extent()
        # Every 3rd pixel centre inside the axes (display coordinates from the bottom-left).
        xs = np.arange(np.ceil(bbox.x0) + 0.5, bbox.x1, 3)
        ys = np.arange(np.ceil(bbox.y0) + 0.5, bbox.y1, 3)
        gx, gy = np.meshgrid(xs, ys)
        data = renderer.ax.transData.inverted().transform(np.column_stack([gx.ravel(), gy.ravel()]))
        crs = renderer.ax.projection
        pts = ccrs.PlateCarree().transform_points(crs, data[:, 0], data[:, 1])
        back = crs.transform_points(ccrs.PlateCarree(), pts[:, 0], pts[:, 1])
        span = max(np.ptp(renderer.ax.get_xlim()), np.ptp(renderer.ax.get_ylim()))
        on = np.isfinite(pts[:, 0]) & (np.hypot(*(back[:, :2] - data).T) < 1e-6 * span)
        plon, plat = np.where(on, pts[:, 0], np.nan), np.where(on, pts[:, 1], np.nan)
        return gx.ravel() / w, 1.0 - gy.ravel() / h, plon, plat, w, h
    finally:
        renderer.close()


def _full_cell(ref: dict, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
    """Whether the lattice cell around each image fraction has all four corners on the globe."""
    left, top, right, bottom = ref["box"]
    cols, rows = ref["columns"], ref["rows"]
    i0 = np.minimum(((fx - left) / (right - left) * (cols - 1)).astype(int), cols - 2)
    j0 = np.minimum(((fy - top) / (bottom - top) * (rows - 1)).astype(int), rows - 2)
    ok = np.array([v is not None for v in ref["lon"]]).reshape(rows, cols)
    return ok[j0, i0] & ok[j0, i0 + 1] & ok[j0 + 1, i0] & ok[j0 + 1, i0 + 1]


def _pixels_of(region: Region, lon: np.ndarray, lat: np.ndarray, w: int, h: int) -> np.ndarray:
    """Display coordinates (pixels from the bottom-left) of lon/lat on the region's rendered map."""
    renderer = MapRenderer(fallback("geopotential_500"), region, np.linspace(90, -90, 17), np.arange(32) * 11.25,
                           DPI, earth=False)
    try:
        assert tuple(int(round(v)) for v in renderer.fig.bbox.size) == (w, h)
        xy = renderer.ax.projection.transform_points(ccrs.PlateCarree(), lon, lat)[:, :2]
        return renderer.ax.transData.transform(xy)
    finally:
        renderer.close()


@pytest.mark.parametrize("name", [*REGIONS, "alps", "pacific"])
def test_lattice_matches_cartopy_on_a_rendered_map(name: str, box_client: TestClient) -> None:
    region = REGIONS[name] if name in REGIONS else box_region(next(b for b in BOXES if b.name == name))
    response = box_client.get(f"/maps/regions/{name}.json")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert "max-age" in response.headers["cache-control"]
    ref = response.json()
    assert ref["region"] == name and len(ref["lon"]) == len(ref["lat"]) == ref["columns"] * ref["rows"]
    fx, fy, lon, lat, w, h = _rendered_pixels(region)
    got = [lonlat_at(ref, x, y) for x, y in zip(fx, fy, strict=True)]
    inside = np.array([g is not None for g in got])
    on = np.isfinite(lon)
    # On the globe exactly where cartopy says so (Robinson: up to a lattice cell at the outline).
    mismatch = inside != on
    assert mismatch.mean() <= (0.02 if region.projection == "Robinson" else 0.0), mismatch.mean()
    both = inside & on
    assert both.sum() > 1000
    glon = np.array([g[0] for g, k in zip(got, both, strict=True) if k])
    glat = np.array([g[1] for g, k in zip(got, both, strict=True) if k])
    # In pixels of the rendered map: the lattice's lon/lat projected back lands within 0.05 px of the pixel
    # centre. Robinson bends its meridians hard towards the pole line, which a 96-cell lattice follows to
    # within a pixel (at 40 dpi), and to within a lattice cell where a cell's corner is off the globe.
    px = np.column_stack([fx[both] * w, (1.0 - fy[both]) * h])
    err = np.hypot(*(_pixels_of(region, glon, glat, w, h) - px).T)
    full = _full_cell(ref, fx[both], fy[both])
    assert full.mean() > 0.95 and err[full].max() < (1.0 if region.projection == "Robinson" else 0.05), err.max()
    cell = (ref["box"][2] - ref["box"][0]) * w / (ref["columns"] - 1)
    assert err.max() < cell, (err.max(), cell)
    # The box is where the renderer's axes are in its PNG.
    left, top, right, bottom = ref["box"]
    assert fx.min() >= left - 1 / w and fx.max() <= right + 1 / w
    assert fy.min() >= top - 1 / h and fy.max() <= bottom + 1 / h


def test_region_answers_head_gzip_and_etag(client: TestClient) -> None:
    plain = client.get("/maps/regions/arctic.json", headers={"Accept-Encoding": "identity"})
    assert plain.status_code == 200 and "content-encoding" not in plain.headers
    packed = client.get("/maps/regions/arctic.json", headers={"Accept-Encoding": "gzip"})
    assert packed.headers["content-encoding"] == "gzip" and packed.json() == plain.json()
    assert int(packed.headers["content-length"]) < len(plain.content) / 2
    head = client.head("/maps/regions/arctic.json", headers={"Accept-Encoding": "identity"})
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(plain.content)) and head.headers["etag"] == plain.headers["etag"]
    again = client.get("/maps/regions/arctic.json", headers={"If-None-Match": plain.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert json.loads(gzip.decompress(gzip.compress(plain.content))) == plain.json()


def test_region_errors(client: TestClient, box_client: TestClient) -> None:
    missing = client.get("/maps/regions/alps.json")  # a box only the other app is configured with
    assert missing.status_code == 404
    detail = missing.json()["detail"]
    assert "'alps'" in detail and all(name in detail for name in REGIONS)
    assert "alps" in box_client.get("/maps/regions/nowhere.json").json()["detail"]
    for bad in ("a%20b", "x" * 65, "..%2Fsecret"):
        response = client.get(f"/maps/regions/{bad}.json")
        assert response.status_code in (404, 422) and "detail" in response.json(), bad
    bad = client.get("/maps/regions/a%20b.json")
    assert bad.status_code == 422 and "region" in bad.json()["detail"]
    assert client.head("/maps/regions/nowhere.json").status_code == 404


def test_product_fields(client: TestClient) -> None:
    wind = client.get("/maps/products/wind500.json").json()
    assert wind["kind"] == "wind"
    assert [p["name"] for p in wind["parameters"]] == ["u_component_of_wind", "v_component_of_wind"]
    assert {p["level"] for p in wind["parameters"]} == {500}
    assert wind["fields"][0]["op"] == "wind" and wind["fields"][0]["units"] == "m s⁻¹"
    both = client.get("/maps/products/z500_t850.json").json()
    table = products_for(["temperature_850", "geopotential_500"], ["z500_t850"])[0]
    t850, z500 = both["fields"]
    assert (t850["label"], t850["units"], t850["offset"]) == ("T850", "°C", table.convert.offset)
    assert (z500["label"], z500["units"]) == ("Z500", "dam")
    assert z500["scale"] == pytest.approx(table.contour_convert.scale)
    mslp = client.get("/maps/products/mslp.json").json()
    assert len(mslp["fields"]) == 1 and mslp["fields"][0]["scale"] == 0.01  # its contour is its own field
    generic = client.get("/maps/products/specific_humidity_700.json").json()
    assert generic["fields"][0]["units"] == "g kg⁻¹" and generic["parameters"][0]["level"] == 700
    for name, kind in (("error_z500_t850", "error"), ("spread_wind500", "spread"), ("prob_t2m_above_0", "probability")):
        derived = client.get(f"/maps/products/{name}.json").json()
        assert derived["kind"] == kind and derived["fields"] == []
    unknown = client.get("/maps/products/no_such_thing.json")
    assert unknown.status_code == 404 and "'no_such_thing'" in unknown.json()["detail"]
    assert client.get("/maps/products/a.b.json").status_code == 422
    assert client.head("/maps/products/wind500.json").status_code == 200
