import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from core.grid import get_grid
from core.testing import analysis_dataset
from ingest.build import ingest, layout_for, plan_ingest
from ingest.check import describe_missing
from ingest.store import (
    StoreLayout,
    build_store,
    create_store,
    done_flags,
    missing_times,
    open_store,
    slabs_to_do,
    write_slab,
)
from tests.ingest.conftest import TINY, tiny_config
from tests.ingest.shards import stored_chunks

VARS = ("geopotential", "u_component_of_wind", "v_component_of_wind")


def tree_digest(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def layout_of(ds: xr.Dataset) -> StoreLayout:
    return StoreLayout(get_grid("tiny"), VARS, (500,), pd.DatetimeIndex(ds.time.values), "testing", "testing-0")


def test_template_plus_region_writes_equals_direct_write(tmp_path: Path) -> None:
    ds = analysis_dataset(periods=6)
    path = tmp_path / "a.zarr"
    create_store(path, layout_of(ds))
    assert not done_flags(path).any()
    store = open_store(path)
    assert np.isnan(store.geopotential.values).all()  # unwritten = fill, never zeros
    # out of order on purpose: regions are fixed, order must not matter
    for start in (4, 0, 2):
        write_slab(path, store, ds.isel(time=slice(start, start + 2)), start)
    back = open_store(path).load()
    xr.testing.assert_identical(back[list(VARS)].drop_attrs(), ds[list(VARS)].drop_attrs())
    assert back.done.values.tolist() == [1] * 6


def test_build_skips_done_slabs_and_reports(tmp_path: Path) -> None:
    ds = analysis_dataset(periods=6)
    path = tmp_path / "a.zarr"
    calls: list[list[pd.Timestamp]] = []

    def fetch(times):
        calls.append(times)
        idx = [int(np.where(ds.time.values == np.datetime64(t))[0][0]) for t in times]
        return ds.isel(time=idx)

    report = build_store(path, layout_of(ds), fetch, slab_size=4)
    assert (report.written, report.skipped) == (2, 0)
    assert [len(c) for c in calls] == [4, 2]
    again = build_store(path, layout_of(ds), fetch, slab_size=4)
    assert (again.written, again.skipped, len(calls)) == (0, 2, 2)
    assert slabs_to_do(np.array([1, 1, 0, 1, 1], bool), 2) == [slice(2, 4)]


def test_bad_slabs_change_nothing(tmp_path: Path) -> None:
    ds = analysis_dataset(periods=4)
    path = tmp_path / "a.zarr"
    create_store(path, layout_of(ds))
    store = open_store(path)
    before = tree_digest(path)
    bad = {
        "does not match the store's grid": analysis_dataset(grid="5.625deg", periods=2),
        "do not match store region": ds.isel(time=[1, 2]),
        "has NaN or Inf": ds.isel(time=[0, 1]).assign(geopotential=ds.geopotential.isel(time=[0, 1]) * np.nan),
        "has variables the store does not": analysis_dataset(periods=2, variables=VARS + ("2m_temperature",)),
    }
    for needle, slab in bad.items():
        with pytest.raises(ValueError, match=needle):
            write_slab(path, store, slab, 0)
    assert tree_digest(path) == before


def test_missing_times_are_reported_and_refetched_without_rewriting_done_ones(tmp_path: Path) -> None:
    ds = analysis_dataset(periods=8)
    path = tmp_path / "a.zarr"
    create_store(path, layout_of(ds))
    store = open_store(path)
    assert write_slab(path, store, ds.isel(time=[0, 1, 2]), 0) == 3  # slab 0..3 (of 4) left partly done
    write_slab(path, store, ds.isel(time=[6, 7]), 6)
    assert missing_times(path).equals(pd.DatetimeIndex(ds.time.values[3:6]))
    assert describe_missing(path) == "3 of 8 times missing: 2000-01-01T18 .. 2000-01-02T06 (3 times)"
    done_chunks = stored_chunks(path)
    assert sorted(done_chunks) == sorted((name, t) for name in VARS + ("done", "expver") for t in (0, 1, 2, 6, 7))
    calls: list[list[pd.Timestamp]] = []

    def fetch(times):
        calls.append(list(times))
        return ds.sel(time=pd.DatetimeIndex(times))

    report = build_store(path, layout_of(ds), fetch, slab_size=4)
    assert calls == [[pd.Timestamp(ds.time.values[3])], list(pd.DatetimeIndex(ds.time.values[4:6]))]
    assert (report.written, report.skipped) == (2, 0)
    # The refetched times joined the done ones' shards around them; every done chunk kept its bytes.
    assert {k: v for k, v in stored_chunks(path).items() if k in done_chunks} == done_chunks
    xr.testing.assert_identical(open_store(path)[list(VARS)].load().drop_attrs(), ds[list(VARS)].drop_attrs())
    # A slab over done times writes nothing: done values are never overwritten by a plain write.
    before = tree_digest(path)
    assert write_slab(path, open_store(path), analysis_dataset(periods=4, seed=3), 0) == 0
    assert tree_digest(path) == before


def test_mismatched_request_leaves_store_untouched(tiny) -> None:
    cfg, _ = tiny
    ingest(cfg, progress=False)
    path = cfg.paths.analysis_store
    before = tree_digest(path)
    other = cfg.model_copy(deep=True)
    other.ingest.synthetic.seed = 7
    with pytest.raises(ValueError, match="nothing was modified: dataset_version"):
        ingest(other, progress=False)
    # A longer period is an append (tests/ingest/test_append.py); another start is refused.
    other = cfg.model_copy(deep=True)
    other.ingest.start = pd.Timestamp("2000-01-01T06").to_pydatetime()
    with pytest.raises(ValueError, match="period") as info:
        ingest(other, progress=False)
    assert "start 2000-01-01 00:00:00 != 2000-01-01 06:00:00" in str(info.value)
    # An earlier end (a store appended past the config's end) keeps the store's period: nothing to do.
    other = cfg.model_copy(deep=True)
    other.ingest.end = pd.Timestamp("2000-01-03T18").to_pydatetime()
    report = ingest(other, progress=False)
    assert (report.written, report.total) == (0, report.skipped)
    assert tree_digest(path) == before
    st = xr.open_dataset(cfg.paths.stats_file)
    assert st.attrs["dataset_version"] == open_store(path).attrs["dataset_version"]
    assert st.attrs["period_end"] == "2000-01-02 18:00:00"


SCRIPT = "from core.config import load_config; from ingest.build import ingest; ingest(load_config({!r}), progress=False)"


def run_ingest(cfg_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT.format(str(cfg_path))], cwd=Path(__file__).parents[2],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


# Kill tests spend their time starting processes (torch, torch-harmonics) and spinning up the
# planet, so they use a shorter spin-up and period, and share one uninterrupted reference run.
LIGHT_INGEST = {"slab_size": 1, "end": "2000-01-02T18",
                "synthetic": dict(TINY["ingest"]["synthetic"], spinup_days=0.25)}
LIGHT_TRAIN = {"train_start": "2000-01-01", "train_end": "2000-01-01T18",
               "val_start": "2000-01-02", "val_end": "2000-01-02T18"}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory):
    cfg, cfg_path = tiny_config(tmp_path_factory.mktemp("ref"), ingest=LIGHT_INGEST, train=LIGHT_TRAIN)
    proc = run_ingest(cfg_path)  # runs beside the first interrupted build; waited for when compared
    yield proc, cfg.paths.analysis_store
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.stderr.close()


