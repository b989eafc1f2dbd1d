"""Per-cycle forecast runs through Prefect: one run per initial time, no overlap, kill and retry,
the late policy, waiting for initial conditions, backfill, and each bad input refused with nothing
published.

A tiny SFNO is trained once in-process; runs go through the real flows on Prefect's temporary test
server. Concurrent triggers are real ``spherecast forecast`` subprocesses talking to that server,
and the killed writer is a real subprocess killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
import zarr
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

from core.config import Config, load_config
from core.runs import list_runs, read_manifest
from core.testing import analysis_dataset
from pipelines import flows
from pipelines.cli import main
from pipelines.cycles import JOURNAL, LOCK_FILE, CycleLockTimeout, _prefect_slot, file_lock, read_journal
from tests.models.conftest import moving_planet, tiny_config, write_data

REPO = Path(__file__).resolve().parents[2]
LAST = pd.Timestamp("2000-01-20T18")  # newest time of moving_planet()


@pytest.fixture(scope="module")
def harness() -> Iterator[str]:
    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny trained checkpoint and the data directory it was trained on."""
    import torch

    from models.train import train

    root = tmp_path_factory.mktemp("trained")
    write_data(root, moving_planet())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        checkpoint = train(tiny_config(root, max_steps=4))
    finally:
        torch.set_num_threads(threads)
    return checkpoint, root / "data"


def make_config(tmp_path: Path, trained: tuple[Path, Path], data_dir: Path | None = None, **forecast: Any) -> Path:
    """A config file forecasting 6 h from the trained checkpoint into ``tmp_path/forecasts``."""
    checkpoint, data = trained
    doc = {"paths": {"root": str(tmp_path), "data_dir": str(data_dir or data)}, "grid": {"preset": "tiny"},
           "train": {"mlflow_tracking_uri": "https://ops:s3cret@mlflow.example"},  # must not be published
           "forecast": {"checkpoint": str(checkpoint), "lead_hours": 6, "init_time": "2000-01-18T00",
                        "wait_minutes": 0, "poll_seconds": 0.2, **forecast}}
    path = tmp_path / "spherecast.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def cfg(path: Path) -> Config:
    return load_config(path, env={})


