"""Values under the pointer and meteograms on the regional and polar maps, and for a wind product.

The pointer goes to a known pixel of the shown PNG; the lon/lat the viewer reads there is compared with
cartopy's inverse transform of that pixel on the region's axes (Python side), and the value it shows with
the EDR answer at that point and with xarray's own bilinear value of the forecast.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from typing import Any

import cartopy.crs as ccrs
import numpy as np
import pytest
from matplotlib.figure import Figure

from serve.products import products_for
from serve.regions import REGIONS
from serve.render import map_axes
from tests.browser.conftest import DERIVED, Site, Watched
from tests.browser.test_viewer_browser import hash_of, shows, src
from tests.serve.conftest import make_forecast

pytestmark = pytest.mark.browser
LEAD_INDEX = 2


def image_box(page: Any) -> dict[str, float]:
    """The map image's content box in client pixels."""
    return page.eval_on_selector("#map", "m => { const r = m.getBoundingClientRect(); return {x: r.left + m.clientLeft,"
                                         " y: r.top + m.clientTop, w: m.clientWidth, h: m.clientHeight}; }")


def exact_lonlat(region: str, fx: float, fy: float) -> tuple[float, float]:
    """Lon/lat of image fractions (fx, fy) by cartopy's inverse transform on the region's axes."""
    r = REGIONS[region]
    fig = Figure(figsize=r.figsize, dpi=100)
    ax = map_axes(fig, r)
    w, h = fig.bbox.width, fig.bbox.height
    x, y = ax.transData.inverted().transform([[fx * w, (1.0 - fy) * h]])[0]
    lon, lat = ccrs.PlateCarree().transform_point(x, y, ax.projection)
    return float(lon), float(lat)


def distance_deg(lon1: float, lat1: float, lon2: float, lat2: float) -> float:
    """Great-circle distance in degrees."""
    p1, p2, dl = math.radians(lat1), math.radians(lat2), math.radians(lon2 - lon1)
    c = math.sin(p1) * math.sin(p2) + math.cos(p1) * math.cos(p2) * math.cos(dl)
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


def edr_values(site: Site, run: str, names: list[str], lon: float, lat: float, datetime: str | None) -> dict:
    """The EDR position answer's values per parameter (level 500) at a point."""
    q = {"coords": f"POINT({lon} {lat})", "parameter-name": ",".join(names), "z": "500"}
    if datetime:
        q["datetime"] = datetime
    cov = site.json(f"/collections/{run}/position?{urllib.parse.urlencode(q)}")
    return {n: cov["ranges"][n]["values"] for n in names}


def hover(page: Any, region: str, fx: float, fy: float) -> tuple[dict[str, Any], tuple[float, float]]:
    """Move to a whole client pixel near fractions (fx, fy); the readout's data and that pixel's exact lon/lat."""
    img = image_box(page)
    x, y = round(img["x"] + fx * img["w"]), round(img["y"] + fy * img["h"])
    page.mouse.move(x - 30, y - 30)
    page.mouse.move(x, y, steps=3)
    page.wait_for_function("document.getElementById('readout').dataset.lat !== undefined", timeout=5000)
    data = page.eval_on_selector("#readout", "e => ({...e.dataset, text: e.textContent})")
    exact = exact_lonlat(region, (x - img["x"]) / img["w"], (y - img["y"]) / img["h"])
    # Within a tenth of this map's pixel (one client pixel is the pixel spacing at this size).
    spacing = distance_deg(*exact, *exact_lonlat(region, (x + 1 - img["x"]) / img["w"], (y - img["y"]) / img["h"]))
    assert distance_deg(float(data["lon"]), float(data["lat"]), *exact) <= 0.1 * spacing + 2e-3, (data, exact)
    return data, exact


def bilinear(name: str, lon: float, lat: float) -> float:
    """xarray's own bilinear value of the older run's forecast at the point (level 500, the shown lead)."""
    field = make_forecast()[name].isel(init_time=0, lead_time=LEAD_INDEX).sel(level=500)
    assert lon % 360 <= float(field["longitude"].max())  # inside the grid: no wrap needed
    return float(field.interp(latitude=lat, longitude=lon % 360).values)


