"""The static viewer: served at / and /viewer, self-contained, wired to the API's URLs, its map geometry true."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from tests.serve.conftest import pixels

# The only absolute URL the assets may hold: the SVG namespace name, an identifier that is never fetched.
SVG_NS = "http://www.w3.org/2000/svg"


def map_urls(entry: dict) -> list[str]:
    """Every map URL the viewer builds for a catalog entry (products × regions × leads, or channels × leads)."""
    if "maps" in entry:
        return [f"/runs/{entry['name']}/maps/{p}/{r}/{lead}.png"
                for p, regions in entry["maps"].items() for r, leads in regions.items() for lead in leads]
    return [f"/runs/{entry['name']}/maps/{c}/{lead}.png" for c in entry["channels"] for lead in entry["lead_hours"]]


def test_viewer_page_has_the_controls(client: TestClient) -> None:
    for url in ("/", "/viewer"):
        response = client.get(url)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        html = response.text
        for element in ('<select id="run"', '<select id="product"', '<select id="region"', '<input id="lead"',
                        'type="range"', '<button id="play"', '<select id="speed"', '<img id="map"',
                        'id="readout"', 'id="meteogram"', 'id="scorecard"', 'id="attribution"',
                        'id="init-time"', 'id="valid-time"', 'id="downloads"', 'name="viewport"'):
            assert element in html, element


def test_viewer_loads_nothing_from_elsewhere(client: TestClient) -> None:
    html = client.get("/viewer").text
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert len(refs) == 5 and all(not re.match(r"^[a-z]+:|^//|^/", ref) for ref in refs), refs
    for ref in refs:
        response = client.get("/" + ref)
        assert response.status_code == 200, ref
        assert set(re.findall(r"https?://[^\s\"'`<>)]+", response.text)) <= {SVG_NS}, ref
    js = "\n".join(client.get("/" + ref).text for ref in refs if ref.endswith(".js"))
    # Every fetch and every URL the scripts build is relative to the page.
    assert re.findall(r"fetch\(([^)]*)\)", js) == ["url"]
    assert set(re.findall(r"`(runs|collections|maps)/", js)) == {"runs", "collections", "maps"}
    assert not re.search(r"`/|\"/(runs|collections|static|maps)", js)


def test_favicon_is_linked_and_served(client: TestClient) -> None:
    html = client.get("/").text
    link = re.search(r'<link rel="icon" type="([^"]+)" href="([^"]+)">', html)
    assert link is not None
    response = client.get("/" + link[2])
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(link[1])
    assert ET.fromstring(response.content).tag == f"{{{SVG_NS}}}svg"
    assert client.head("/" + link[2]).status_code == 200


def test_viewer_map_urls_resolve_for_every_product_region_and_lead(client: TestClient) -> None:
    js = client.get("/static/viewer.js").text
    assert "runs/${e.name}/maps/${" in js and "}.png" in js and "/files/${" in js
    assert "e.maps ? [p, r, lead] : [p, lead]" in js  # the two layouts map_urls mirrors
    for entry in client.get("/runs").json():
        urls = map_urls(entry)
        assert urls
        for url in urls:
            response = client.get(url)
            assert response.status_code == 200 and response.headers["content-type"] == "image/png", url


def test_global_map_geometry_matches_a_rendered_map(client: TestClient, run_dir: Path) -> None:
    """The viewer's lon/lat of a pixel needs the map's box in the PNG: find it in a real map and compare."""
    js = client.get("/static/viewer.js").text
    found = re.search(r"const GLOBAL_MAP = \{ box: (\[[^\]]+\]), extent: (\[[^\]]+\]) \};", js)
    assert found is not None
    box, extent = json.loads(found[1]), json.loads(found[2])
    assert extent == [-180, 180, -90, 90]
    entry = next(e for e in client.get("/runs").json() if e["name"] == run_dir.name)
    # A plain shaded field (a product named as its channel), whose ink stops at the map's frame.
    product = next(p for p in entry.get("maps", entry["channels"]) if p.startswith("geopotential"))
    url = next(u for u in map_urls(entry) if f"/maps/{product}/" in u and ("maps" not in entry or "/global/" in u))
    response = client.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png", url
    ink = (pixels(response.content) < 245).any(axis=2)  # anything not white
    h, w = ink.shape
    row, col = int((box[1] + box[3]) / 2 * h), int((box[0] + box[2]) / 2 * w)

    def span(line: np.ndarray, i: int) -> tuple[int, int]:
        """The run of inked pixels around index i (the map's cells; title and colorbar lie beyond white gaps)."""
        blank = np.flatnonzero(~line)
        return int(blank[blank < i].max(initial=-1)) + 1, int(blank[blank > i].min(initial=line.size))

    left, right = span(ink[row], col)
    top, bottom = span(ink[:, col], row)
    # Within 1.5 px plus the frame's line width.
    assert abs(left - box[0] * w) <= 1.5 and abs(right - box[2] * w) <= 1.5, (left, right, box, w)
    assert abs(top - box[1] * h) <= 1.5 and abs(bottom - box[3] * h) <= 1.5, (top, bottom, box, h)
