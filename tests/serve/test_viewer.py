"""The static viewer: served at / and /viewer, self-contained, wired to the API's URLs."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient


def test_viewer_page_has_the_controls(client: TestClient) -> None:
    for url in ("/", "/viewer"):
        response = client.get(url)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        html = response.text
        for element in ('<select id="run"', '<select id="channel"', '<input id="lead"', 'type="range"',
                        '<img id="map"', 'id="init-time"', 'id="valid-time"', 'id="downloads"'):
            assert element in html, element


def test_viewer_loads_nothing_from_elsewhere(client: TestClient) -> None:
    html = client.get("/viewer").text
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(not re.match(r"^[a-z]+:|^//", ref) for ref in refs), refs
    for ref in refs:
        response = client.get("/" + ref)
        assert response.status_code == 200, ref
        assert "http://" not in response.text and "https://" not in response.text


def test_viewer_script_uses_the_api_routes(client: TestClient) -> None:
    js = client.get("/static/viewer.js")
    assert js.status_code == 200
    assert "javascript" in js.headers["content-type"]
    assert 'fetch("runs")' in js.text
    assert "/maps/${" in js.text and "}.png" in js.text
    assert "/files/${" in js.text
    entry = client.get("/runs/latest").json()
    # The image URL pattern the script builds resolves for every channel and lead of a run.
    for channel in entry["channels"]:
        for lead in entry["lead_hours"]:
            assert client.get(f"/runs/{entry['name']}/maps/{channel}/{lead}.png").status_code == 200