@pytest.mark.parametrize("kill_after", [1, 4])
def test_kill_minus_9_then_resume_is_byte_identical(tmp_path: Path, kill_after: int, reference_run) -> None:
    ref, ref_store = reference_run
    cut_cfg, cut_path = tiny_config(tmp_path / "cut", ingest=LIGHT_INGEST, train=LIGHT_TRAIN)
    proc = run_ingest(cut_path)
    store = cut_cfg.paths.analysis_store
    deadline = time.monotonic() + 120
    # The writer is stopped while its flags are read: on loaded cores a slow read let it finish the
    # build before the kill (CI once saw all 8 done), and the kill still lands mid-slab when it may.
    while time.monotonic() < deadline and proc.poll() is None:
        os.kill(proc.pid, signal.SIGSTOP)
        if (store / "zarr.json").exists() and done_flags(store).sum() >= kill_after:
            break
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    flags = done_flags(store)
    assert 0 < flags.sum() < flags.size, "the kill must land mid-build for this test to mean anything"
    resumed = run_ingest(cut_path)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    resumed.stderr.close()
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()
    assert done_flags(store).all() and flags.size == 8
    assert tree_digest(store) == tree_digest(ref_store)


def test_layout_from_config(tiny) -> None:
    cfg, _ = tiny
    layout = layout_for(cfg, "v", "s")
    assert len(layout.times) == 16 and layout.times[1] - layout.times[0] == pd.Timedelta(hours=6)


def test_slabs_follow_the_stores_shard_files_whatever_the_config_says_now(tmp_path: Path) -> None:
    config, _ = tiny_config(tmp_path / "run", ingest={"slab_size": 2})
    fresh = plan_ingest(config)
    assert fresh.slab_size == 2 and [s.stop - s.start for s in fresh.todo[:2]] == [2, 2]
    create_store(config.paths.analysis_store, fresh.layout, slab_size=4)  # built earlier with slabs of 4
    again = plan_ingest(config)
    assert again.slab_size == 4 and "slabs of 4" in again.describe()
    assert all(s.start % 4 == 0 and s.stop - s.start <= 4 for s in again.todo)
    assert sum(s.stop - s.start for s in again.todo) == len(fresh.layout.times)


def test_a_worker_reuses_its_opened_store_until_an_append_changes_it(tmp_path: Path) -> None:
    from ingest.append import extend_store
    from ingest.build import _cached_store

    ds = analysis_dataset(periods=4)
    path = tmp_path / "a.zarr"
    create_store(path, layout_of(ds))
    first = _cached_store(path)
    assert _cached_store(path) is first  # no re-open per slab
    extend_store(path, pd.Timestamp(ds.time.values[-1]) + pd.Timedelta(hours=12))
    grown = _cached_store(path)
    assert grown is not first and grown.sizes["time"] == 6  # the new times are seen, not a stale length
    with pytest.raises(ValueError, match="not an analysis store"):
        _cached_store(tmp_path / "nothing.zarr")
