"""The ``ingest_era5`` Prefect flow against the CDS-protocol server: one task run per slab, a crash
that leaves one slab undone and a rerun that fetches only it (byte-identical to an uninterrupted
build), one failing slab not stopping the others, and Prefect's retry of a slab that failed once.

The real cdsapi client talks HTTP to ``tests/ingest/cds_server.py`` on 127.0.0.1; the flow runs
on Prefect's temporary test server, and what Prefect recorded is read back through its client.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pandas as pd
import pytest
from distributed import LocalCluster
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import TaskRun
from prefect.testing.utilities import prefect_test_harness

from core.config import Config
from ingest.check import check_store
from ingest.regions import done_flags
from pipelines import flows
from tests.ingest.cds_server import CdsServer, module_server_fixtures, request_times
from tests.ingest.conftest import tiny_config
from tests.ingest.test_append import tree_digest

log = logging.getLogger(__name__)

TIMES = pd.date_range("2000-01-01T00", "2000-01-02T18", freq="6h")  # 8 times, 4 slabs of 2
SLABS = [tuple(TIMES[i:i + 2]) for i in range(0, len(TIMES), 2)]
# Fail fast: one HTTP attempt, short pauses; Prefect's task retries are what is under test here.
# A small request budget keeps one job (and its requests) per slab, as these tests count them;
# packing across slabs is tests/ingest/test_packing.py's.
FAST_CDS = {"retry_max": 1, "sleep_max": 0.1, "timeout": 10.0, "max_fields_per_request": 6}


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=180):
        yield


# Deliveries on a 5.625° grid keep each slab's NetCDF small while still being regridded to the tiny grid;
# the reset after each test also drops a failure injected by fail_times().
server, _clean_server = module_server_fixtures(grid_deg=5.625)


def cds_config(root: Path, **ingest: object) -> tuple[Config, Path]:
    """A tiny-grid CDS ingest of TIMES in slabs of 2, written to ``root/config.yaml``."""
    return tiny_config(root, ingest={"source": "cds", "start": str(TIMES[0]), "end": str(TIMES[-1]),
                                     "slab_size": 2, "retries": 0, "cds": FAST_CDS, **ingest})


def fail_times(server: CdsServer, times: tuple[pd.Timestamp, ...]) -> None:
    """Make every job whose request covers any of ``times`` fail, until the test ends."""
    server.fail_jobs_covering(times, message="injected: this month is not available")


def requested_since(server: CdsServer, mark: int) -> list[tuple[pd.Timestamp, ...]]:
    """The times of each accepted submission after the first ``mark`` recorded calls, sorted."""
    calls = server.received[mark:]
    return sorted(tuple(request_times(r.request)) for r in calls if r.route == "submit" and r.status < 300)


def task_runs(flow_run_id: UUID) -> list[TaskRun]:
    """What Prefect's API recorded for the task runs of one flow run."""
    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def slab_runs(flow_run_id: UUID) -> list[TaskRun]:
    """The ``ingest-slab`` task runs of one flow run."""
    return [t for t in task_runs(flow_run_id) if t.name.startswith("ingest-slab-")]


