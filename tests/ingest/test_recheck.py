"""The daily ERA5T re-check asks CDS for the preliminary times only, never for whole slabs.

A real store built by ``ingest`` from the CDS look-alike (the unmodified ``cdsapi`` client on
127.0.0.1) holds final times and ERA5T times in the same slabs. The re-check must request exactly
the ERA5T times (in as few exact CDS requests as the planner can make: no final time is pulled),
leave every final time's stored bytes as they were, keep a time the server still calls ERA5T
preliminary, and replace one it now delivers final. The planner's two exact ways of cutting a
month into CDS requests are checked against the server's own reading of a request.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

from core.config import Config
from core.schema import EXPVER_FINAL, EXPVER_PRELIMINARY
from core.testing import analysis_dataset
from ingest import plan as plan_module
from ingest.append import group_fetcher, recheck_region, recheck_regions, replace_times, store_lock
from ingest.build import ingest, source_for
from ingest.plan import plan_requests
from ingest.regions import open_store, preliminary_times, read_flags
from tests.ingest.cds_server import CdsServer, module_server_fixtures, request_times
from tests.ingest.conftest import tiny_config
from tests.ingest.shards import stored_chunks
from tests.ingest.test_append import built, tree_digest
from tests.ingest.test_cds import oracle

TIMES = pd.date_range("2000-01-01T00", "2000-01-05T06", freq="6h")  # 18 times, slabs of 4 (the last of 2)
ERA5T_AFTER = pd.Timestamp("2000-01-03T06")  # times 10..17 (03T12 .. 05T06) arrive as ERA5T
PRELIM = list(range(10, 18))
VARS = ["geopotential", "u_component_of_wind", "v_component_of_wind"]
GRID_DEG = 5.625
NOW = TIMES[-1] + pd.Timedelta(days=5)
FAST_CDS = {"retry_max": 1, "sleep_max": 0.1, "timeout": 10.0}


server, _clean_server = module_server_fixtures(grid_deg=GRID_DEG)


def era5t_store(root: Path, server: CdsServer) -> Config:
    """A store of TIMES from the server whose last 8 times are ERA5T."""
    cfg, _ = tiny_config(root, ingest={"source": "cds", "start": str(TIMES[0]), "end": str(TIMES[-1]),
                                       "slab_size": 4, "retries": 0, "cds": FAST_CDS})
    server.set_era5t(ERA5T_AFTER)
    ingest(cfg, progress=False)
    assert preliminary_times(cfg.paths.analysis_store).equals(TIMES[PRELIM])
    return cfg


def submitted(server: CdsServer, mark: int) -> list[list[pd.Timestamp]]:
    """The times of every accepted CDS submission after the first ``mark`` recorded calls."""
    return [request_times(r.request) for r in server.received[mark:] if r.route == "submit" and r.status < 300]


def recheck(cfg: Config, probe_oldest: bool = False) -> int:
    """One re-check pass of the whole store, as the daily append runs it (one job per region)."""
    path = cfg.paths.analysis_store
    fetch = group_fetcher(source_for(cfg), VARS, [500])
    with store_lock(path):
        return sum(recheck_region(path, open_store(path), fetch, where, probe_oldest=probe_oldest)
                   for where in recheck_regions(path, cfg.ingest.slab_size))


def assert_values(path: Path, indices: list[int], seed: int) -> None:
    with xr.open_zarr(path, consolidated=True) as ds:
        got = ds[VARS].isel(time=indices).load()
    want = oracle(TIMES[indices], VARS, [500], grid_deg=GRID_DEG, seed=seed)
    for name in VARS:
        np.testing.assert_allclose(got[name].values, want[name].values, rtol=1e-6, err_msg=f"{name} seed {seed}")


def test_recheck_requests_only_era5t_times_and_replaces_only_those_turned_final(
        server: CdsServer, tmp_path: Path) -> None:
    cfg = era5t_store(tmp_path / "run", server)
    path = cfg.paths.analysis_store

    # Still ERA5T everywhere: exactly the 8 preliminary times are asked for, in 2 exact requests
    # (12–18 UTC of the 3rd and 4th, 00–06 UTC of the 4th and 5th) where slabs would cost 10 times
    # and days 3; nothing is written.
    before, chunks = tree_digest(path), stored_chunks(path)
    mark = len(server.received)
    assert recheck(cfg) == 0
    asked = submitted(server, mark)
    assert sorted(t for times in asked for t in times) == list(TIMES[PRELIM])
    assert sorted(asked) == [[TIMES[10], TIMES[11], TIMES[14], TIMES[15]],
                             [TIMES[12], TIMES[13], TIMES[16], TIMES[17]]]
    assert tree_digest(path) == before

    # Final ERA5 (other values) arrives up to 04T06: times 10..13 are replaced, 14..17 stay ERA5T,
    # and no stored chunk of any other time changes.
    server.set_era5t(pd.Timestamp("2000-01-04T06"))
    server.seed = 1
    mark = len(server.received)
    assert recheck(cfg) == 4
    assert sorted(t for times in submitted(server, mark) for t in times) == list(TIMES[PRELIM])
    flags = read_flags(path)
    assert flags["expver"].values.tolist() == [EXPVER_FINAL] * 14 + [EXPVER_PRELIMINARY] * 4
    assert flags["replaced"].values.tolist() == [0] * 10 + [1] * 4 + [0] * 4
    assert flags["done"].values.tolist() == [1] * 18
    kept = {k: v for k, v in chunks.items() if k[1] not in range(10, 14)}
    assert {k: stored_chunks(path)[k] for k in kept} == kept
    assert_values(path, list(range(10, 14)), seed=1)
    assert_values(path, list(range(0, 10)) + list(range(14, 18)), seed=0)

    # The rest turns final: only 04T12 .. 05T06 are asked for this time, then nothing is left to ask.
    server.set_era5t(None)
    mark = len(server.received)
    assert recheck(cfg) == 4
    assert sorted(t for times in submitted(server, mark) for t in times) == list(TIMES[14:])
    assert preliminary_times(path).empty
    assert_values(path, list(range(14, 18)), seed=1)
    mark = len(server.received)
    assert recheck(cfg) == 0 and submitted(server, mark) == []


def test_probing_the_oldest_slab_first_stops_while_it_is_still_era5t(server: CdsServer, tmp_path: Path) -> None:
    cfg = era5t_store(tmp_path / "run", server)
    path = cfg.paths.analysis_store
    before = tree_digest(path)
    # The usual day: the oldest slab's ERA5T times (03T12, 03T18) are still ERA5T, so nothing later is asked.
    mark = len(server.received)
    assert recheck(cfg, probe_oldest=True) == 0
    assert submitted(server, mark) == [list(TIMES[10:12])]
    assert tree_digest(path) == before
    # Final ERA5 up to 04T06: the probe comes back final, the rest is fetched (in one plan), 4 replaced.
    server.set_era5t(pd.Timestamp("2000-01-04T06"))
    mark = len(server.received)
    assert recheck(cfg, probe_oldest=True) == 4
    asked = submitted(server, mark)
    assert asked[0] == list(TIMES[10:12]) and sorted(t for ts in asked[1:] for t in ts) == list(TIMES[12:18])
    assert preliminary_times(path).equals(TIMES[14:])
    # The next day the new oldest ERA5T slab (04T12, 04T18) is probed, and that is all.
    mark = len(server.received)
    assert recheck(cfg, probe_oldest=True) == 0
    assert submitted(server, mark) == [list(TIMES[14:16])]


def test_groups_are_batched_within_the_request_cost_limit(server: CdsServer, tmp_path: Path) -> None:
    cfg = era5t_store(tmp_path / "run", server)
    # 3 fields per time and a limit of 12 fields: no two of the slab groups (2, 4 and 2 times) fit
    # one batch together, so each is planned and downloaded alone, every request within the limit.
    small = cfg.model_copy(update={"ingest": cfg.ingest.model_copy(
        update={"cds": cfg.ingest.cds.model_copy(update={"max_fields_per_request": 12})})})
    server.set_era5t(None)
    mark = len(server.received)
    assert recheck(small) == 8
    asked = submitted(server, mark)
    assert sorted(t for times in asked for t in times) == list(TIMES[PRELIM])
    assert all(len(times) * len(VARS) <= 12 for times in asked)
    assert preliminary_times(cfg.paths.analysis_store).empty


def test_a_lost_date_is_fetched_again_alone_by_the_daily_append(
        server: CdsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = plan_module.latest_available
    # CDS's "now" frozen so that the newest time it serves is the store's last: no new times.
    monkeypatch.setattr(plan_module, "latest_available", lambda now=None: real(NOW if now is None else now))
    cfg = era5t_store(tmp_path / "run", server)
    path = cfg.paths.analysis_store
    whole = tree_digest(path)
    zarr.open_array(str(path / "done"), mode="r+")[1] = 0
    mark = len(server.received)
    ingest(cfg, progress=False, append=True)
    assert [TIMES[1]] in submitted(server, mark)
    assert tree_digest(path) == whole  # refetched to the same bytes; ERA5T still ERA5T, nothing replaced


def test_regions_respect_since_and_leave_slabs_being_written_alone(tmp_path: Path) -> None:
    ds = analysis_dataset(periods=16)
    expver = np.array([1, 1, 5, 5, 5, 1, 1, 1, 1, 5, 5, 5, 5, 5, 5, 5])
    path = built(tmp_path / "a.zarr", ds, 16, expver=expver)
    times = pd.DatetimeIndex(ds.time.values)
    assert recheck_regions(path, 4) == [slice(2, 16)]
    assert recheck_regions(path, 4, since=times[10]) == [slice(10, 16)]
    # Slab 2 (times 8..11) is being written by another job: its preliminary times wait, the
    # region breaks there, and slab 3's stay.
    assert recheck_regions(path, 4, busy=[slice(8, 12)]) == [slice(2, 5), slice(12, 16)]
    assert recheck_regions(path, 4, busy=[slice(12, 16)], since=times[10]) == [slice(10, 12)]
    with pytest.raises(ValueError, match="slab_size"):
        recheck_regions(path, 0)


def test_replace_times_writes_only_the_given_final_times(tmp_path: Path) -> None:
    first, final = analysis_dataset(periods=8, seed=0), analysis_dataset(periods=8, seed=1)
    path = built(tmp_path / "a.zarr", first, 8, expver=np.array([1, 1, 5, 5, 1, 5, 5, 5]))
    chunks = stored_chunks(path)
    index = np.array([2, 3, 5, 6, 7])
    fresh = final.isel(time=index).assign(expver=("time", np.array([1, 1, 1, 5, 1], np.int8)))
    with store_lock(path):
        store = open_store(path)
        assert replace_times(path, store, fresh, index) == 4
        with pytest.raises(ValueError, match="increasing"):
            replace_times(path, store, fresh, index[::-1])
        with pytest.raises(ValueError, match="do not match store region"):
            replace_times(path, store, fresh, np.array([1, 3, 5, 6, 7]))
    flags = read_flags(path)
    assert flags["expver"].values.tolist() == [1, 1, 1, 1, 1, 1, 5, 1]
    assert flags["replaced"].values.tolist() == [0, 0, 1, 1, 0, 1, 0, 1]
    store = open_store(path).load()
    for i in range(8):
        source = final if i in (2, 3, 5, 7) else first
        xr.testing.assert_identical(store[["geopotential"]].isel(time=i).drop_attrs(),
                                    source[["geopotential"]].isel(time=i).drop_attrs())
    assert {k: v for k, v in stored_chunks(path).items() if k[1] in (0, 1, 4, 6) and k[0] != "replaced"} == \
        {k: v for k, v in chunks.items() if k[1] in (0, 1, 4, 6)}


@pytest.mark.parametrize("seed", range(6))
def test_plan_is_exact_and_never_costs_more_requests_than_grouping_by_day(seed: int) -> None:
    rng = np.random.default_rng(seed)
    month = pd.date_range("2000-03-01T00", "2000-03-31T18", freq="6h")
    if seed < 3:  # a contiguous run, as preliminary times are
        a, b = sorted(rng.choice(len(month), 2, replace=False))
        times = list(month[a:b + 1])
    else:  # scattered times
        times = sorted(month[rng.random(len(month)) < 0.3])
    plan = plan_requests(times, ["geopotential", "2m_temperature"], [500, 850], 10_000, "netcdf")
    for req in plan:
        assert sorted(req.times) == request_times(req.request)  # the server reads what the plan says
    for dataset in {r.dataset for r in plan}:
        covered = sorted(t for r in plan if r.dataset == dataset for t in r.times)
        assert covered == sorted(times)  # every time once, nothing else
        by_day = {tuple(sorted({t.hour for t in times if t.day == d})) for d in {t.day for t in times}}
        days_per_hourset = len(by_day)  # the number of requests grouping days by hour set costs
        assert sum(r.dataset == dataset for r in plan) <= days_per_hourset


def test_plan_of_a_run_across_days_takes_two_requests_not_three() -> None:
    run = list(pd.date_range("2000-01-03T12", "2000-01-05T06", freq="6h"))
    plan = plan_requests(run, ["geopotential"], [500], 10_000, "netcdf")
    assert [(r.request["day"], r.request["time"]) for r in plan] == [
        (["03", "04"], ["12:00", "18:00"]), (["04", "05"], ["00:00", "06:00"])]
