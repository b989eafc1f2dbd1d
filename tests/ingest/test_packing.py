"""CDS requests are packed across slabs; ``--plan`` lists exactly what is sent; downloads outlive a failed write.

A packed job joins the consecutive to-do slabs of one calendar month within one request's budget
(``ingest.cds.max_fields_per_request``) and fetches them with one ``fetch_groups`` call, so the
whole period costs what planning it in one go costs. Against the CDS look-alike (the real cdsapi
client on 127.0.0.1): the requests ``plan_ingest`` lists are the request bodies the server then
receives, for a new store and for a daily append with its ERA5T re-check; a write that fails with
ENOSPC keeps the deliveries, and the rerun sends no new submission.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from core.config import Config
from core.grid import get_grid
from ingest import plan as plan_module
from ingest.build import fetch_calls, ingest, pack_jobs, plan_ingest, source_for
from ingest.cds import CdsSource
from ingest.check import check_store
from ingest.plan import covered_fields, fields_per_time, format_plan, pack_slabs, plan_requests, plan_uncovered
from ingest.regions import done_flags, preliminary_times
from tests.ingest.cds_server import CdsServer, module_server_fixtures
from tests.ingest.conftest import tiny_config
from tests.ingest.faults import full_disk_after

# Four days across a month's end, slabs of one day: two jobs (January, February), one request each.
TIMES = pd.date_range("2000-01-30T00", "2000-02-02T18", freq="6h")
VARS = ["geopotential", "u_component_of_wind", "v_component_of_wind"]
GRID_DEG = 5.625
FAST_CDS = {"retry_max": 1, "sleep_max": 0.1, "timeout": 10.0}


server, _clean_server = module_server_fixtures(grid_deg=GRID_DEG)


def config_at(root: Path, end: pd.Timestamp = TIMES[-1], **cds: object) -> Config:
    cfg, _ = tiny_config(root, ingest={"source": "cds", "start": str(TIMES[0]), "end": str(end), "slab_size": 4,
                                       "workers": 1, "retries": 0, "cds": {**FAST_CDS, **cds}})
    return cfg


def planned(cfg: Config, append: bool = False) -> tuple[str, list[tuple[str, dict]]]:
    """``--plan``'s request table and the request bodies it stands for."""
    plan = plan_ingest(cfg, append=append)
    source = source_for(cfg)
    assert isinstance(source, CdsSource)
    send, _ = source.requests_for(fetch_calls(plan, source, cfg), VARS, [500])
    assert format_plan(send) in plan.describe()
    return plan.describe(), [(r.dataset, r.request) for r in send]


def test_four_years_at_the_default_config_cost_what_planning_them_at_once_costs() -> None:
    cfg = Config()  # 6-hourly, default variables and levels, slabs of 4 (one day)
    ing, task = cfg.ingest, cfg.task
    assert (task.time_step_hours, ing.slab_size) == (6, 4)
    times = pd.date_range("2020-01-01T00", "2023-12-31T18", freq="6h")
    slabs = [list(times[i:i + ing.slab_size]) for i in range(0, len(times), ing.slab_size)]
    now = pd.Timestamp("2025-01-01")
    mf, fmt = ing.cds.max_fields_per_request, ing.cds.data_format

    def cost(groups: list[list[pd.Timestamp]]) -> int:
        return sum(len(plan_requests(g, task.variables, task.levels, mf, fmt, now=now)) for g in groups)

    per_slab = cost(slabs)
    source = CdsSource(get_grid("tiny"), ing.cds, Path("unused"))
    jobs = source.pack_slabs(slabs, task.variables, task.levels)
    packed = cost([[t for k in job for t in slabs[k]] for job in jobs])
    whole = len(plan_requests(list(times), task.variables, task.levels, mf, fmt, now=now))
    assert (per_slab, len(jobs), packed, whole) == (1461, 48, 48, 48)  # a job per month, a request per job
    assert sorted(k for job in jobs for k in job) == list(range(len(slabs)))


def test_jobs_stay_within_a_month_and_the_request_budget() -> None:
    days = pd.date_range("2000-01-29T00", "2000-02-03T18", freq="6h")
    slabs = [list(days[i:i + 4]) for i in range(0, len(days), 4)]
    assert pack_slabs(slabs, 3, 10**6) == [[0, 1, 2], [3, 4, 5]]
    assert pack_slabs(slabs, 3, 24) == [[0, 1], [2], [3, 4], [5]]  # 8 times × 3 fields fit, 12 do not
    assert pack_slabs(slabs, 3, 5) == [[k] for k in range(6)]  # a slab above the budget stays alone
    assert fields_per_time(["geopotential", "2m_temperature"], [500, 850]) == 3
    with pytest.raises(ValueError, match="no times"):
        pack_slabs([[]], 3, 10)