@pytest.fixture(scope="module")
def reference(harness: None, server: CdsServer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted flow run: its config, state, the requests it sent and its store's bytes."""
    cfg, path = cds_config(tmp_path_factory.mktemp("reference"))
    mark = len(server.received)
    state = flows.ingest_era5(str(path), return_state=True)
    return {"config": cfg, "state": state, "requests": requested_since(server, mark),
            "digest": tree_digest(cfg.paths.analysis_store)}


def test_flow_runs_one_task_per_slab_and_builds_a_healthy_store(reference: dict) -> None:
    state, cfg = reference["state"], reference["config"]
    assert state.is_completed(), state
    runs = task_runs(state.state_details.flow_run_id)
    slabs = [t for t in runs if t.name.startswith("ingest-slab-")]
    assert len(slabs) == len(SLABS)
    assert all(t.state_type.value == "COMPLETED" and t.run_count == 1 for t in slabs)
    assert {t.task_key.split("-")[0] for t in slabs} == {"slab_task"}
    assert [t.name.split("-")[1] for t in runs if t not in slabs] == ["statistics"]
    # One CDS request per slab, each exactly the slab's two times.
    assert reference["requests"] == sorted(SLABS)

    store = cfg.paths.analysis_store
    report = check_store(store)
    assert report.ok, report.report()
    assert done_flags(store).tolist() == [1] * len(TIMES)
    assert cfg.paths.stats_file.is_file()


def test_crash_leaves_one_slab_undone_and_the_rerun_fetches_only_it(
        reference: dict, server: CdsServer, tmp_path: Path) -> None:
    cfg, path = cds_config(tmp_path / "run")
    fail_times(server, SLABS[-1])
    state = flows.ingest_era5(str(path), return_state=True)
    assert state.is_failed(), state
    store = cfg.paths.analysis_store
    assert done_flags(store).tolist() == [1] * 6 + [0] * 2
    failed = [t for t in slab_runs(state.state_details.flow_run_id) if t.state_type.value != "COMPLETED"]
    assert len(failed) == 1 and failed[0].state_type.value == "FAILED"
    with pytest.raises(ValueError, match="not available"):
        state.result()

    server.__dict__.pop("_submit")  # the server is repaired
    mark = len(server.received)
    state = flows.ingest_era5(str(path), return_state=True)
    assert state.is_completed(), state
    assert requested_since(server, mark) == [SLABS[-1]]
    assert len(slab_runs(state.state_details.flow_run_id)) == 1
    assert check_store(store).ok
    assert tree_digest(store) == reference["digest"]


def test_one_failing_slab_does_not_stop_the_others(reference: dict, server: CdsServer, tmp_path: Path) -> None:
    cfg, path = cds_config(tmp_path / "run")
    fail_times(server, SLABS[1])
    state = flows.ingest_era5(str(path), return_state=True)
    assert state.is_failed(), state
    assert done_flags(cfg.paths.analysis_store).tolist() == [1, 1, 0, 0, 1, 1, 1, 1]


def test_on_dask_one_failing_slab_does_not_stop_the_others(
        reference: dict, server: CdsServer, tmp_path: Path) -> None:
    cfg, path = cds_config(tmp_path / "run")
    fail_times(server, SLABS[1])
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        state = flows.ingest_era5(str(path), overrides={"ingest": {"scheduler_address": cluster.scheduler_address}},
                                  return_state=True)
    assert state.is_failed(), state
    assert done_flags(cfg.paths.analysis_store).tolist() == [1, 1, 0, 0, 1, 1, 1, 1]
    states = sorted(t.state_type.value for t in slab_runs(state.state_details.flow_run_id))
    assert states == ["COMPLETED"] * 3 + ["FAILED"]


def test_a_slab_failing_once_is_retried_by_prefect(reference: dict, server: CdsServer, tmp_path: Path) -> None:
    cfg, path = cds_config(tmp_path / "run", retries=1)
    server.faults.push("failed", message="injected: transient failure")  # the first job only
    mark = len(server.received)
    state = flows.ingest_era5(str(path), return_state=True)
    assert state.is_completed(), state
    runs = slab_runs(state.state_details.flow_run_id)
    assert sorted(t.run_count for t in runs) == [1, 1, 1, 2]
    assert all(t.state_type.value == "COMPLETED" for t in runs)
    assert requested_since(server, mark) == sorted([SLABS[0], *SLABS])  # the first slab twice
    assert tree_digest(cfg.paths.analysis_store) == reference["digest"]


def test_a_slab_refused_for_good_is_not_retried_and_logs_no_traceback(
        reference: dict, server: CdsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg, path = cds_config(tmp_path / "run", retries=2)
    server.faults.push("rejected", message="injected: the request is too large")  # CDS refuses the first job
    with caplog.at_level(logging.INFO, logger="prefect"):
        state = flows.ingest_era5(str(path), return_state=True)
    assert state.is_failed(), state
    runs = slab_runs(state.state_details.flow_run_id)
    assert all(t.run_count == 1 for t in runs), [(t.name, t.run_count) for t in runs]  # retries=2, none used
    assert sum(t.state_type.value == "FAILED" for t in runs) == 1
    about = [r for r in caplog.records if "the request is too large" in r.getMessage()]
    assert about, "the refusal was not logged"
    assert all(r.exc_info is None and not r.exc_text for r in about)  # one line each: no traceback
