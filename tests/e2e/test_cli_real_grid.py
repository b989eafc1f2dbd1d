"""`spherecast train` and `spherecast forecast` as a user runs them, on a 1.5° store (121×240).

Every earlier end-to-end test ran on grids ≤ 65×128, and the default SFNO crashed on every real
ERA5 grid wider than 128 longitudes once it had three blocks. This runs the real console script in
subprocesses (Prefect flow, torchrun training, forecast, maps, publication) on the ``1.5deg``
preset with three blocks (the middle one synthesises 240 longitudes by FFT): a short run, but the
shapes users meet.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import xarray as xr
import yaml

from core.schema import validate_forecast
from tests.models.conftest import TRAIN, moving_planet, write_data

SPHERECAST = Path(sys.executable).with_name("spherecast")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    env = {k: v for k, v in env.items() if not k.startswith("SPHERECAST_")}
    return subprocess.run([str(SPHERECAST), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_train_and_forecast_on_a_one_and_a_half_degree_store(tmp_path: Path) -> None:
    write_data(tmp_path, moving_planet("1.5deg", periods=80))
    config = {
        "paths": {"root": str(tmp_path)}, "grid": {"preset": "1.5deg"},
        "model": {"embed_dim": 4, "num_layers": 3},
        "train": {**TRAIN, "max_steps": 3, "batch_size": 2, "threads": 1, "val_lead_hours": [6],
                  "run_name": "real-grid"},
        "forecast": {"init_time": "2000-01-18T00", "lead_hours": 12},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))

    trained = _run("train", "--config", str(path), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    checkpoint = tmp_path / "runs" / "real-grid" / "checkpoint.pt"
    meta = torch.load(checkpoint, map_location="cpu", weights_only=False)["meta"]
    assert meta["grid"] == "1.5deg:121x240:equiangular-poles"
    assert (meta["arch"]["nlat"], meta["arch"]["nlon"], meta["arch"]["num_layers"]) == (121, 240, 3)

    forecast = _run("forecast", "--config", str(path), cwd=tmp_path)
    assert forecast.returncode == 0, forecast.stderr[-3000:]
    run = tmp_path / "forecasts" / "20000118T00"
    fc = validate_forecast(xr.open_zarr(run / "forecast.zarr", consolidated=False).load())
    assert (fc.sizes["latitude"], fc.sizes["longitude"], fc.sizes["lead_time"]) == (121, 240, 3)
    for name in ("geopotential", "u_component_of_wind", "v_component_of_wind"):
        assert np.isfinite(fc[name].values).all(), name
    assert (run / "maps" / "geopotential_500" / "global" / "012.png").stat().st_size > 0