def test_fields_held_by_any_delivery_are_not_requested_again() -> None:
    now = pd.Timestamp("2001-01-01")
    names, levels = ["geopotential", "2m_temperature"], [500, 850]
    (pressure, single) = plan_requests(list(TIMES[:8]), names, levels, 10**6, "netcdf", now=now)  # all of January
    held: dict = {}
    for name, req in (("p.nc", pressure), ("s.nc", single)):
        for f in covered_fields(req.dataset, req.request):
            held.setdefault(f, []).append(name)
    assert len(held) == 8 * 2 + 8
    # January is held whole: nothing to send; February is not: planned as plan_requests would.
    assert plan_uncovered(held, list(TIMES[4:8]), names, levels, 10**6, "netcdf") == ([], ["p.nc", "s.nc"])
    plan, used = plan_uncovered(held, list(TIMES[6:10]), names, levels, 10**6, "netcdf")
    assert plan == plan_requests(list(TIMES[8:10]), names, levels, 10**6, "netcdf", now=now) and used == ["p.nc", "s.nc"]
    # A delivery lacking a level does not count for that dataset: only the single level is reused.
    only_500 = {f: v for f, v in held.items() if f[2] != 850}
    plan, used = plan_uncovered(only_500, list(TIMES[:2]), names, levels, 10**6, "netcdf")
    assert [r.dataset for r in plan] == ["reanalysis-era5-pressure-levels"] and used == ["s.nc"]


def test_plan_lists_exactly_what_the_ingest_and_its_append_send(
        server: CdsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config_at(tmp_path / "run")
    table, bodies = planned(cfg)
    assert len(bodies) == 2 and "total: 2 requests" in table  # per slab it was 4
    server.set_era5t(TIMES[9])  # 01-31T12 onwards arrives as ERA5T
    mark = len(server.submissions())
    ingest(cfg, progress=False)
    assert server.submissions()[mark:] == bodies
    assert len(pack_jobs(plan_ingest(cfg), source_for(cfg), cfg)) == 0

    # The daily append: CDS now serves two more days, all of it final. The re-check of the ERA5T
    # times (probing the oldest slab first) and the new days' job are in the table, and sent.
    real = plan_module.latest_available
    now = TIMES[-1] + pd.Timedelta(days=2) + plan_module.ERA5T_LAG
    monkeypatch.setattr(plan_module, "latest_available", lambda at=None: real(now if at is None else at))
    server.set_era5t(None)
    table, bodies = planned(cfg, append=True)
    assert "re-check" in table and len(bodies) >= 3
    mark = len(server.submissions())
    report = ingest(cfg, progress=False, append=True)
    assert report.replaced == 6 and report.written == 2  # times 10..15; two new days
    assert server.submissions()[mark:] == bodies
    assert preliminary_times(cfg.paths.analysis_store).empty


def test_a_failed_write_keeps_the_downloads_and_the_rerun_sends_nothing_new(
        server: CdsServer, tmp_path: Path) -> None:
    cfg = config_at(tmp_path / "run", end=TIMES[7])  # January only: one job of two slabs, one request
    store, downloads = cfg.paths.analysis_store, cfg.paths.data / "downloads"
    _, bodies = planned(cfg)
    assert len(bodies) == 1
    mark = len(server.submissions())
    # The disk fills after the first slab's five shards (three fields, done, expver).
    with full_disk_after(store, 5) as refused, pytest.raises(OSError, match="No space left") as info:
        ingest(cfg, progress=False)
    assert refused() > 0 and f"{TIMES[4]:%Y-%m-%dT%H}" in str(info.value)
    assert done_flags(store).tolist() == [1] * 4 + [0] * 4
    assert server.submissions()[mark:] == bodies
    kept = sorted(p.name for p in downloads.iterdir())
    assert len(kept) == 2  # the delivery and its sidecar

    # The rerun plans nothing to send (the delivery on disk holds the missing day) and sends nothing.
    table, again = planned(cfg)
    assert again == [] and "reused: 1 completed deliveries" in table
    mark = len(server.submissions())
    report = ingest(cfg, progress=False)
    assert (report.written, report.skipped) == (1, 1)
    assert server.submissions()[mark:] == []
    assert list(downloads.iterdir()) == []  # written: now they go
    check = check_store(store, full=True, require_complete=True)
    assert check.ok, check.report()
