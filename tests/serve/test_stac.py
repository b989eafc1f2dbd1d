"""The STAC catalog over HTTP: a pystac crawl finds every published run, the JSON round-trips through
pystac and passes the STAC core JSON schemas pystac ships (offline), and every asset downloads with the
size and sha256 its ``file:size`` / ``file:checksum`` state."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pandas as pd
import pystac
import pytest
from fastapi.testclient import TestClient
from pystac.validation.stac_validator import JsonSchemaSTACValidator

from core.runs import list_runs, read_manifest
from serve.app import create_app
from serve.settings import ServeSettings

BASE = "http://testserver"


class ClientIO(pystac.StacIO):
    """pystac reading through the in-process HTTP client, as a crawler reads a STAC server."""

    def __init__(self, client: TestClient) -> None:
        super().__init__()
        self.client = client
        self.read: list[str] = []

    def read_text(self, source: Any, *args: Any, **kwargs: Any) -> str:
        """GET one STAC document; anything but 200 fails the crawl."""
        href = str(source)
        response = self.client.get(href)
        assert response.status_code == 200, (href, response.text)
        self.read.append(href)
        return response.text

    def write_text(self, dest: Any, txt: str, *args: Any, **kwargs: Any) -> None:
        """A crawler never writes."""
        raise AssertionError(f"the crawl tried to write {dest}")


def _crawl(client: TestClient, base: str = BASE) -> tuple[pystac.Catalog, list[pystac.Item], ClientIO]:
    io = ClientIO(client)
    root = pystac.Catalog.from_file(f"{base}/stac/catalog.json", stac_io=io)
    return root, list(root.get_items(recursive=True)), io


def test_a_crawl_from_the_root_finds_every_published_run(client: TestClient, forecasts_dir: Path) -> None:
    root, items, io = _crawl(client)
    published = list_runs(forecasts_dir)
    assert sorted(i.id for i in items) == published == ["20000101T00", "20000101T06"]
    collections = list(root.get_collections())
    assert [c.id for c in collections] == ["spherecast-forecasts"]
    extent = collections[0].extent.temporal.intervals[0]
    assert extent == [pd.Timestamp("2000-01-01T00", tz="UTC"), pd.Timestamp("2000-01-02T00", tz="UTC")]
    assert all(href.startswith(f"{BASE}/stac/") for href in io.read)  # every link was absolute


def test_items_carry_times_forecast_fields_and_the_global_footprint(client: TestClient) -> None:
    _, items, _ = _crawl(client)
    item = next(i for i in items if i.id == "20000101T06")
    assert item.datetime == pd.Timestamp("2000-01-01T06", tz="UTC")
    assert item.common_metadata.start_datetime == pd.Timestamp("2000-01-01T06", tz="UTC")
    assert item.common_metadata.end_datetime == pd.Timestamp("2000-01-01T18", tz="UTC")  # 3 leads: +12 h
    assert item.properties["forecast:reference_datetime"] == "2000-01-01T06:00:00Z"
    assert item.properties["forecast:horizon"] == "PT12H"
    assert item.bbox == [-180.0, -90.0, 180.0, 90.0] and item.geometry["type"] == "Polygon"
    assert item.collection_id == "spherecast-forecasts"
    assert {a.roles[0] for a in item.assets.values()} == {"data", "metadata", "thumbnail"}


def test_stac_json_round_trips_and_passes_the_core_schemas(client: TestClient) -> None:
    validator = JsonSchemaSTACValidator()  # its core schemas ship with pystac: no network
    for url, cls, kind in [("/stac/catalog.json", pystac.Catalog, pystac.STACObjectType.CATALOG),
                           ("/stac/collections/forecasts.json", pystac.Collection, pystac.STACObjectType.COLLECTION),
                           ("/stac/items/20000101T00.json", pystac.Item, pystac.STACObjectType.ITEM)]:
        body = client.get(url).json()
        assert cls.from_dict(body).to_dict(include_self_link=True, transform_hrefs=False) == body, url
        validator.validate_core(body, kind, body["stac_version"])
        assert all(link["href"].startswith(f"{BASE}/") for link in body["links"]), url


def test_assets_download_with_the_size_and_checksum_they_state(client: TestClient, forecasts_dir: Path) -> None:
    _, items, _ = _crawl(client)
    checked = 0
    for item in items:
        manifest = read_manifest(forecasts_dir / item.id)
        for key, asset in item.assets.items():
            if key == "forecast.zarr":  # a store root: its metadata document is <href>/zarr.json
                meta = client.get(f"{asset.href}/zarr.json")
                assert meta.status_code == 200 and meta.json()["node_type"] == "group"
                assert asset.media_type == "application/vnd.zarr; version=3"
                continue
            response = client.get(asset.href)
            assert response.status_code == 200, asset.href
            assert response.headers["content-type"].startswith(asset.media_type)
            assert len(response.content) == asset.extra_fields["file:size"]
            assert asset.extra_fields["file:checksum"] == "1220" + hashlib.sha256(response.content).hexdigest()
            rel = asset.href.split(f"/runs/{item.id}/", 1)[1].removeprefix("files/")  # files/… or maps/…
            if rel != "manifest.json":
                assert manifest["files"][rel]["size"] == asset.extra_fields["file:size"], rel
            checked += 1
    assert checked == 6  # per run: forecast.nc, manifest, thumbnail


def test_links_follow_the_root_path_of_a_proxy(forecasts_dir: Path) -> None:
    behind = TestClient(create_app(ServeSettings(forecasts_dir=forecasts_dir)), root_path="/api")
    _, items, io = _crawl(behind, f"{BASE}/api")
    assert len(items) == 2 and all(href.startswith(f"{BASE}/api/stac/") for href in io.read)
    assert all(a.href.startswith(f"{BASE}/api/runs/") for i in items for a in i.assets.values())


def test_head_answers_on_every_stac_document(client: TestClient) -> None:
    for url in ("/stac/catalog.json", "/stac/collections/forecasts.json", "/stac/items/20000101T00.json"):
        got, head = client.get(url), client.head(url)
        assert (got.status_code, head.status_code) == (200, 200), url
        assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"], url


@pytest.mark.parametrize("url, status, words", [
    ("/stac/items/20991231T00.json", 404, ["20991231T00", "not a published run"]),
    ("/stac/items/20000230T00.json", 404, ["not a calendar date"]),
    ("/stac/items/20001340T00.json", 422, ["not a run name"]),
    ("/stac/items/latest.json", 422, ["not a run name"]),
])
def test_unknown_or_malformed_items(client: TestClient, url: str, status: int, words: list[str]) -> None:
    response = client.get(url)
    assert response.status_code == status
    assert all(w in response.json()["detail"] for w in words)


def test_an_empty_site_is_a_valid_empty_collection(tmp_path: Path) -> None:
    empty = TestClient(create_app(ServeSettings(forecasts_dir=tmp_path)))
    body = empty.get("/stac/collections/forecasts.json").json()
    JsonSchemaSTACValidator().validate_core(body, pystac.STACObjectType.COLLECTION, body["stac_version"])
    assert [link for link in body["links"] if link["rel"] == "item"] == []
    assert _crawl(empty)[1] == []