@pytest.mark.parametrize(("region", "fx", "fy"), [("europe", 0.55, 0.35), ("arctic", 0.62, 0.28)])
def test_values_on_conic_and_polar_maps(site: Site, desktop: Watched, region: str, fx: float, fy: float) -> None:
    page, older = desktop.page, site.runs[1]
    leads = older["maps"]["geopotential_500"][region]
    page.goto(site.base + "/" + hash_of(older, "geopotential_500", region, leads[LEAD_INDEX]))
    shows(page, src(older, "geopotential_500", region, leads[LEAD_INDEX]))
    data, _ = hover(page, region, fx, fy)
    lon, lat = float(data["lon"]), float(data["lat"])
    valid = site.json(f"/runs/{older['name']}")["valid_times"][LEAD_INDEX]
    raw = edr_values(site, older["name"], ["geopotential"], lon, lat, valid)["geopotential"][0]
    assert raw == pytest.approx(bilinear("geopotential", lon, lat), rel=1e-5)
    dam = products_for(["geopotential_500"], ["geopotential_500"])[0].convert
    assert float(data["value"]) == pytest.approx(raw * dam.scale + dam.offset, rel=1e-6)
    assert data["text"].endswith(" dam") and "Z500 = " in data["text"], data["text"]
    desktop.assert_clean()


def test_wind_speed_direction_and_polar_meteogram(site: Site, desktop: Watched) -> None:
    page, older = desktop.page, site.runs[1]
    region, leads = "arctic", older["maps"]["wind500"]["arctic"]
    page.goto(site.base + "/" + hash_of(older, "wind500", region, leads[LEAD_INDEX]))
    shows(page, src(older, "wind500", region, leads[LEAD_INDEX]))
    data, _ = hover(page, region, 0.3, 0.7)
    lon, lat = float(data["lon"]), float(data["lat"])
    valid = site.json(f"/runs/{older['name']}")["valid_times"][LEAD_INDEX]
    uv = edr_values(site, older["name"], ["u_component_of_wind", "v_component_of_wind"], lon, lat, valid)
    u, v = uv["u_component_of_wind"][0], uv["v_component_of_wind"][0]
    assert u == pytest.approx(bilinear("u_component_of_wind", lon, lat), rel=1e-5, abs=1e-4)
    assert v == pytest.approx(bilinear("v_component_of_wind", lon, lat), rel=1e-5, abs=1e-4)
    assert float(data["value"]) == pytest.approx(math.hypot(u, v), rel=1e-6)
    # Where the wind comes from, clockwise from north: a westerly (u > 0) comes from 270°.
    expected_dir = (270.0 - math.degrees(math.atan2(v, u))) % 360.0
    assert float(data["direction"]) == pytest.approx(expected_dir, abs=1e-6)
    assert f"from {round(expected_dir) % 360}°" in data["text"] and "m s⁻¹" in data["text"], data["text"]

    page.mouse.click(*(lambda b: (round(b["x"] + 0.3 * b["w"]), round(b["y"] + 0.7 * b["h"])))(image_box(page)))
    page.wait_for_selector("#meteogram svg circle.point")
    series = edr_values(site, older["name"], ["u_component_of_wind", "v_component_of_wind"], lon, lat, None)
    speeds = np.hypot(series["u_component_of_wind"], series["v_component_of_wind"])
    tips = page.eval_on_selector_all("#meteogram svg circle.point title", "ts => ts.map(t => t.textContent)")
    assert len(tips) == speeds.size == len(site.json(f"/runs/{older['name']}")["valid_times"])
    shown = [float(t.split(": ")[1].split(" ")[0]) for t in tips]
    assert shown == pytest.approx(speeds.tolist(), abs=0.051)  # formatValue's one decimal at ≥ 10, three below
    assert "wind speed" in page.text_content("#meteogram-title")
    desktop.assert_clean()


def test_outside_the_map_and_derived_products(site: Site, desktop: Watched) -> None:
    page, older = desktop.page, site.runs[1]
    leads = older["maps"][DERIVED]["global"]
    page.goto(site.base + "/" + hash_of(older, DERIVED, "global", leads[0]))
    shows(page, src(older, DERIVED, "global", leads[0]))
    img = image_box(page)
    page.mouse.move(img["x"] + 0.5 * img["w"], img["y"] + 0.4 * img["h"])
    page.wait_for_function("document.getElementById('readout').textContent.includes('forecast products')",
                           timeout=5000)
    page.mouse.click(img["x"] + 0.5 * img["w"], img["y"] + 0.4 * img["h"])
    page.mouse.move(img["x"] + 0.5 * img["w"], img["y"] + 0.9 * img["h"])  # the colorbar, below the map
    page.wait_for_function("document.getElementById('readout').textContent === 'Outside the map.'", timeout=5000)
    assert page.is_hidden("#meteogram-section")
    # The region and product answers the viewer read are the server's own.
    assert json.dumps(site.json("/maps/regions/global.json")["box"]) == "[0.08025, 0.07, 0.91975, 0.8]"
    desktop.assert_clean()