def child_env(api_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPHERECAST_")}
    env.update(PREFECT_API_URL=api_url, PYTHONPATH=str(REPO), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", OMP_NUM_THREADS="1")
    return env


def copy_data(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_two_triggers_at_once_publish_one_run_and_never_overlap(tmp_path: Path, trained, harness: str) -> None:
    path = make_config(tmp_path, trained)
    cmd = [sys.executable, "-m", "pipelines.cli", "forecast", "--config", str(path)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=child_env(harness), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    lines = sorted(out.strip().splitlines()[-1] for out, _ in outs)
    run = tmp_path / "forecasts" / "20000118T00"
    assert lines == [f"already published (nothing done; --force replaces it): {run}", f"published {run}"]
    assert list_runs(tmp_path / "forecasts") == ["20000118T00"]
    journal = read_journal(tmp_path / "forecasts")
    assert sorted(e["action"] for e in journal) == ["existing", "published"]
    first, second = sorted(journal, key=lambda e: e["acquired"])
    assert first["action"] == "published" and first["released"] <= second["acquired"]  # one after the other
    assert {first["pid"], second["pid"]} == {p.pid for p in procs}


def test_a_run_waits_for_the_prefect_slot_held_elsewhere(tmp_path: Path, trained, harness: str) -> None:
    path = make_config(tmp_path, trained)
    released: list[float] = []
    holding = threading.Event()

    def hold() -> None:
        with _prefect_slot(30):
            holding.set()
            time.sleep(3)
            released.append(time.time())

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(60)
    result = flows.run_forecast(str(path))
    holder.join()
    assert result["action"] == "published"
    entry, = read_journal(tmp_path / "forecasts")
    assert entry["acquired"] >= released[0]


def test_the_file_lock_holds_without_a_server(tmp_path: Path) -> None:
    code = ("import sys, time; from pathlib import Path; from pipelines.cycles import file_lock\n"
            "with file_lock(Path(sys.argv[1]), 5):\n    print('held', flush=True); sys.stdin.readline()\n")
    lock = tmp_path / LOCK_FILE
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock)], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(CycleLockTimeout, match=f"held by pid {proc.pid} on "):
            with file_lock(lock, 0.5, poll_s=0.1):
                pass
    finally:
        proc.stdin.close()
        proc.wait(30)
    with file_lock(lock, 5):
        pass


KILLED = """
import sys, time
import models.ensemble as ensemble
import pipelines.tasks as tasks
from core.config import load_config

real = ensemble.stream_forecast  # one member: the cycle's stream_ensemble writes through it

def paused(*args, **kwargs):
    def on_lead(k):
        print(f"lead {k}", flush=True)
        if k == 1:
            time.sleep(600)  # mid-write: lead 1 is in the staging store, the NetCDF and maps are not
    return real(*args, on_lead=on_lead, **kwargs)

ensemble.stream_forecast = paused
tasks.forecast_task.fn(load_config(sys.argv[1], env={}))
"""


def test_a_writer_killed_mid_write_publishes_nothing_and_the_retry_publishes(tmp_path: Path, trained,
                                                                             harness: str) -> None:
    path = make_config(tmp_path, trained)
    forecasts = tmp_path / "forecasts"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(path)], cwd=REPO, env=child_env(harness),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for want in ("lead 0", "lead 1"):
            line = proc.stdout.readline().strip()
            assert line == want, proc.stderr.read()[-3000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    staging = forecasts / f".tmp-20000118T00-{proc.pid}"
    assert staging.is_dir() and (staging / "forecast.zarr").is_dir()
    assert list_runs(forecasts) == [] and not (forecasts / "20000118T00").exists()
    result = flows.run_forecast(str(path))
    assert result["action"] == "published"
    assert list_runs(forecasts) == ["20000118T00"] and not staging.exists()
    entry, = read_journal(forecasts)
    assert entry["swept"] == [staging.name]
    assert [p.name for p in forecasts.iterdir() if p.name.startswith(".")] == [LOCK_FILE]


def test_late_policy_runs_only_the_newest_cycle_and_skips_it_when_too_old(tmp_path: Path, trained,
                                                                         harness: str) -> None:
    path = make_config(tmp_path, trained, init_time="latest", max_age_hours=24)
    forecasts = tmp_path / "forecasts"
    # Three days of cycles were missed; only the newest is caught up.
    result = flows.run_forecast(str(path), now=str(LAST + pd.Timedelta(hours=8)))
    assert result["action"] == "published" and result["run"] == "20000120T18"
    assert list_runs(forecasts) == ["20000120T18"]
    again = flows.run_forecast(str(path), now=str(LAST + pd.Timedelta(hours=9)))
    assert again["action"] == "existing"
    late = flows.run_forecast(str(path), now=str(LAST + pd.Timedelta(hours=30)))
    assert late["action"] == "skipped" and "30.0 h old, older than forecast.max_age_hours 24" in late["reason"]
    assert list_runs(forecasts) == ["20000120T18"]
    assert [e["action"] for e in read_journal(forecasts)] == ["published", "existing", "skipped"]
    manifest = read_manifest(forecasts / "20000120T18")
    prov = manifest["provenance"]
    assert (prov["init_store_kind"], prov["cycle"], prov["init_dataset_version"]) == (
        "analysis", "2000-01-20T18:00:00", "testing-0")
    assert "mlflow.example" in prov["config"]["train"]["mlflow_tracking_uri"]
    assert "s3cret" not in (forecasts / "20000120T18" / "manifest.json").read_text()


def write_ic_store(path: Path, start: str, periods: int, not_done: tuple[int, ...] = ()) -> None:
    ds = moving_planet(periods=periods)
    ds = ds.assign_coords(time=pd.date_range(start, periods=periods, freq="6h"))
    ds.attrs.update(source="opendata", dataset_version="opendata-test-1")
    ds["done"].values[list(not_done)] = 0
    ds.to_zarr(path, zarr_format=3, consolidated=False)


@pytest.mark.parametrize(("lag", "now"), [(0.0, "2000-01-21T06:15"), (7.0, "2000-01-21T13:30")])
def test_a_cycle_waits_for_live_initial_conditions_then_runs_from_them(tmp_path: Path, trained, harness: str,
                                                                      lag: float, now: str) -> None:
    # The 06 cycle is due: at 06:15 when analyses appear at once, at 13:30 when they appear 7 h late.
    path = make_config(tmp_path, trained, init_time="latest", wait_minutes=2, poll_seconds=0.5, ic_lag_hours=lag)
    doc = yaml.safe_load(path.read_text())
    doc["initial_conditions"] = {"source": "synthetic"}
    doc["paths"]["data_dir"] = str(copy_data(trained[1], tmp_path / "data"))
    path.write_text(yaml.safe_dump(doc))
    ic = cfg(path).paths.initial_conditions_store
    write_ic_store(ic, "2000-01-21T00", 2, not_done=(1,))  # 21T00 done, 21T06 being written

    def arrive() -> None:
        time.sleep(2)
        zarr.open_array(str(ic / "done"), mode="r+")[1] = 1

    writer = threading.Thread(target=arrive)
    writer.start()
    result = flows.run_forecast(str(path), now=now)
    writer.join()
    assert result["action"] == "published" and result["run"] == "20000121T06"
    prov = read_manifest(tmp_path / "forecasts" / "20000121T06")["provenance"]
    assert (prov["init_store_kind"], prov["init_source"], prov["init_dataset_version"]) == (
        "initial_conditions", "opendata", "opendata-test-1")
    assert prov["init_store"] == str(ic) and prov["ensemble_members"] == 1


def test_an_explicit_init_that_never_arrives_fails_after_the_bounded_wait(tmp_path: Path, trained,
                                                                         harness: str) -> None:
    path = make_config(tmp_path, trained, init_time="2000-01-25T00", wait_minutes=0.02, poll_seconds=0.3)
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"init time 2000-01-25T00:00:00 has no complete data in .* after "
                                         r"waiting 0.02 min \(\d+ checks\)"):
        flows.run_forecast(str(path))
    assert time.monotonic() - started >= 1.0
    assert not (tmp_path / "forecasts").exists()


def test_backfill_runs_each_cycle_once_and_force_replaces(tmp_path: Path, trained, harness: str) -> None:
    path = make_config(tmp_path, trained)
    forecasts = tmp_path / "forecasts"
    flows.run_forecast(str(path))  # 18T00 already published
    before = read_manifest(forecasts / "20000118T00")["created"]
    results = flows.backfill_forecasts("2000-01-18T00", "2000-01-18T18", str(path))
    assert [r["action"] for r in results] == ["existing", "published", "published", "published"]
    assert list_runs(forecasts) == ["20000118T00", "20000118T06", "20000118T12", "20000118T18"]
    assert read_manifest(forecasts / "20000118T00")["created"] == before
    forced = flows.backfill_forecasts("2000-01-18T00", "2000-01-18T00", str(path), force=True)
    assert [r["action"] for r in forced] == ["published"]
    assert read_manifest(forecasts / "20000118T00")["created"] != before
    with pytest.raises(ValueError, match=r"backfill: 1 of 2 cycles failed: 2000-01-21T00:00:00: init time "):
        flows.backfill_forecasts("2000-01-20T18", "2000-01-21T00", str(path))
    assert list_runs(forecasts)[-1] == "20000120T18"


def test_retention_after_each_run_keeps_the_newest(tmp_path: Path, trained, harness: str) -> None:
    path = make_config(tmp_path, trained, keep_runs=2)
    flows.backfill_forecasts("2000-01-19T00", "2000-01-19T18", str(path))
    assert list_runs(tmp_path / "forecasts") == ["20000119T12", "20000119T18"]
    assert read_journal(tmp_path / "forecasts")[-1]["retention_removed"] == ["20000119T06"]
    runs = cfg(path).paths.runs
    runs.mkdir(parents=True, exist_ok=True)
    (runs / "current.json").write_text("not json")  # a broken promotion record does not undo a publication
    result = flows.backfill_forecasts("2000-01-20T00", "2000-01-20T00", str(path))
    assert [r["action"] for r in result] == ["published"]
    assert "current.json is not a JSON object" in read_journal(tmp_path / "forecasts")[-1]["retention_error"]
    assert list_runs(tmp_path / "forecasts") == ["20000119T12", "20000119T18", "20000120T00"]


def test_status_reports_ok_then_late(tmp_path: Path, trained, harness: str, capsys) -> None:
    path = make_config(tmp_path, trained)
    assert main(["status", "--config", str(path)]) == 1
    assert capsys.readouterr().out.startswith("late: no published run")
    flows.run_forecast(str(path))
    assert main(["status", "--config", str(path)]) == 0
    assert capsys.readouterr().out.startswith("ok: newest run 20000118T00 (init 2000-01-18T00:00:00)")
    manifest = tmp_path / "forecasts" / "20000118T00" / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["created"] = (pd.Timestamp.now(tz="UTC") - pd.Timedelta(hours=7)).isoformat()
    manifest.write_text(json.dumps(doc))
    assert main(["status", "--config", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("late: newest run 20000118T00") and "7.0 h ago; allowed 6 h" in out
    from fastapi.testclient import TestClient

    from serve.app import app_from_config

    health = TestClient(app_from_config(cfg(path))).get("/health").json()
    assert health["status"] == "ok" and health["runs"] == 1  # the service is up; the schedule is late
    assert health["schedule"]["status"] == "late" and health["schedule"]["newest_run"] == "20000118T00"


@pytest.mark.parametrize(("args", "needle"), [
    (["--lead-hours", "7"], "forecast.lead_hours 7 is not a multiple of the time step task.time_step_hours 6 h"),
    (["--members", "0"], "forecast.ensemble.members must be ≥ 1, got 0"),
    (["--init-time", "2000-02-15T00"], "init time 2000-02-15T00:00:00 has no complete data in"),
    (["--backfill", "2000-01-18T03", "2000-01-19T00"], "backfill start 2000-01-18 03:00:00 is not on a 6-hourly cycle"),
])
def test_bad_requests_exit_2_and_publish_nothing(tmp_path: Path, trained, harness: str, capsys, args: list[str],
                                                 needle: str) -> None:
    path = make_config(tmp_path, trained)
    assert main(["forecast", "--config", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spherecast: error: ") and needle in err, err
    assert list_runs(tmp_path / "forecasts") == []


@pytest.mark.parametrize(("grid", "variables", "needle"), [
    ("5.625deg", ("geopotential", "u_component_of_wind", "v_component_of_wind"),
     "the model was trained on tiny (17x32) but the store's grid is 33x64"),
    ("tiny", ("geopotential", "u_component_of_wind"), "the store lacks channel(s) ['v_component_of_wind_500']"),
])
def test_a_checkpoint_incompatible_with_the_initial_conditions_publishes_nothing(
        tmp_path: Path, trained, harness: str, grid: str, variables: tuple[str, ...], needle: str) -> None:
    data = tmp_path / "other-data"
    data.mkdir()
    analysis_dataset(grid, start="2000-01-17T00", periods=8, variables=variables).to_zarr(
        data / "analysis.zarr", zarr_format=3, consolidated=False)
    path = make_config(tmp_path, trained, data_dir=data)
    with pytest.raises(ValueError) as info:
        flows.run_forecast(str(path))
    assert needle in str(info.value) and "checkpoint is incompatible with the initial conditions" in str(info.value)
    forecasts = tmp_path / "forecasts"
    assert list_runs(forecasts) == [] and not [p for p in forecasts.iterdir() if p.name.startswith(".tmp")]
    assert [e["action"] for e in read_journal(forecasts)] == ["failed"]
    assert (forecasts / JOURNAL).is_file()


def test_schedule_starts_server_worker_and_deployments_and_ctrl_c_stops_them(tmp_path: Path) -> None:
    import socket
    import urllib.request

    with socket.socket() as s:  # a free port for the server
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPHERECAST_", "PREFECT_API"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(REPO), PREFECT_UI_ENABLED="false")
    # SIGINT back to its default in the child: a suite started in the background of a non-interactive
    # shell inherits SIGINT ignored, and the Ctrl-C below would then never reach Python.
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "schedule", "--prefect-port", str(port)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops them" in line:
                break
        assert proc.poll() is None, "".join(lines)[-4000:]
        api = f"http://127.0.0.1:{port}/api"
        request = urllib.request.Request(f"{api}/deployments/filter", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            deployments = json.loads(r.read())
        assert {d["name"] for d in deployments} >= {"ingest-daily", "forecast-per-cycle", "train-weekly", "demo"}
        assert {d["work_pool_name"] for d in deployments} == {"spherecast-local"}
        request = urllib.request.Request(f"{api}/work_pools/spherecast-local/workers/filter", data=b"{}",
                                         method="POST", headers={"Content-Type": "application/json"})
        deadline = time.monotonic() + 120
        while True:  # the worker registers itself with its first heartbeat
            with urllib.request.urlopen(request, timeout=30) as r:
                if json.loads(r.read()):
                    break
            assert time.monotonic() < deadline, "no worker registered on spherecast-local"
            time.sleep(1)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        lines.append(out)
    assert proc.returncode == 0, "".join(lines)[-4000:]
    with pytest.raises(OSError):  # the server is gone with it
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5)
