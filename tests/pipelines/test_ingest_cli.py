"""``spherecast ingest`` and ``spherecast data`` from the command line, against the CDS-protocol server.

What a user types: ``--plan`` (a request table, nothing written), a Dask LocalCluster
(``--workers 2``) or an existing scheduler (``--scheduler-address``) giving the same bytes as one
worker, ``data inspect|check`` on a healthy and a damaged store, bad inputs (exit 2, one message,
nothing touched), and the daily ``--append``: the store grows to the newest time CDS serves, those
times arrive as ERA5T and are replaced once final ERA5 is published, and a lost date is re-fetched.
"""

from __future__ import annotations

import logging
import shutil
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml
import zarr
from distributed import LocalCluster
from prefect.testing.utilities import prefect_test_harness

from core.config import Config
from ingest import plan as plan_module
from ingest.build import ingest
from ingest.check import check_store
from ingest.regions import read_flags

# Loaded at collection rather than first inside a test: Prefect binds its console log handler to
# the sys.stderr of the moment it first loads, and a capsys stream is closed after its test.
from pipelines import flows  # noqa: F401
from pipelines.cli import main
from tests.ingest.cds_server import CdsServer, module_server_fixtures, request_times
from tests.ingest.conftest import tiny_config
from tests.ingest.shards import drop_chunk, stored_chunks
from tests.ingest.test_append import tree_digest
from tests.ingest.test_cds import oracle

log = logging.getLogger(__name__)

TIMES = pd.date_range("2000-01-01T00", "2000-01-02T18", freq="6h")  # 8 times, 4 slabs of 2
# A small request budget keeps one job (and its requests) per slab, as these tests count them;
# packing across slabs is tests/ingest/test_packing.py's.
FAST_CDS = {"retry_max": 1, "sleep_max": 0.1, "timeout": 10.0, "max_fields_per_request": 6}
GRID_DEG = 5.625  # the server's delivery grid: small files, still regridded to the tiny grid
VARS = ["geopotential", "u_component_of_wind", "v_component_of_wind"]


server, _clean_server = module_server_fixtures(grid_deg=GRID_DEG)


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    """Prefect's temporary server, for the commands that run the ``ingest_era5`` flow."""
    with prefect_test_harness(server_startup_timeout=180):
        yield


def cds_config(root: Path, **ingest_: object) -> tuple[Config, Path]:
    """A tiny-grid CDS ingest of TIMES in slabs of 2, written to ``root/config.yaml``."""
    return tiny_config(root, ingest={"source": "cds", "start": str(TIMES[0]), "end": str(TIMES[-1]),
                                     "slab_size": 2, "retries": 0, "cds": FAST_CDS, **ingest_})


def submitted_since(server: CdsServer, mark: int) -> list[tuple[pd.Timestamp, ...]]:
    """The times of each accepted CDS submission after the first ``mark`` recorded calls, sorted."""
    calls = server.received[mark:]
    return sorted(tuple(request_times(r.request)) for r in calls if r.route == "submit" and r.status < 300)


def error_lines(err: str) -> list[str]:
    """The CLI's own error lines in captured stderr (Prefect logs its tracebacks there too)."""
    return [line for line in err.splitlines() if line.startswith("spherecast: error:")]


@pytest.fixture(scope="module")
def reference(server: CdsServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, dict[str, str]]:
    """A store built by one worker in this process (no Prefect), and its bytes."""
    cfg, _ = cds_config(tmp_path_factory.mktemp("reference"))
    ingest(cfg, progress=False)
    return cfg, tree_digest(cfg.paths.analysis_store)


# -- --plan, data inspect|check ------------------------------------------------------------------

