"""The whole house on the tiny grid, through Prefect: ingest → torchrun training → forecast →
maps → publication → scores, then HTTP GETs of a file, a map and the viewer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import xarray as xr
from fastapi.testclient import TestClient
from prefect.testing.utilities import prefect_test_harness

from core.schema import validate_forecast
from pipelines import flows
from serve.app import app_from_config
from tests.ingest.conftest import tiny_config


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_demo_flow_end_to_end(tmp_path: Path, harness) -> None:
    cfg, cfg_path = tiny_config(
        tmp_path / "demo",
        ingest={"end": "2000-01-09T18"},
        train={"train_end": "2000-01-05T18", "val_start": "2000-01-06", "val_end": "2000-01-07T18",
               "max_steps": 25, "budget_minutes": 5, "batch_size": 4, "nproc_per_node": 2,
               "device": "cpu"},
        forecast={"init_time": "2000-01-08T00", "lead_hours": 24},
        model={"embed_dim": 8, "num_layers": 2},
    )
    result = flows.demo(str(cfg_path))

    registry = [json.loads(line) for line in (cfg.paths.runs / "registry.jsonl").read_text().splitlines()]
    checkpoint = Path(result["checkpoint"])
    assert [r["checkpoint"] for r in registry] == [str(checkpoint.resolve())]
    assert registry[0]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert registry[0]["dataset_version"].startswith("swe-") and registry[0]["code_version"]

    run_dir = Path(result["run_dir"])
    assert run_dir == cfg.paths.forecasts / "20000108T00"
    assert not [p for p in cfg.paths.forecasts.iterdir() if p.name.startswith(".tmp")]
    fc = validate_forecast(xr.open_zarr(run_dir / "forecast.zarr", consolidated=False).load())
    assert fc.sizes["lead_time"] == 5 and fc.sizes["latitude"] == 17
    nc = xr.open_dataset(run_dir / "forecast.nc", decode_timedelta=True).load()  # CF lead_time: plain hours
    xr.testing.assert_allclose(nc["geopotential"], fc["geopotential"])
    scores = result["scores"]
    assert set(scores) == {0, 6, 12, 18, 24}
    assert scores[0]["relative_error"]["model"] == pytest.approx(0.0, abs=1e-6)  # lead 0 is the analysis
    assert 0 < scores[24]["relative_error"]["persistence"] < 2

    client = TestClient(app_from_config(cfg))
    runs = client.get("/runs").json()
    assert [r["name"] for r in runs] == ["20000108T00"]
    manifest = client.get("/runs/20000108T00").json()
    assert manifest["provenance"]["dataset_version"].startswith("swe-")
    got = client.get("/runs/20000108T00/files/forecast.nc")
    assert got.status_code == 200
    assert hashlib.sha256(got.content).hexdigest() == manifest["files"]["forecast.nc"]["sha256"]
    png = client.get("/runs/20000108T00/maps/geopotential_500/024.png")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    viewer = client.get("/viewer")
    assert viewer.status_code == 200 and "<select" in viewer.text
