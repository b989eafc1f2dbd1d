"""An append that fails at its source after the store's time axis was extended: with nothing new
written the extension is undone (the store byte-identical to before); with a slab written, the
written times stay and the rest is left "not done" for the rerun, which completes the store."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from core.config import Config
from core.errors import SourceError
from ingest.build import ingest
from ingest.check import check_store
from ingest.regions import done_flags
from tests.ingest.cds_server import CdsServer, module_server_fixtures
from tests.ingest.conftest import tiny_config
from tests.ingest.faults import tree_digest

DAY1 = pd.date_range("2000-01-01T00", periods=4, freq="6h")
DAY2, DAY3 = DAY1 + pd.Timedelta(days=1), DAY1 + pd.Timedelta(days=2)
VARS = ["geopotential", "u_component_of_wind", "v_component_of_wind"]
# 3 fields a time, 12 a slab of one day: a budget of 12 keeps one job (and one request) per day.
CDS = {"retry_max": 1, "sleep_max": 0.1, "timeout": 10.0, "max_fields_per_request": 12}

server, _clean_server = module_server_fixtures(grid_deg=5.625)


def config_to(root: Path, end: pd.Timestamp, **ingest: object) -> Config:
    """A tiny CDS ingest from 2000-01-01 to ``end`` in slabs of one day."""
    return tiny_config(root, ingest={"source": "cds", "start": str(DAY1[0]), "end": str(end), "slab_size": 4,
                                     "workers": 1, "retries": 0, "cds": CDS, **ingest},
                       task={"variables": VARS, "levels": [500]},
                       train={"train_start": "2000-01-01", "train_end": "2000-01-01T06",
                              "val_start": "2000-01-01T12", "val_end": "2000-01-01T18"})[0]


def refuse(server: CdsServer, day: pd.DatetimeIndex) -> None:
    """CDS rejects every job whose request covers a time of ``day``, until the test ends."""
    server.fail_jobs_covering(day, kind="rejected", message="injected: this day cannot be served")


@pytest.fixture
def day_one(tmp_path: Path, server: CdsServer) -> Config:
    config = config_to(tmp_path / "run", DAY1[-1])
    ingest(config, progress=False)
    return config


def test_an_append_failing_before_any_new_time_leaves_the_store_byte_identical(
        day_one: Config, server: CdsServer) -> None:
    store = day_one.paths.analysis_store
    before = tree_digest(store)
    refuse(server, DAY2)
    with pytest.raises(SourceError, match="this day cannot be served"):
        ingest(config_to(store.parents[1], DAY3[-1]), progress=False)
    assert tree_digest(store) == before  # the time axis and every metadata file as before the append
    assert done_flags(store).tolist() == [1] * 4


def test_an_append_failing_after_a_slab_keeps_it_and_the_rerun_completes(day_one: Config, server: CdsServer) -> None:
    store = day_one.paths.analysis_store
    refuse(server, DAY3)
    with pytest.raises(SourceError, match="this day cannot be served"):
        ingest(config_to(store.parents[1], DAY3[-1]), progress=False)
    assert done_flags(store).tolist() == [1] * 8 + [0] * 4  # day 2 written and kept; day 3 to do
    server.reset()  # CDS serves day 3 again
    report = ingest(config_to(store.parents[1], DAY3[-1]), progress=False)
    assert (report.written, report.skipped) == (1, 2)
    check = check_store(store, full=True, require_complete=True)
    assert check.ok, check.report()


def test_on_dask_a_failing_job_is_raised_only_after_the_others_have_written(
        day_one: Config, server: CdsServer) -> None:
    """A job already running on a worker cannot be cancelled: the error waits for it, so nothing writes after."""
    from distributed import LocalCluster

    store = day_one.paths.analysis_store
    end = DAY3[-1] + pd.Timedelta(days=2)  # days 2 to 5, one job each on two worker threads; day 3 refused
    refuse(server, DAY3)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        config = config_to(store.parents[1], end, scheduler_address=cluster.scheduler_address)
        with pytest.raises(SourceError, match="this day cannot be served"):
            ingest(config, progress=False)
        flags = done_flags(store).tolist()
    assert flags == [1] * 8 + [0] * 4 + [1] * 8  # days 1, 2, 4 and 5 written, day 3 left to do
    assert done_flags(store).tolist() == flags  # and nothing wrote after the error was raised
