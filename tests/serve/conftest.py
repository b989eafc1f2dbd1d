"""Real published forecast runs built without torch: a tiny forecast, its files, maps and manifest."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import uvicorn
import xarray as xr
from fastapi import FastAPI
from fastapi.testclient import TestClient

from core.runs import publish, run_name, staging_dir, write_manifest
from core.schema import validate_forecast
from core.testing import analysis_dataset
from serve.app import create_app
from serve.maps import render_run_maps
from serve.settings import ServeSettings

INIT = "2000-01-01T00"
LATER_INIT = "2000-01-01T06"
LEADS = 5  # 0 … 24 h every 6 h
PROVENANCE = {"checkpoint_sha256": "c" * 64, "dataset_version": "testing-0", "code_version": "test"}


def make_forecast(init: str = INIT, leads: int = LEADS, step_hours: int = 6, grid: str = "tiny",
                  seed: int = 0) -> xr.Dataset:
    """A contract-valid forecast: analysis fields relabelled as lead times of one init time."""
    analysis = analysis_dataset(grid=grid, start=init, periods=leads, step_hours=step_hours, seed=seed)
    analysis = analysis.drop_vars(["done", "expver"])
    lead = analysis["time"].values - analysis["time"].values[0]
    ds = analysis.rename(time="lead_time").assign_coords(lead_time=lead)
    ds = ds.expand_dims(init_time=[pd.Timestamp(init).to_datetime64()])
    ds = ds.assign_coords(valid_time=(("init_time", "lead_time"), ds["init_time"].values[:, None] + lead[None, :]))
    return validate_forecast(ds)


def publish_run(forecasts_dir: Path, forecast: xr.Dataset, dpi: int = 40,
                regions: tuple[str, ...] = ("global", "arctic")) -> Path:
    """Write forecast.zarr, forecast.nc and maps (two regions) in a staging dir, write the manifest, publish."""
    init = pd.Timestamp(forecast["init_time"].values[0])
    name = run_name(init)
    tmp = staging_dir(forecasts_dir, name)
    forecast.to_zarr(tmp / "forecast.zarr", zarr_format=3, consolidated=False)
    forecast.to_netcdf(tmp / "forecast.nc")
    render_run_maps(forecast, tmp, dpi=dpi, regions=regions)
    write_manifest(tmp, init, provenance=PROVENANCE)
    return publish(tmp, forecasts_dir / name)


@pytest.fixture(scope="session")
def forecast() -> xr.Dataset:
    """The forecast of the main test run."""
    return make_forecast()


@pytest.fixture(scope="session")
def forecasts_dir(tmp_path_factory: pytest.TempPathFactory, forecast: xr.Dataset) -> Path:
    """Two published runs, plus things that must never be served: staging, manifest-less, stray files."""
    root = tmp_path_factory.mktemp("site")
    forecasts = root / "forecasts"
    publish_run(forecasts, forecast)
    publish_run(forecasts, make_forecast(init=LATER_INIT, leads=3, seed=1))
    # An unfinished run in its staging dir (with a manifest, as just before the rename).
    staging = staging_dir(forecasts, "20000102T00")
    (staging / "forecast.nc").write_bytes(b"partial")
    write_manifest(staging, pd.Timestamp("2000-01-02"), provenance=PROVENANCE)
    # A run-named directory without a manifest is not published either.
    (forecasts / "20000103T00").mkdir()
    (forecasts / "20000103T00" / "forecast.nc").write_bytes(b"unpublished")
    (forecasts / "secret.txt").write_text("outside any run")
    (root / "secret.txt").write_text("outside the forecasts directory")
    return forecasts


@pytest.fixture(scope="session")
def run_dir(forecasts_dir: Path) -> Path:
    """Directory of the main published run."""
    return forecasts_dir / run_name(INIT)


@pytest.fixture(scope="session")
def client(forecasts_dir: Path) -> TestClient:
    """A test client of the app over the published runs."""
    return TestClient(create_app(ServeSettings(forecasts_dir=forecasts_dir)))


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def pixels(path_or_bytes: Path | bytes) -> np.ndarray:
    """RGB pixels of a PNG as a float array."""
    import io

    from PIL import Image

    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(source) as img:
        return np.asarray(img.convert("RGB"), dtype=float)


@contextmanager
def uvicorn_thread(app: FastAPI) -> Iterator[int]:
    """Serve ``app`` with uvicorn on a free 127.0.0.1 port in a thread; yields the port, stops on exit."""
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
