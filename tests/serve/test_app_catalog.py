"""Catalog routes: health, run listing, latest, manifest; only published runs are visible."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient

from core.runs import read_manifest
from serve.app import create_app
from serve.settings import ServeSettings, get_settings

CHANNELS = ["geopotential_500", "u_component_of_wind_500", "v_component_of_wind_500"]


def test_health_counts_published_runs(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["runs"], body["schedule"]["newest_run"]) == ("ok", 2, "20000101T06")


def test_runs_lists_published_runs_only(client: TestClient, forecasts_dir: Path) -> None:
    assert any(p.name.startswith(".tmp-") for p in forecasts_dir.iterdir())
    runs = client.get("/runs").json()
    assert [r["name"] for r in runs] == ["20000101T06", "20000101T00"]  # newest first
    first = runs[1]
    assert first["init_time"] == "2000-01-01T00:00:00"
    assert first["channels"] == ["geopotential_500", "wind500"]  # map products (u, v make the wind product)
    assert first["lead_hours"] == [0, 6, 12, 18, 24]
    assert first["valid_times"][-1] == "2000-01-02T00:00:00"
    assert "forecast.nc" in first["files"] and "manifest.json" in first["files"]
    assert "forecast.zarr/zarr.json" in first["files"]
    assert not any(f.startswith("maps/") for f in first["files"])
    assert runs[0]["lead_hours"] == [0, 6, 12]


def test_latest_is_the_newest_run(client: TestClient) -> None:
    response = client.get("/runs/latest")
    assert response.status_code == 200
    assert response.json()["name"] == "20000101T06"


def test_latest_without_runs_is_404(tmp_path: Path) -> None:
    empty = TestClient(create_app(ServeSettings(forecasts_dir=tmp_path)))
    response = empty.get("/runs/latest")
    assert response.status_code == 404
    assert "no published runs" in response.json()["detail"]
    assert empty.get("/runs").json() == []
    health = empty.get("/health").json()
    assert (health["status"], health["runs"], health["schedule"]["status"]) == ("ok", 0, "late")


def test_run_detail_carries_the_manifest_on_disk(client: TestClient, run_dir: Path) -> None:
    response = client.get("/runs/20000101T00")
    assert response.status_code == 200
    detail = response.json()
    on_disk = read_manifest(run_dir)
    assert {k: detail[k] for k in on_disk if k != "files"} == {k: v for k, v in on_disk.items() if k != "files"}
    assert {rel: {"size": f["size"], "sha256": f["sha256"]} for rel, f in detail["files"].items()
            if rel != "manifest.json"} == on_disk["files"]
    assert detail["provenance"]["dataset_version"] == "testing-0"
    assert "maps/geopotential_500/global/024.png" in detail["files"]


def test_settings_dependency_can_be_overridden(client: TestClient, tmp_path: Path) -> None:
    app = create_app(ServeSettings(forecasts_dir=tmp_path / "nowhere"))
    app.dependency_overrides[get_settings] = lambda: ServeSettings(forecasts_dir=client.app.state.settings.forecasts_dir)
    assert TestClient(app).get("/health").json()["runs"] == 2


def test_a_republished_run_is_seen_at_once(tmp_path: Path) -> None:
    from tests.serve.conftest import make_forecast, publish_run

    forecasts = tmp_path / "forecasts"
    publish_run(forecasts, make_forecast(leads=2))
    app_client = TestClient(create_app(ServeSettings(forecasts_dir=forecasts)))
    assert app_client.get("/runs/latest").json()["lead_hours"] == [0, 6]
    publish_run(forecasts, make_forecast(leads=3))
    assert app_client.get("/runs/latest").json()["lead_hours"] == [0, 6, 12]
    on_disk = json.loads((forecasts / "20000101T00" / "manifest.json").read_text())
    served = app_client.get("/runs/20000101T00").json()["files"]
    assert {rel: {k: f[k] for k in ("size", "sha256")} for rel, f in served.items() if rel != "manifest.json"} \
        == on_disk["files"]


def test_openapi_documents_the_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/health", "/runs", "/runs/latest", "/runs/{run}", "/runs/{run}/files/{path}",
            "/runs/{run}/maps/{product}/{lead}.png",
            "/runs/{run}/maps/{product}/{region}/{lead}.png", "/viewer"} <= set(paths)
