"""What a published cycle holds beyond one deterministic run: ensembles, a finer grid, the phase timings,
and the commands that read runs back (verify, lineage) or fetch live initial conditions.

Runs go through the real ``run_forecast`` flow on Prefect's temporary test server, from the tiny
checkpoint that ``tests/pipelines/test_cycles.py`` trains.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
import yaml

from core.grid import get_grid
from core.runs import list_runs, read_manifest
from models.data import open_analysis
from models.regrid_spectral import spectral_regrid
from pipelines import flows
from pipelines.cli import main
from pipelines.cycles import read_journal
from tests.pipelines import test_cycles
from tests.pipelines.test_cycles import make_config
from tests.serve.conftest import make_forecast, publish_run

# The tiny checkpoint and the Prefect test server, as module fixtures of this module too.
harness, trained = test_cycles.harness, test_cycles.trained

PHASES = {"load", "rollout", "write", "render", "publish"}


def test_an_ensemble_cycle_publishes_members_mean_spread_and_every_format(tmp_path: Path, trained, harness) -> None:
    path = make_config(tmp_path, trained, lead_hours=12, ensemble={"members": 3, "residual_scale": 0.0, "ic_scale": 1.0})
    result = flows.run_forecast(str(path))
    run = Path(result["run_dir"])
    assert result["action"] == "published" and {p.name for p in run.iterdir()} >= {
        "forecast.zarr", "ensemble.zarr", "forecast.nc", "forecast.grib2", "manifest.json", "maps"}
    members = xr.open_zarr(run / "forecast.zarr", consolidated=False).load()
    summary = xr.open_zarr(run / "ensemble.zarr", consolidated=False).load()
    assert members.sizes["member"] == 3 and members.sizes["lead_time"] == 3
    z = members["geopotential"]
    assert float(abs(z.isel(member=1) - z.isel(member=0)).max()) > 0  # perturbed members differ from the control
    np.testing.assert_allclose(summary["geopotential"], z.mean("member"), rtol=1e-5)
    np.testing.assert_allclose(summary["geopotential_spread"], z.std("member"), rtol=1e-4, atol=1e-3)
    provenance = read_manifest(run)["provenance"]
    assert provenance["ensemble_members"] == 3 and "s3cret" not in json.dumps(provenance)
    timings = read_journal(tmp_path / "forecasts")[-1]["timings"]
    assert set(timings) == PHASES and all(v > 0 for v in timings.values())


def test_a_finer_grid_runs_the_same_weights_from_the_moved_initial_state(tmp_path: Path, trained, harness) -> None:
    path = make_config(tmp_path, trained, grid="5.625deg")
    run = Path(flows.run_forecast(str(path))["run_dir"])
    fc = xr.open_zarr(run / "forecast.zarr", consolidated=False).load()
    assert (fc.sizes["latitude"], fc.sizes["longitude"]) == (33, 64)
    assert np.isfinite(fc["geopotential"]).all()
    store = open_analysis(trained[1] / "analysis.zarr")
    moved = spectral_regrid(store.sel(time=[pd.Timestamp("2000-01-18T00")]).load(), get_grid("5.625deg"))
    np.testing.assert_allclose(fc["geopotential"].isel(init_time=0, lead_time=0).values,
                               moved["geopotential"].isel(time=0).values, rtol=1e-6)
    provenance = read_manifest(run)["provenance"]
    assert provenance["grid"].startswith("5.625deg") and provenance["model_grid"].startswith("tiny")


def test_a_finer_grid_ensemble_with_residuals_is_refused_before_anything_is_written(
        tmp_path: Path, trained, harness, capsys) -> None:
    path = make_config(tmp_path, trained, grid="5.625deg", ensemble={"members": 2, "residual_scale": 0.5})
    assert main(["forecast", "--config", str(path)]) == 2
    assert "residual_scale: 0 for a transfer" in capsys.readouterr().err
    assert list_runs(tmp_path / "forecasts") == []


def test_verify_and_lineage_read_a_published_run_back(tmp_path: Path, trained, harness, capsys) -> None:
    path = make_config(tmp_path, trained, lead_hours=12)
    run = Path(flows.run_forecast(str(path))["run_dir"])
    capsys.readouterr()
    assert main(["verify", "--config", str(path)]) == 0
    assert "scored ['20000118T00']" in capsys.readouterr().out
    scores = json.loads((tmp_path / "verification" / run.name / "scores.json").read_text())
    assert scores  # the leads' truth (2000-01-18T00..12) is in the store
    assert main(["lineage", run.name, "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert run.name in out and read_manifest(run)["provenance"]["checkpoint_sha256"][:12] in out
    assert main(["lineage", "20000101T00", "--config", str(path)]) == 2
    assert "spherecast: error:" in capsys.readouterr().err


def planet_config(tmp_path: Path, end: str = "2000-01-01T18", **extra: object) -> Path:
    """A tiny, quickly spun-up planet ingested from 2000-01-01T00 to ``end``."""
    doc = {"paths": {"root": str(tmp_path)}, "grid": {"preset": "tiny"},
           "ingest": {"start": "2000-01-01T00", "end": end,
                      "synthetic": {"spinup_days": 1.0, "solver_nlat": 33, "solver_nlon": 64, "dt_seconds": 360.0}},
           **extra}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_an_append_scores_the_runs_its_new_truth_verifies(tmp_path: Path, harness) -> None:
    path = planet_config(tmp_path)
    flows.ingest_era5(str(path))
    run = publish_run(tmp_path / "forecasts", make_forecast(init="2000-01-01T18", leads=3))  # to 2000-01-02T06
    verification = tmp_path / "verification" / run.name / "scores.json"
    flows.ingest_era5(str(path), overrides={"ingest": {"end": "2000-01-02T00"}})
    first = json.loads(verification.read_text())
    flows.ingest_era5(str(path), overrides={"ingest": {"end": "2000-01-02T06"}})
    second = json.loads(verification.read_text())
    # Each append scored exactly the leads whose truth had arrived: 18 and 00 UTC, then 06 UTC as well.
    assert [s["lead_hours"] for s in first["leads"]] == [0, 6] and first["pending_leads"] == [12]
    assert [s["lead_hours"] for s in second["leads"]] == [0, 6, 12] and second["pending_leads"] == []


def test_initial_conditions_command_fetches_the_planets_next_cycle(tmp_path: Path, harness, capsys) -> None:
    path = planet_config(tmp_path, initial_conditions={"source": "synthetic"})
    # The planet has no wall clock: the first call fills the cycles up to ingest.end, each later one
    # brings the next 6 h, as a live feed would.
    for newest in ("2000-01-01T18", "2000-01-02T00"):
        assert main(["initial-conditions", "--config", str(path)]) == 0
        assert f"newest complete: {newest}" in capsys.readouterr().out
    store = open_analysis(tmp_path / "data" / "initial-conditions.zarr")
    assert store.attrs["source"] == "synthetic-shallow-water"
    done = pd.DatetimeIndex(store["time"].values[store["done"].values.astype(bool)])
    assert list(done) == list(pd.date_range("2000-01-01T00", "2000-01-02T00", freq="6h"))
