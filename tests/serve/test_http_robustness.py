"""Run names of the right shape but no such date, or with a trailing newline, and a run-named folder of an
impossible date in the forecasts directory: each is a clean 4xx or is skipped, over real HTTP on a kept-alive
connection, and the catalog stays up for everyone else. HEAD answers wherever GET does."""

from __future__ import annotations

import http.client
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from serve.app import create_app
from serve.settings import ServeSettings
from tests.serve.conftest import make_forecast, publish_run, uvicorn_thread


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """``spherecast serve``'s app under uvicorn on 127.0.0.1, over one published run and one impossible folder."""
    forecasts = tmp_path / "forecasts"
    run = publish_run(forecasts, make_forecast())
    shutil.copytree(run, forecasts / "20001340T00")  # a run's shape and a manifest, but month 13, hour 40
    with uvicorn_thread(create_app(ServeSettings(forecasts_dir=forecasts))) as port:
        yield port, forecasts


def test_impossible_run_names_are_4xx_and_the_connection_stays_open(served: tuple[int, Path]) -> None:
    port, _ = served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for path in ("/runs/20001340T00", "/runs/20000101T00%0a", "/runs/20000101T24/maps/geopotential_500/000.png"):
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        assert response.status == 422, (path, body)
        assert b"not a run name" in body
    # The documented run-name pattern admits 30 February: well formed, so no such run (404), not a 422.
    conn.request("GET", "/runs/20000230T00/files/forecast.nc")
    response = conn.getresponse()
    body = response.read()
    assert response.status == 404 and b"20000230T00 is not a calendar date" in body, body
    conn.request("GET", "/runs/20000101T00")  # the same connection still answers
    response = conn.getresponse()
    assert response.status == 200 and response.read()
    conn.close()


def test_a_folder_of_an_impossible_date_is_skipped_not_a_500(served: tuple[int, Path]) -> None:
    port, forecasts = served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for path, want in (("/runs", b'"name":"20000101T00"'), ("/runs/latest", b'"name":"20000101T00"'),
                       ("/health", b'"runs":1')):
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200 and want in body, (path, body)
        assert b"20001340T00" not in body
    conn.close()
    assert (forecasts / "20001340T00").is_dir()  # skipped, never touched


def test_head_answers_on_every_get_route_without_a_body(served: tuple[int, Path]) -> None:
    port, _ = served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for path in ("/runs", "/runs/latest", "/runs/20000101T00", "/health", "/viewer", "/",
                 "/runs/20000101T00/files/forecast.nc"):
        conn.request("GET", path)
        got = conn.getresponse()
        body = got.read()
        conn.request("HEAD", path)
        head = conn.getresponse()
        assert (head.status, got.status) == (200, 200), path
        assert head.read() == b"" and head.getheader("content-type") == got.getheader("content-type"), path
        assert int(head.getheader("content-length")) == len(body), path
    conn.close()


def test_json_is_gzipped_for_clients_that_ask_and_files_never_are(served: tuple[int, Path]) -> None:
    import gzip
    import json

    port, forecasts = served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for path in ("/runs", "/openapi.json", "/runs/20000101T00"):
        conn.request("GET", path, headers={"Accept-Encoding": "gzip"})
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200 and response.getheader("content-encoding") == "gzip", path
        json.loads(gzip.decompress(body))
    conn.request("GET", "/runs/20000101T00/files/forecast.nc", headers={"Accept-Encoding": "gzip", "Range": "bytes=0-9"})
    response = conn.getresponse()
    assert response.status == 206 and response.getheader("content-encoding") is None
    assert response.read() == (forecasts / "20000101T00" / "forecast.nc").read_bytes()[:10]
    conn.close()