def test_plan_prints_the_cds_request_table_and_writes_nothing(server: CdsServer, tmp_path: Path, capsys) -> None:
    cfg, path = cds_config(tmp_path / "run")
    mark = len(server.received)
    assert main(["ingest", "--plan", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"store {cfg.paths.analysis_store} (new), source era5-cds" in out
    assert "period 2000-01-01T00 .. 2000-01-02T18, 8 times, slabs of 2" in out
    assert "to write: 4 slabs (8 times)" in out
    rows = [line for line in out.splitlines() if "reanalysis-era5-pressure-levels" in line and "→" in line]
    assert [row.split()[2] for row in rows] == ["2000-01-01T00→2000-01-01T06", "2000-01-01T12→2000-01-01T18",
                                                "2000-01-02T00→2000-01-02T06", "2000-01-02T12→2000-01-02T18"]
    assert "total: 4 requests (4 reanalysis-era5-pressure-levels), 24 fields" in out
    assert not cfg.paths.data.exists()
    assert server.received[mark:] == []  # planning never talks to CDS


def test_no_prefect_builds_the_same_store_in_process(server: CdsServer, reference, tmp_path: Path, capsys,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import pipelines.cli as cli

    monkeypatch.setattr(cli, "prefect_environment", lambda: pytest.fail("--no-prefect must not set up Prefect"))
    cfg, path = cds_config(tmp_path / "run")
    assert main(["ingest", "--no-prefect", "--config", str(path)]) == 0
    assert f"{cfg.paths.analysis_store}: 4 slabs written, 0 already done" in capsys.readouterr().out
    assert tree_digest(cfg.paths.analysis_store) == reference[1]  # byte for byte the one path's store
    assert cfg.paths.stats_file.is_file()
    mark = len(server.received)
    assert main(["ingest", "--no-prefect", "--config", str(path)]) == 0
    assert "0 slabs written, 4 already done" in capsys.readouterr().out
    assert submitted_since(server, mark) == []


def test_data_inspect_and_check_a_healthy_then_damaged_store(reference, tmp_path: Path, capsys) -> None:
    cfg, _ = reference
    store = tmp_path / "analysis.zarr"
    shutil.copytree(cfg.paths.analysis_store, store)
    assert main(["data", "inspect", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "period 2000-01-01T00 .. 2000-01-02T18, 8 times every 6 h" in out
    for name in VARS:
        assert f"    {name} [" in out and "at 500 hPa" in out
    assert "done 8 of 8 times" in out and "missing: none" in out and "preliminary (ERA5T): none" in out
    assert main(["data", "check", "--store", str(store)]) == 0
    assert capsys.readouterr().out.startswith(f"store {store}: OK")

    shard = drop_chunk(store, "geopotential", 3)  # the chunk of 2000-01-01T18, from the shard of times 2–3
    for quick in ([], ["--quick"]):
        assert main(["data", "check", "--store", str(store), *quick]) == 1
        report = capsys.readouterr().out
        assert report.startswith(f"store {store}: 1 problem(s)")
        assert (f"PROBLEM geopotential at 2000-01-01T18: chunk 1 of shard geopotential/{shard.name} is missing "
                "though the time is done") in report


# -- bad inputs: exit 2, one message, nothing touched ----------------------------------------------

@pytest.mark.parametrize(("args", "config", "needle"), [
    (["--start", "2000-01-03", "--end", "2000-01-01"], {}, "ingest.end 2000-01-01 00:00:00 is before ingest.start"),
    ([], {"task": {"variables": ["geopotential", "vorticity"]}}, "unknown variable 'vorticity'"),
    (["--plan", "--start", "1939-12-31T00"], {}, "before ERA5's first time 1940-01-01T00"),
])
def test_bad_input_exits_2_with_one_message_and_touches_nothing(
        server: CdsServer, tmp_path: Path, capsys, args: list[str], config: dict, needle: str) -> None:
    cfg, path = cds_config(tmp_path / "run")
    if config:  # a config file that does not validate, as a user would write it
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **config}))
    mark = len(server.received)
    assert main(["ingest", "--config", str(path), *args]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and needle in lines[0], lines
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml"]
    assert server.received[mark:] == []


def test_period_before_1940_is_refused_before_anything_is_written(
        harness: None, server: CdsServer, tmp_path: Path, capsys) -> None:
    cfg, path = cds_config(tmp_path / "run")
    assert main(["ingest", "--config", str(path), "--start", "1939-12-31T00"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "before ERA5's first time 1940-01-01T00" in lines[0], lines
    assert not cfg.paths.data.exists()


# -- Dask ------------------------------------------------------------------------------------------

def test_two_local_dask_workers_write_the_same_bytes(
        harness: None, reference, server: CdsServer, tmp_path: Path, capsys, caplog) -> None:
    cfg, path = cds_config(tmp_path / "run")
    mark = len(server.received)
    caplog.set_level(logging.INFO, logger="ingest.parallel")
    assert main(["ingest", "--config", str(path), "--workers", "2"]) == 0
    assert "dask LocalCluster with 2 workers" in caplog.messages
    assert capsys.readouterr().out.strip().endswith(str(cfg.paths.analysis_store))
    assert len(submitted_since(server, mark)) == 4
    assert tree_digest(cfg.paths.analysis_store) == reference[1]


def test_an_existing_scheduler_does_the_work_and_writes_the_same_bytes(
        harness: None, reference, tmp_path: Path, capsys) -> None:
    cfg, path = cds_config(tmp_path / "run")
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        assert main(["ingest", "--config", str(path), "--scheduler-address", cluster.scheduler_address]) == 0
        # The scheduler the test owns computed every slab job.
        assert cluster.scheduler.task_prefixes["ingest_slab"].state_counts["memory"] == 4
    assert tree_digest(cfg.paths.analysis_store) == reference[1]


@pytest.fixture
def resetting_port() -> Iterator[int]:
    """A port on 127.0.0.1 where something accepts connections and drops them at once."""
    sock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stop.set()
    sock.close()


def test_an_unreachable_scheduler_is_one_clear_error(
        harness: None, server: CdsServer, resetting_port: int, tmp_path: Path, capsys) -> None:
    cfg, path = cds_config(tmp_path / "run")
    address = f"tcp://127.0.0.1:{resetting_port}"
    mark = len(server.received)
    assert main(["ingest", "--config", str(path), "--scheduler-address", address]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and f"cannot reach the Dask scheduler at '{address}'" in lines[0], lines
    assert submitted_since(server, mark) == []
    assert not cfg.paths.analysis_store.exists()  # the scheduler is contacted before the store is created


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never says a word (e.g. a wrong service)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock.getsockname()[1]
    sock.close()


def test_a_scheduler_that_never_answers_fails_in_bounded_time(
        silent_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from ingest import parallel

    monkeypatch.setattr(parallel, "SCHEDULER_TIMEOUT", 2.0)
    cfg, _ = cds_config(tmp_path / "run")
    began = time.monotonic()
    with pytest.raises(ValueError, match=f"cannot reach the Dask scheduler at 'tcp://127.0.0.1:{silent_port}'"):
        with parallel.slab_executor(1, f"tcp://127.0.0.1:{silent_port}"):
            pass
    assert time.monotonic() - began < 30
    assert not cfg.paths.analysis_store.exists()


# -- the daily append, ERA5T -> final ---------------------------------------------------------------

NOW = pd.Timestamp("2000-01-08T03")  # CDS serves up to NOW - 5 days = 2000-01-03T03, so 2000-01-03T00 at 6 h


@pytest.fixture
def cds_now(monkeypatch: pytest.MonkeyPatch) -> Callable[..., pd.Timestamp]:
    """Freeze CDS's "now" (ingest.cds reads it through ingest.plan)."""
    real = plan_module.latest_available

    def frozen(now: pd.Timestamp | None = None) -> pd.Timestamp:
        return real(NOW if now is None else now)

    monkeypatch.setattr(plan_module, "latest_available", frozen)
    return frozen


def assert_values_from(store: Path, indices: list[int], seed: int) -> None:
    """The stored fields at ``indices`` are the server's fields of ``seed``, regridded to the tiny grid."""
    with xr.open_zarr(store, consolidated=True) as ds:
        times = pd.DatetimeIndex(ds["time"].values[indices])
        got = ds[VARS].isel(time=indices).load()
    want = oracle(times, VARS, [500], grid_deg=GRID_DEG, seed=seed)
    for name in VARS:
        np.testing.assert_allclose(got[name].values, want[name].values, rtol=1e-6, err_msg=f"{name} seed {seed}")


def test_daily_append_grows_to_the_newest_time_then_replaces_era5t_by_final(
        harness: None, server: CdsServer, cds_now, tmp_path: Path, capsys) -> None:
    cfg, path = cds_config(tmp_path / "run", end="2000-01-01T18")
    store = cfg.paths.analysis_store
    assert main(["ingest", "--config", str(path)]) == 0
    old = stored_chunks(store)
    server.set_era5t(pd.Timestamp("2000-01-02T00"))  # later times are still ERA5T (expver 5)

    # --plan --append says what the append will do, and does nothing.
    before = tree_digest(store)
    assert main(["ingest", "--config", str(path), "--plan", "--append"]) == 0
    out = capsys.readouterr().out
    assert "append: extend the period to 2000-01-03T00" in out and "to write: 3 slabs (5 times)" in out
    assert tree_digest(store) == before

    mark = len(server.received)
    assert main(["ingest", "--config", str(path), "--append"]) == 0
    times = pd.date_range("2000-01-01T00", "2000-01-03T00", freq="6h")
    new = times[4:]
    assert submitted_since(server, mark) == [tuple(new[0:2]), tuple(new[2:4]), tuple(new[4:])]
    flags = read_flags(store)
    assert pd.DatetimeIndex(flags["time"].values).equals(times)
    assert flags["done"].values.tolist() == [1] * 9
    assert flags["expver"].values.tolist() == [1] * 5 + [5] * 4
    assert {k: v for k, v in stored_chunks(store).items() if k in old} == old  # no old chunk changed
    capsys.readouterr()
    assert main(["data", "inspect", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "done 9 of 9 times" in out and "preliminary (ERA5T): 2000-01-02T06 .. 2000-01-03T00 (4 times)" in out
    appended = tree_digest(store)

    # A lost date (its done flag cleared) is fetched again, alone; ERA5T still ERA5T: nothing replaced.
    zarr.open_array(str(store / "done"), mode="r+")[1] = 0
    mark = len(server.received)
    assert main(["ingest", "--config", str(path), "--append"]) == 0
    # Only ERA5T times (not the final 2000-01-02T00 that shares their first slab), and of those only
    # the oldest slab's: it is still ERA5T, so no later time can be final yet (ingest.recheck_probe_oldest).
    assert submitted_since(server, mark) == sorted([tuple(times[1:2]), tuple(new[1:2])])
    assert tree_digest(store) == appended

    # Final ERA5 is published (with values that differ from ERA5T): the preliminary times are
    # re-fetched and replaced, and nothing else is rewritten.
    server.set_era5t(None)
    server.seed = 1
    kept = {k: v for k, v in stored_chunks(store).items() if k[1] not in range(5, 9)}
    mark = len(server.received)
    assert main(["ingest", "--config", str(path), "--append"]) == 0
    # The oldest slab's ERA5T time came back final, so the rest follow, in exact CDS requests
    # (one day × hour block per hour set).
    assert submitted_since(server, mark) == sorted([tuple(new[1:2]), tuple(new[2:4]), tuple(new[4:])])
    flags = read_flags(store)
    assert flags["expver"].values.tolist() == [1] * 9
    assert flags["replaced"].values.tolist() == [0] * 5 + [1] * 4
    assert {k: v for k, v in stored_chunks(store).items() if k in kept} == kept
    assert_values_from(store, list(range(5, 9)), seed=1)
    assert_values_from(store, list(range(0, 5)), seed=0)
    capsys.readouterr()
    assert main(["data", "inspect", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "preliminary (ERA5T): none" in out and "replaced by final ERA5: 4 times" in out
    assert check_store(store).ok
