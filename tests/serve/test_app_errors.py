"""Unknown things give 404 and malformed ones 422, as JSON naming the parameter; no path escapes a run."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from core.runs import publish, staging_dir, write_manifest
from serve.app import create_app
from serve.settings import ServeSettings
from tests.serve.conftest import PROVENANCE

RUN = "20000101T00"


@pytest.mark.parametrize("url, status, words", [
    ("/runs/20991231T00", 404, ["run '20991231T00'", "not a published run"]),
    ("/runs/20000103T00", 404, ["20000103T00", "not a published run"]),  # no manifest
    ("/runs/20000102T00", 404, ["20000102T00"]),  # only in staging
    ("/runs/nonsense", 422, ["run 'nonsense'", "YYYYMMDDTHH"]),
    (f"/runs/{RUN}/files/missing.nc", 404, ["no file 'missing.nc'"]),
    (f"/runs/{RUN}/files/forecast.zarr", 404, ["'forecast.zarr' is a directory"]),
    (f"/runs/{RUN}/maps/temperature_850/6.png", 404, ["product 'temperature_850'", "geopotential_500"]),
    (f"/runs/{RUN}/maps/geopotential_500/7.png", 404, ["lead 7 h", "0, 6, 12, 18, 24"]),
    (f"/runs/{RUN}/maps/geopotential_500/-6.png", 404, ["lead -6 h"]),
    (f"/runs/{RUN}/maps/geopotential_500/six.png", 422, ["parameter 'lead'"]),
    ("/runs/20991231T00/maps/geopotential_500/6.png", 404, ["run '20991231T00'"]),
])
def test_errors_name_what_is_wrong(client: TestClient, url: str, status: int, words: list[str]) -> None:
    response = client.get(url)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    for word in words:
        assert word in detail, detail


@pytest.mark.parametrize("path", [
    "../secret.txt",
    "..%2Fsecret.txt",
    "..%2F..%2Fsecret.txt",
    "%2E%2E/%2E%2E/secret.txt",
    "maps/../../secret.txt",
    "/etc/passwd",
    "%2Fetc%2Fpasswd",
    "forecast.zarr/../../secret.txt",
    "..\\secret.txt",
])
def test_file_traversal_is_rejected(client: TestClient, path: str) -> None:
    # Percent-encoded forms arrive decoded ("../") in the route's path parameter.
    response = client.get(f"/runs/{RUN}/files/{path}")
    assert response.status_code in (404, 422), path
    assert "outside" not in response.text


@pytest.mark.parametrize("url", [
    "/runs/..%2F20000101T00/files/forecast.nc",
    "/runs/%2E%2E/files/secret.txt",
    "/runs/20000101T00%2F..%2F..%2F/files/secret.txt",
    f"/runs/{RUN}/maps/..%2F..%2F..%2Fsecret/6.png",
    f"/runs/{RUN}/maps/geopotential_500%2F..%2F..%2F..%2Fsecret/6.png",
])
def test_run_and_channel_traversal_is_rejected(client: TestClient, url: str) -> None:
    response = client.get(url)
    assert response.status_code in (404, 422), url
    assert "outside" not in response.text


def _asgi_get(app: object, path: str) -> tuple[int, bytes]:
    """GET a path verbatim through the ASGI interface (HTTP clients collapse ``..`` first)."""
    import anyio

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"host", b"testserver")], "client": ("127.0.0.1", 1), "server": ("testserver", 80)}
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    anyio.run(app, scope, receive, send)  # type: ignore[arg-type]
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.parametrize("path", [
    f"/runs/{RUN}/files/../../secret.txt",
    f"/runs/{RUN}/files/../secret.txt",
    f"/runs/{RUN}/files/maps/../../../secret.txt",
    "/runs/../files/secret.txt",
    f"/runs/{RUN}/maps/../../../secret/6.png",
])
def test_raw_dot_segments_never_reach_a_file(client: TestClient, forecasts_dir: Path, path: str) -> None:
    status, body = _asgi_get(client.app, path)
    assert status in (404, 422), path
    assert b"outside any run" not in body and b"outside the forecasts" not in body


def test_symlink_out_of_a_run_is_not_served(tmp_path: Path) -> None:
    forecasts = tmp_path / "forecasts"
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    tmp = staging_dir(forecasts, RUN)
    (tmp / "forecast.nc").write_bytes(b"fine")
    os.symlink(secret, tmp / "leak.txt")
    write_manifest(tmp, __import__("pandas").Timestamp("2000-01-01"), provenance=PROVENANCE)
    publish(tmp, forecasts / RUN)
    app_client = TestClient(create_app(ServeSettings(forecasts_dir=forecasts)))
    assert app_client.get(f"/runs/{RUN}/files/forecast.nc").content == b"fine"
    response = app_client.get(f"/runs/{RUN}/files/leak.txt")
    assert response.status_code == 404
    assert b"private" not in response.content


def test_file_changed_after_publication_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    forecasts = tmp_path / "forecasts"
    tmp = staging_dir(forecasts, RUN)
    (tmp / "forecast.nc").write_bytes(b"original")
    write_manifest(tmp, __import__("pandas").Timestamp("2000-01-01"), provenance=PROVENANCE)
    run = publish(tmp, forecasts / RUN)
    client = TestClient(create_app(ServeSettings(forecasts_dir=forecasts)))
    assert client.get(f"/runs/{RUN}/files/forecast.nc").content == b"original"
    for damage in (b"tampered with", b"origiNAL"):  # another size, then the same size: damaged in place
        (run / "forecast.nc").write_bytes(damage)
        with caplog.at_level(logging.ERROR, logger="serve.app"):
            response = client.get(f"/runs/{RUN}/files/forecast.nc")
        assert response.status_code == 503 and response.headers["retry-after"] == "300"
        assert str(tmp_path) not in response.text and "temporarily unavailable" in response.json()["detail"]
        assert str(run / "forecast.nc") in caplog.text  # the operator's log names the file
        caplog.clear()
    (run / "forecast.nc").unlink()
    response = client.get(f"/runs/{RUN}/files/forecast.nc")
    assert response.status_code == 503 and str(tmp_path) not in response.text
