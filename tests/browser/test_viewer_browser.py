"""The viewer in a real browser against a real server: controls, playback, values, meteogram, URL, phone.

Works with either map layout the catalog may describe: ``maps: {product: {region: [leads]}}`` or the older
``channels`` × ``lead_hours``; each test reads the run entry and uses what exists.
"""

from __future__ import annotations

import urllib.request
from typing import Any

import numpy as np
import pytest

from serve.products import products_for
from tests.browser.conftest import Site, Watched
from tests.serve.conftest import make_forecast

pytestmark = pytest.mark.browser


def layout(entry: dict[str, Any]) -> dict[str, dict[str | None, list[int]]]:
    """Product → region (None in the older layout) → lead hours."""
    if "maps" in entry:
        return {p: dict(regions) for p, regions in entry["maps"].items()}
    return {c: {None: list(entry["lead_hours"])} for c in entry["channels"]}


def src(entry: dict[str, Any], product: str, region: str | None, lead: int) -> str:
    """The map URL the viewer must show for a choice."""
    parts = [product, region, lead] if region is not None else [product, lead]
    return f"runs/{entry['name']}/maps/" + "/".join(str(p) for p in parts) + ".png"


def default_region(regions: dict[str | None, list[int]]) -> str | None:
    """The region the viewer opens with: global where offered."""
    return "global" if "global" in regions else next(iter(regions))


def shows(page: Any, url: str) -> None:
    """Wait until the map is ``url`` and has loaded with real pixels."""
    page.wait_for_function("u => { const m = document.getElementById('map');"
                           " return m.getAttribute('src') === u && m.complete && m.naturalWidth > 0; }",
                           arg=url, timeout=5000)


def hash_of(entry: dict[str, Any], product: str, region: str | None, lead: int) -> str:
    """The URL fragment of a view."""
    return f"#run={entry['name']}&product={product}" + (f"&region={region}" if region else "") + f"&lead={lead}"


def test_switch_product_region_lead_run_and_play(site: Site, desktop: Watched) -> None:
    page, newest, older = desktop.page, site.runs[0], site.runs[1]
    page.goto(site.base + "/")
    maps = layout(newest)
    products = list(maps)
    p0, p1 = products[0], products[1]
    r0 = default_region(maps[p0])
    leads = maps[p0][r0]
    shows(page, src(newest, p0, r0, leads[0]))
    assert page.input_value("#run") == newest["name"]  # newest first

    page.select_option("#product", p1)
    shows(page, src(newest, p1, default_region(maps[p1]), maps[p1][default_region(maps[p1])][0]))
    page.select_option("#product", p0)
    if r0 is None:
        assert page.is_hidden("#region")
    else:
        assert page.is_visible("#region") and page.input_value("#region") == r0
        other = [r for r in maps[p0] if r != r0]
        if other:
            page.select_option("#region", other[0])
            shows(page, src(newest, p0, other[0], maps[p0][other[0]][0]))
            page.select_option("#region", r0)
    shows(page, src(newest, p0, r0, leads[0]))
    # The product's animations over the region, where the run publishes them; each link answers.
    formats = (newest.get("animations") or {}).get(p0, {}).get(r0, [])
    hrefs = page.eval_on_selector_all("#animation-links a", "as => as.map(a => a.getAttribute('href'))")
    assert hrefs == [f"runs/{newest['name']}/files/maps/{p0}/{r0}/animation.{f}" for f in formats]
    assert page.is_visible("#animations") == bool(formats)
    for href in hrefs:
        with urllib.request.urlopen(f"{site.base}/{href}", timeout=10) as response:
            assert response.status == 200 and int(response.headers["content-length"]) > 0

    page.evaluate("document.activeElement.blur()")
    page.keyboard.press("ArrowRight")
    shows(page, src(newest, p0, r0, leads[1]))
    assert page.text_content("#lead-label") == f"+{leads[1]} h"
    page.keyboard.press("ArrowLeft")
    shows(page, src(newest, p0, r0, leads[0]))
    page.eval_on_selector("#lead", "(e, i) => { e.value = i; e.dispatchEvent(new Event('input')); "
                                   "e.dispatchEvent(new Event('change')); }", len(leads) - 1)
    shows(page, src(newest, p0, r0, leads[-1]))

    page.select_option("#run", older["name"])  # product, region and lead kept where the run has them
    older_leads = layout(older)[p0][r0]
    shows(page, src(older, p0, r0, leads[-1] if leads[-1] in older_leads else older_leads[0]))

    # Playing advances the lead frame by frame; pausing stops it.
    page.select_option("#speed", "175")
    seen = {page.text_content("#lead-label")}
    page.click("#play")
    assert page.text_content("#play") == "Pause"
    for _ in range(2):
        page.wait_for_function("s => !s.includes(document.getElementById('lead-label').textContent)",
                               arg=list(seen), timeout=3000)
        seen.add(page.text_content("#lead-label"))
    page.click("#play")
    assert page.text_content("#play") == "Play"
    stopped = page.text_content("#lead-label")
    page.wait_for_timeout(800)  # more than four frames at this speed
    assert page.text_content("#lead-label") == stopped and len(seen) >= 3
    page.evaluate("document.activeElement.blur()")
    page.keyboard.press(" ")
    assert page.text_content("#play") == "Pause"
    page.keyboard.press(" ")
    assert page.text_content("#play") == "Play"
    page.wait_for_function("document.getElementById('map').complete")
    desktop.assert_clean()


