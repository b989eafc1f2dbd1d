"""The live demo on the tiny grid, through Prefect: three 6-hour arrivals of the planet, each appended to the
analysis store and the initial-conditions store, forecast on the planet's clock, earlier runs scored as their
truth arrives, and one retrain decided against the demo's model — and nothing already there changed.

The "normal demo" is built the fast way: the real planet ingest into a real Zarr store, a tiny SFNO trained
in-process, and the demo's run published by the real ``run_forecast`` flow. The live demo then runs the real
subflows (the retrain is a real torchrun subprocess) on Prefect's temporary test server.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml
from prefect.testing.utilities import prefect_test_harness

from core.config import Config, load_config
from core.ic_select import complete_times
from core.lineage import PROMOTIONS, read_current
from core.runs import list_runs, read_manifest
from pipelines.live import check_live_request, live_demo, retrain_overrides

DEMO_END = pd.Timestamp("2000-01-09T18")  # the demo store's newest time: the planet's clock when the live demo starts
NEW = [DEMO_END + pd.Timedelta(hours=6 * k) for k in (1, 2, 3)]
DEMO_RUN = "20000108T00"
APPENDED = ("forecasts/cycles.jsonl", "runs/registry.jsonl")  # journals: they may only gain lines

DOC = {
    "grid": {"preset": "tiny"},
    "ingest": {"start": "2000-01-01T00", "end": "2000-01-09T18", "slab_size": 2,
               "synthetic": {"solver_nlat": 33, "solver_nlon": 64, "dt_seconds": 360, "spinup_days": 2}},
    "model": {"embed_dim": 8, "num_layers": 2},
    "train": {"train_start": "2000-01-01", "train_end": "2000-01-05T18", "val_start": "2000-01-06",
              "val_end": "2000-01-07T18", "max_steps": 4, "batch_size": 4, "threads": 1, "device": "cpu",
              "nproc_per_node": 1, "budget_minutes": 0.5, "tensorboard": False, "window_days": 4, "val_days": 2},
    "forecast": {"init_time": "2000-01-08T00", "lead_hours": 12, "wait_minutes": 0.1, "poll_seconds": 0.2},
    "initial_conditions": {"keep_cycles": 4},
    "render": {"dpi": 40},
}


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=180):
        yield


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, harness: None) -> tuple[Path, Config]:
    """What ``spherecast demo`` leaves behind: the planet's store and stats, a trained model, the demo's run."""
    import torch

    from ingest.build import ingest
    from models.train import train
    from pipelines.flows import run_forecast

    root = tmp_path_factory.mktemp("live")
    path = root / "spherecast.yaml"
    path.write_text(yaml.safe_dump({**DOC, "paths": {"root": str(root)}}))
    config = load_config(path, env={})
    ingest(config, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(config)
    finally:
        torch.set_num_threads(threads)
    assert run_forecast(str(path))["action"] == "published"
    return path, config


def test_bad_live_settings_are_refused_before_anything_runs(tmp_path: Path) -> None:
    config = load_config(env={}, overrides={"paths": {"root": str(tmp_path)}})
    with pytest.raises(ValueError, match="cycles must be ≥ 1"):
        check_live_request(config, 0, 0, 1)
    with pytest.raises(ValueError, match="interval_seconds must be ≥ 0"):
        check_live_request(config, 1, -1, 1)
    with pytest.raises(ValueError, match="retrain_every must be ≥ 1"):
        check_live_request(config, 1, 0, 0)
    with pytest.raises(ValueError, match="no analysis store at .*run `spherecast demo` first"):
        check_live_request(config, 1, 0, 1)
    cds = load_config(env={}, overrides={"paths": {"root": str(tmp_path)}, "ingest": {"source": "cds"}})
    with pytest.raises(ValueError, match="ingest.source is 'cds'"):
        check_live_request(cds, 1, 0, 1)
    assert not tmp_path.joinpath("data").exists()


def test_the_live_retrain_window_fits_the_store() -> None:
    config = load_config(env={}, overrides={"ingest": {"start": "2000-01-01", "end": "2000-03-31T18"}})
    got = retrain_overrides(config, pd.Timestamp("2000-04-01T00"))["train"]
    # 91 days held: validation is the default 10 days, the window 30 days, the budget one minute at most.
    assert got == {"window_days": 30.0, "val_days": 10.0, "budget_minutes": 1.0}
    short = retrain_overrides(config, pd.Timestamp("2000-01-10T18"))["train"]
    assert short["val_days"] == pytest.approx(2.0) and short["window_days"] == pytest.approx(8.0)
    with pytest.raises(ValueError, match="holds 1 days .* too few for a live retrain"):
        retrain_overrides(config, pd.Timestamp("2000-01-01T18"))


def test_three_live_cycles_append_forecast_score_and_retrain(demo: tuple[Path, Config]) -> None:
    path, config = demo
    root = config.paths.root
    store = config.paths.analysis_store
    ic_store = config.paths.initial_conditions_store
    with xr.open_zarr(store, consolidated=False) as ds:
        before = ds.load()
    stats_before = xr.load_dataset(config.paths.stats_file)
    assert pd.Timestamp(before["time"].values[-1]) == DEMO_END and not ic_store.exists()
    files_before = files(root)
    journals = {rel: (root / rel).read_bytes() for rel in APPENDED if (root / rel).is_file()}

    summary = live_demo(str(path), cycles=3, interval_seconds=0, retrain_every=2)

    names = [f"{t:%Y%m%dT%H}" for t in NEW]
    assert summary["cycles"] == 3 and summary["clock"] == NEW[-1].isoformat()
    assert summary["published"] == names and summary["skipped"] == [] and summary["errors"] == []

    # (a) the truth grew by three times; the old times are untouched
    with xr.open_zarr(store, consolidated=False) as ds:
        after = ds.load()
    assert list(pd.DatetimeIndex(after["time"].values[-3:])) == NEW and after.sizes["time"] == before.sizes["time"] + 3
    assert after["done"].values[-3:].tolist() == [1, 1, 1]
    xr.testing.assert_identical(after.isel(time=slice(0, before.sizes["time"])).drop_attrs(), before.drop_attrs())
    xr.testing.assert_identical(xr.load_dataset(config.paths.stats_file), stats_before)

    # (b) the initial-conditions store holds the new cycles, the same planet as the truth
    assert set(NEW) <= set(complete_times(ic_store))
    with xr.open_zarr(ic_store, consolidated=False) as ic:
        assert ic.attrs["source"] == "synthetic-shallow-water"
        for name in config.task.variables:
            np.testing.assert_allclose(ic[name].sel(time=NEW).values, after[name].sel(time=NEW).values, rtol=1e-6)

    # (c) one run per arrival, each from the initial-conditions store at the planet's clock
    forecasts = config.paths.forecasts
    assert list_runs(forecasts) == [DEMO_RUN, *names]
    for t, name in zip(NEW, names, strict=True):
        prov = read_manifest(forecasts / name)["provenance"]
        assert prov["init_store_kind"] == "initial_conditions" and prov["init_source"] == "synthetic-shallow-water"
        assert prov["cycle"] == t.isoformat()

    # (d) every run is scored on exactly the leads whose truth has arrived by the last cycle
    assert summary["scored"] == sorted([DEMO_RUN, *names])
    for t, name in zip(NEW, names, strict=True):
        scores = json.loads((config.paths.verification / name / "scores.json").read_text())
        arrived = [h for h in (0, 6, 12) if t + pd.Timedelta(hours=h) <= NEW[-1]]
        assert [lead["lead_hours"] for lead in scores["leads"]] == arrived
        assert scores["pending_leads"] == [h for h in (0, 6, 12) if h not in arrived]
    demo_scores = json.loads((config.paths.verification / DEMO_RUN / "scores.json").read_text())
    assert [lead["lead_hours"] for lead in demo_scores["leads"]] == [0, 6, 12]

    # (e) the demo's model was made current, then one retrain (at the second cycle) was decided against it
    decisions = [json.loads(x) for x in (config.paths.runs / PROMOTIONS).read_text().splitlines()]
    demo_checkpoint = (config.paths.runs / "sfno-demo" / "checkpoint.pt").resolve()
    assert summary["seeded_current"] == str(config.paths.runs / "sfno-demo" / "checkpoint.pt")
    assert [d["decision"] for d in decisions][0] == "promoted" and decisions[0]["candidate"] == str(demo_checkpoint)
    dated = config.paths.runs / f"sfno-demo-{NEW[1]:%Y%m%dT%H}"
    assert len(decisions) == 2 and decisions[1]["candidate"] == str((dated / "checkpoint.pt").resolve())
    assert decisions[1]["decision"] in ("promoted", "refused")
    assert Path(decisions[1]["current"]).resolve() == demo_checkpoint
    assert summary["retrains"] == [{"run_name": dated.name, "decision": decisions[1]["decision"]}]
    assert summary["promotions"] == (decisions[1]["decision"] == "promoted")
    current = read_current(config.paths.runs)
    winner = dated if decisions[1]["decision"] == "promoted" else demo_checkpoint.parent
    assert current["run_name"] == winner.name
    # the third cycle ran the model current after the retrain
    third = read_manifest(forecasts / names[2])["provenance"]["checkpoint"]
    assert Path(third).resolve() == (winner / "checkpoint.pt").resolve()

    # nothing else changed: every file that existed is byte-identical, except the store's grown metadata and
    # shards, the rewritten stats (same values, checked above) and the journals, which only gained lines
    rewritten = ("data/analysis.zarr/", "data/analysis.zarr.lock", "data/stats.nc", "forecasts/.cycle.lock")
    files_after = files(root)
    for rel, digest in files_before.items():
        if rel.startswith(rewritten):
            continue
        assert rel in files_after, f"{rel} disappeared"
        if rel in APPENDED:
            assert (root / rel).read_bytes().startswith(journals[rel]), f"{rel} was rewritten, not appended to"
            continue
        assert files_after[rel] == digest, f"{rel} changed"
    new = sorted(set(files_after) - set(files_before))
    allowed = ("data/analysis.zarr/", "data/initial-conditions.zarr", "verification/", f"runs/{dated.name}/",
               *(f"forecasts/{n}/" for n in names),
               "runs/current.json", "runs/promotions.jsonl", "runs/.promotion.lock", "runs/registry.jsonl",
               "forecasts/cycles.jsonl")
    assert [rel for rel in new if not rel.startswith(allowed)] == []
