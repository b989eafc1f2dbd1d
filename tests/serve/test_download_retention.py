"""A download holds its run's reader lock from the status line to the last byte: retention leaves the
run in place meanwhile, removes it once the download is done, and a run gone before the body starts is a 404."""

from __future__ import annotations

import asyncio
from pathlib import Path

from starlette.requests import Request

from core.retention import apply_retention
from core.runs import list_runs, run_name
from serve.catalog import Catalog
from serve.downloads import file_response
from tests.serve.conftest import LATER_INIT, make_forecast, publish_run

LATER_INIT_RUN = run_name(LATER_INIT)


def get(path: str) -> Request:
    return Request({"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b""})


async def drain(response) -> bytes:
    return b"".join([chunk async for chunk in response.body_iterator])


def test_retention_keeps_a_run_while_it_is_downloaded_and_removes_it_after(tmp_path: Path) -> None:
    forecasts = tmp_path / "forecasts"
    old = publish_run(forecasts, make_forecast())
    publish_run(forecasts, make_forecast(init=LATER_INIT, leads=3, seed=1))
    file = Catalog(forecasts).file(old.name, "forecast.nc")
    response = file_response(get(f"/runs/{old.name}/files/forecast.nc"), file, chunk_size=4096)
    assert response.status_code == 200
    report = apply_retention(forecasts, keep=1)  # the older run is due for removal, but it is being read
    assert old.name in report.protected and list_runs(forecasts) == sorted([old.name, LATER_INIT_RUN])
    body = asyncio.run(drain(response))
    assert body == (old / "forecast.nc").read_bytes()
    apply_retention(forecasts, keep=1)  # the download is over: now it goes
    assert list_runs(forecasts) == [LATER_INIT_RUN]


def test_a_run_removed_before_its_body_starts_is_a_404(tmp_path: Path) -> None:
    import shutil

    forecasts = tmp_path / "forecasts"
    run = publish_run(forecasts, make_forecast())
    file = Catalog(forecasts).file(run.name, "forecast.nc")
    shutil.rmtree(run)
    response = file_response(get(f"/runs/{run.name}/files/forecast.nc"), file)
    assert response.status_code == 404 and b"not published" in response.body