def _mappable(site: Site, entry: dict[str, Any]) -> tuple[str, str, int | None]:
    """A product of the run that is one variable (at one level), with that variable and level."""
    variables = site.json(f"/runs/{entry['name']}")["variables"]
    for product in layout(entry):
        for v in variables:
            if product == v["name"] and not v["levels"]:
                return product, v["name"], None
            level = product.removeprefix(v["name"] + "_")
            if level.isdigit() and int(level) in (v["levels"] or []):
                return product, v["name"], int(level)
    raise AssertionError(f"no product of {entry['name']} is a variable of the run: {list(layout(entry))}")


def test_pointer_value_and_meteogram(site: Site, desktop: Watched) -> None:
    page, older = desktop.page, site.runs[1]
    product, name, level = _mappable(site, older)
    region = default_region(layout(older)[product])
    assert region in (None, "global"), "this test reads the global map's linear layout"
    leads = layout(older)[product][region]
    page.goto(site.base + "/" + hash_of(older, product, region, leads[2]))
    shows(page, src(older, product, region, leads[2]))

    box = page.evaluate("GLOBAL_MAP.box")
    img = page.eval_on_selector("#map", "m => { const r = m.getBoundingClientRect(); return {x: r.left + m.clientLeft,"
                                        " y: r.top + m.clientTop, w: m.clientWidth, h: m.clientHeight}; }")
    lon, lat = -60.0, -20.0
    x = img["x"] + (box[0] + (lon + 180) / 360 * (box[2] - box[0])) * img["w"]
    y = img["y"] + (box[1] + (90 - lat) / 180 * (box[3] - box[1])) * img["h"]
    page.mouse.move(x - 20, y - 20)
    page.mouse.move(x, y, steps=4)
    page.wait_for_function("document.getElementById('readout').dataset.value !== undefined", timeout=5000)
    data = page.eval_on_selector("#readout", "e => ({...e.dataset, text: e.textContent})")
    got_lon, got_lat, value = float(data["lon"]), float(data["lat"]), float(data["value"])
    # The pointer's lon/lat is right to within one pixel of the map.
    assert abs(got_lon - lon) <= 360 / ((box[2] - box[0]) * img["w"]) + 0.01
    assert abs(got_lat - lat) <= 180 / ((box[3] - box[1]) * img["h"]) + 0.01
    # The value is the bilinear value of the forecast at that point, computed here by xarray.
    field = make_forecast()[name].isel(init_time=0, lead_time=2)
    if level is not None:
        field = field.sel(level=level)
    expected = float(field.interp(latitude=got_lat, longitude=got_lon % 360).values)
    # Shown in the map's display units: the product's own conversion of the stored value.
    convert = products_for([product], [product])[0].convert
    assert value == pytest.approx(expected * convert.scale + convert.offset, rel=1e-5, abs=1e-3)
    pretty = convert.units
    assert data["text"].endswith(pretty) and "°S" in data["text"] and "°W" in data["text"], data["text"]

    page.mouse.click(x, y)
    page.wait_for_selector("#meteogram svg circle.point")
    valid_times = site.json(f"/runs/{older['name']}")["valid_times"]
    dots = page.eval_on_selector_all("#meteogram svg circle.point", "cs => cs.map(c => Number(c.dataset.lead))")
    hours = make_forecast()["lead_time"].values / np.timedelta64(1, "h")
    assert len(dots) == len(valid_times) == hours.size and dots == hours.tolist()
    texts = page.eval_on_selector_all("#meteogram svg text", "ts => ts.map(t => t.textContent)")
    assert any(t.startswith("lead time (h)") for t in texts) and pretty in texts
    desktop.assert_clean()


def test_scorecard_and_attribution(site: Site, desktop: Watched) -> None:
    page, newest, older = desktop.page, site.runs[0], site.runs[1]
    page.goto(site.base + f"/#run={older['name']}")
    page.wait_for_selector("#scorecard tr")
    assert "Synthetic shallow-water planet" in page.text_content("#attribution strong")
    scores = site.json(f"/runs/{older['name']}")["scores"]
    rows = page.eval_on_selector_all("#scorecard tr", "rs => rs.map(r => r.children.length)")
    hours = {h for s in scores["channels"].values() for h in s["lead_hours"]}
    assert rows == [1 + len(hours)] * (1 + len(scores["channels"]))
    page.select_option("#run", newest["name"])  # never scored, no recorded source
    page.wait_for_selector("#scorecard-section", state="hidden")
    page.wait_for_function("document.getElementById('attribution').textContent.includes('not recorded')")
    desktop.assert_clean()


def test_url_follows_the_view_both_ways(site: Site, desktop: Watched) -> None:
    page, older = desktop.page, site.runs[1]
    maps = layout(older)
    p0, p1 = list(maps)[:2]
    r0, r1 = default_region(maps[p0]), default_region(maps[p1])
    l0, l1 = maps[p0][r0], maps[p1][r1]
    page.goto(site.base + "/" + hash_of(older, p1, r1, l1[2]))  # a deep link
    shows(page, src(older, p1, r1, l1[2]))
    assert page.input_value("#product") == p1 and page.text_content("#lead-label") == f"+{l1[2]} h"

    page.evaluate("window.sameDocument = true")
    page.goto(site.base + "/" + hash_of(older, p0, r0, l0[1]))  # the address bar edited
    shows(page, src(older, p0, r0, l0[1]))
    assert page.evaluate("window.sameDocument") is True

    page.select_option("#product", p1)  # user changes become history entries
    shows(page, src(older, p1, r1, l0[1]))
    assert f"product={p1}" in page.url
    page.evaluate("document.activeElement.blur()")
    page.keyboard.press("ArrowRight")
    shows(page, src(older, p1, r1, l1[l1.index(l0[1]) + 1]))
    page.go_back()
    shows(page, src(older, p1, r1, l0[1]))
    page.go_back()
    shows(page, src(older, p0, r0, l0[1]))
    page.go_forward()
    shows(page, src(older, p1, r1, l0[1]))

    # A new document: let the old one finish its requests first (its late favicon fetch would be aborted).
    page.wait_for_load_state("networkidle")
    page.goto(site.base + f"/?run={older['name']}&channel={p0}&lead={l0[3]}")  # query string, older key
    shows(page, src(older, p0, r0, l0[3]))
    assert f"#run={older['name']}&product={p0}" in page.url
    desktop.assert_clean()


def test_phone_layout(site: Site, phone: Watched) -> None:
    page = phone.page
    page.goto(site.base + "/")
    newest = site.runs[0]
    maps = layout(newest)
    p0 = next(iter(maps))
    shows(page, src(newest, p0, default_region(maps[p0]), maps[p0][default_region(maps[p0])][0]))
    title = page.locator("#title")
    assert title.is_visible()
    box = title.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390
    assert float(title.evaluate("e => parseFloat(getComputedStyle(e).fontSize)")) >= 18
    assert page.evaluate("document.documentElement.scrollWidth") <= page.evaluate("window.innerWidth") == 390
    # One column: every visible label starts at the same x, and each control sits below its label.
    lefts = page.eval_on_selector_all("#controls label", "ls => ls.filter(l => l.offsetParent)"
                                                         ".map(l => Math.round(l.getBoundingClientRect().left))")
    assert len(lefts) >= 4 and len(set(lefts)) == 1
    map_box = page.locator("#map").bounding_box()
    assert map_box["width"] <= 390 and map_box["height"] > 100
    page.wait_for_selector("#scorecard-section", state="hidden")  # the newest run is not scored
    phone.assert_clean()
