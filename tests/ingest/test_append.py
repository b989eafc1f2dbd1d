"""Daily update of the analysis store: extend the period, then replace ERA5T by final ERA5."""

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from core.grid import get_grid
from core.schema import EXPVER_FINAL, EXPVER_PRELIMINARY
from core.testing import analysis_dataset
from ingest.store import (
    StoreLayout,
    build_store,
    check_layout,
    consolidate,
    create_store,
    extend_store,
    intent_path,
    missing_times,
    open_store,
    preliminary_times,
    read_flags,
    replace_preliminary,
    replace_slab,
    store_lock,
)
from tests.ingest.shards import stored_chunks

VARS = ("geopotential", "u_component_of_wind", "v_component_of_wind")
REPO = Path(__file__).resolve().parents[2]


def tree_digest(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def chunk_files(path: Path) -> dict[str, tuple[int, bytes]]:
    """Every chunk file of every array but the time coordinate: (mtime_ns, bytes)."""
    return {p.relative_to(path).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(path.rglob("*"))
            if p.is_file() and p.relative_to(path).parts[1:2] and p.relative_to(path).parts[1].startswith("c")
            and not p.relative_to(path).as_posix().startswith("time/")}


def layout(times, **changes) -> StoreLayout:
    base = dict(grid=get_grid("tiny"), variables=VARS, levels=(500,), times=pd.DatetimeIndex(times),
                source="testing", dataset_version="testing-0")
    return StoreLayout(**{**base, **changes})


def fetcher(ds: xr.Dataset, expver: np.ndarray | None = None, calls: list | None = None):
    def fetch(times):
        if calls is not None:
            calls.append(list(times))
        idx = ds.get_index("time").get_indexer(pd.DatetimeIndex(times))
        slab = ds.isel(time=idx)
        if expver is not None:
            slab = slab.assign(expver=("time", expver[idx].astype(np.int8)))
        return slab
    return fetch


def built(path: Path, ds: xr.Dataset, n: int, expver: np.ndarray | None = None) -> Path:
    build_store(path, layout(ds.time.values[:n]), fetcher(ds, expver), slab_size=4)
    return path


def test_extend_adds_undone_times_without_touching_a_data_chunk(tmp_path: Path) -> None:
    ds = analysis_dataset(periods=10)
    path = built(tmp_path / "a.zarr", ds, 6)
    before = chunk_files(path)
    chunks_before = stored_chunks(path)
    # Two shard files (times 0–3 and 4–5) of the fields, done and expver (replaced = 0 is the fill
    # value, not stored), and level/lat/lon; 6 times of chunks inside them.
    assert len(before) == 2 * (len(VARS) + 2) + 3
    assert sorted({t for _, t in chunks_before}) == list(range(6)) and len(chunks_before) == 6 * (len(VARS) + 2)
    assert extend_store(path, pd.Timestamp(ds.time.values[9])) == 4
    assert chunk_files(path) == before  # same files, same bytes, same mtimes: nothing rewritten or added
    store = open_store(path)
    assert store.sizes["time"] == 10 and not intent_path(path).exists()
    np.testing.assert_array_equal(store.time.values, ds.time.values)
    assert store.done.values.tolist() == [1] * 6 + [0] * 4
    assert store.expver.values.tolist() == [1] * 6 + [0] * 4
    assert np.isnan(store.geopotential.values[6:]).all()
    xr.testing.assert_identical(store[list(VARS)].isel(time=slice(0, 6)).load().drop_attrs(),
                                ds[list(VARS)].isel(time=slice(0, 6)).drop_attrs())
    assert missing_times(path).equals(pd.DatetimeIndex(ds.time.values[6:]))
    same = tree_digest(path)
    assert extend_store(path, pd.Timestamp(ds.time.values[9])) == 0 and tree_digest(path) == same

    # The next build writes only the new times, and the store equals one built for 10 times at once.
    calls: list = []
    report = build_store(path, layout(ds.time.values), fetcher(ds, calls=calls), slab_size=4)
    assert [len(c) for c in calls] == [2, 2] and report.skipped == 1
    # The full first shard is untouched; the second was completed around its stored chunks, whose
    # bytes are unchanged (the shard file is replaced atomically, so a crash keeps the old one).
    first_shards = {k: v for k, v in before.items() if k.split("/")[1].startswith("c.0")}
    assert {k: v for k, v in chunk_files(path).items() if k in first_shards} == first_shards
    assert {k: v for k, v in stored_chunks(path).items() if k in chunks_before} == chunks_before
    direct = built(tmp_path / "direct.zarr", ds, 10)
    assert tree_digest(path) == tree_digest(direct)


def test_extend_refuses_bad_ends_and_changes_nothing(tmp_path: Path) -> None:
    ds = analysis_dataset(periods=6)
    path = built(tmp_path / "a.zarr", ds, 6)
    before = tree_digest(path)
    end = pd.Timestamp(ds.time.values[-1])
    for new_end, needle in [(end - pd.Timedelta(hours=6), "already ends at"),
                            (end + pd.Timedelta(hours=3), "is not on the time axis"),
                            (end + pd.Timedelta(hours=6), "not 0 days 03:00:00")]:
        with pytest.raises(ValueError, match=needle):
            extend_store(path, new_end, step=pd.Timedelta(hours=3) if "03:00" in needle else None)
    assert tree_digest(path) == before and not intent_path(path).exists()


def test_layout_accepts_a_shorter_period_and_refuses_every_other_mismatch(tmp_path: Path) -> None:
    ds = analysis_dataset(periods=8)
    path = built(tmp_path / "a.zarr", ds, 6)
    store, times = open_store(path), pd.DatetimeIndex(ds.time.values)
    assert check_layout(store, layout(times), path) == 2
    assert check_layout(store, layout(times[:6]), path) == 0
    before = tree_digest(path)
    bad = {
        "grid tiny": layout(times, grid=get_grid("5.625deg")),
        "variables": layout(times, variables=VARS[:2]),
        "levels": layout(times, levels=(850,)),
        "dataset_version": layout(times, dataset_version="testing-1"),
        "start 2000-01-01 00:00:00 != 2000-01-01 06:00:00": layout(times[1:]),
        "step 0 days 06:00:00 != 0 days 03:00:00": layout(pd.date_range(times[0], periods=20, freq="3h")),
        "after the requested end": layout(times[:5]),
    }
    for needle, request in bad.items():
        with pytest.raises(ValueError, match="nothing was modified") as info:
            build_store(path, request, fetcher(ds), slab_size=4)
        assert needle in str(info.value)
    assert tree_digest(path) == before


KILL_EXTEND = """
import os, signal, sys
import pandas as pd
import zarr
import ingest.append as append
point, path, end = sys.argv[1], sys.argv[2], pd.Timestamp(sys.argv[3])
resize, calls = zarr.Array.resize, []

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def counted_resize(self, shape):
    calls.append(shape)
    if point == "before-first-resize":
        die()
    resize(self, shape)
    if point == "after-two-resizes" and len(calls) == 2:
        die()

zarr.Array.resize = counted_resize
if point == "before-consolidate":
    append.consolidate = lambda p: die()
append.extend_store(path, end)
"""


@pytest.mark.parametrize("point", ["before-first-resize", "after-two-resizes", "before-consolidate"])
def test_kill_minus_9_during_extend_then_rerun_is_byte_identical(tmp_path: Path, point: str) -> None:
    ds = analysis_dataset(periods=10)
    ref = built(tmp_path / "ref.zarr", ds, 6)
    cut = tmp_path / "cut.zarr"
    shutil.copytree(ref, cut)
    end = str(pd.Timestamp(ds.time.values[9]))
    assert extend_store(ref, pd.Timestamp(end)) == 4
    proc = subprocess.run([sys.executable, "-c", KILL_EXTEND, point, str(cut), end], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert intent_path(cut).exists(), "the kill must land mid-append for this test to mean anything"
    # Readers go through the consolidated metadata: they still see the old period, whole.
    assert open_store(cut).sizes["time"] == 6
    assert extend_store(cut, pd.Timestamp(end)) == 0  # taking the lock completed the pending append
    assert not intent_path(cut).exists()
    assert tree_digest(cut) == tree_digest(ref)


def test_era5t_is_replaced_by_final_and_final_is_never_overwritten(tmp_path: Path) -> None:
    first, final = analysis_dataset(periods=8, seed=0), analysis_dataset(periods=8, seed=1)
    stored = np.array([1, 1, 1, 1, 5, 5, 5, 5])
    path = built(tmp_path / "a.zarr", first, 8, expver=stored)
    assert preliminary_times(path).equals(pd.DatetimeIndex(first.time.values[4:]))
    before = chunk_files(path)
    chunks_before = stored_chunks(path)
    # Fresh data: preliminary where the store is final (must not win), final for 4..6, still ERA5T at 7.
    fresh = np.array([5, 5, 5, 5, 1, 1, 1, 5])
    with store_lock(path):
        n = replace_slab(path, open_store(path), fetcher(final, fresh)(list(first.time.values)), 0)
    assert n == 3
    store = open_store(path).load()
    for i in range(8):
        source = final if i in (4, 5, 6) else first
        xr.testing.assert_identical(store[list(VARS)].isel(time=i).drop_attrs(),
                                    source[list(VARS)].isel(time=i).drop_attrs())
    assert store.expver.values.tolist() == [1, 1, 1, 1, 1, 1, 1, 5]
    assert store.replaced.values.tolist() == [0, 0, 0, 0, 1, 1, 1, 0]
    assert preliminary_times(path).equals(pd.DatetimeIndex(first.time.values[7:]))
    # Times 0–3 (final) are in a shard nobody rewrote; time 7's chunks keep their bytes in the rewritten one.
    untouched = {k: v for k, v in before.items() if k.split("/")[1].startswith("c.0")}
    assert {k: v for k, v in chunk_files(path).items() if k in untouched} == untouched
    kept = {k: v for k, v in chunks_before.items() if k[1] == 7 and k[0] != "done"}
    assert kept and {k: stored_chunks(path)[k] for k in kept} == kept
    changed = [k for k, v in stored_chunks(path, VARS).items() if k[1] in (4, 5, 6) and chunks_before[k] != v]
    assert len(changed) == 3 * len(VARS)

    # The orchestrated pass fetches only preliminary times (from `since`) and is idempotent.
    calls: list = []
    fetch = fetcher(final, np.full(8, EXPVER_FINAL), calls)
    assert replace_preliminary(path, fetch, slab_size=4, since=pd.Timestamp(first.time.values[7])) == 1
    assert calls == [[pd.Timestamp(first.time.values[7])]]
    assert preliminary_times(path).empty and read_flags(path).replaced.values.tolist() == [0] * 4 + [1] * 4
    assert replace_preliminary(path, fetch, slab_size=4) == 0


def test_bad_final_slab_changes_nothing(tmp_path: Path) -> None:
    ds = analysis_dataset(periods=4)
    path = built(tmp_path / "a.zarr", ds, 4, expver=np.full(4, EXPVER_PRELIMINARY))
    before = tree_digest(path)
    slab = fetcher(ds, np.full(4, EXPVER_FINAL))(list(ds.time.values))
    with store_lock(path):
        with pytest.raises(ValueError, match="has NaN or Inf"):
            replace_slab(path, open_store(path), slab.assign(geopotential=slab.geopotential * np.nan), 0)
        with pytest.raises(ValueError, match="no 'expver'"):
            replace_slab(path, open_store(path), slab.drop_vars("expver"), 0)
    assert tree_digest(path) == before


KILL_REPLACE = """
import os, signal, sys
import numpy as np, pandas as pd
import ingest.append as replace
from core.testing import analysis_dataset
path = sys.argv[1]
final = analysis_dataset(periods=8, seed=1)
write = replace.write_region

def write_then_die_at_flags(p, data, where):
    if "replaced" in data or "expver" in data:
        os.kill(os.getpid(), signal.SIGKILL)
    write(p, data, where)

replace.write_region = write_then_die_at_flags

def fetch(times):
    return final.sel(time=pd.DatetimeIndex(times)).assign(expver=("time", np.ones(len(times), np.int8)))

replace.replace_preliminary(path, fetch, slab_size=4)
"""


def test_kill_minus_9_mid_replacement_leaves_preliminary_and_rerun_completes(tmp_path: Path) -> None:
    first, final = analysis_dataset(periods=8, seed=0), analysis_dataset(periods=8, seed=1)
    ref = built(tmp_path / "ref.zarr", first, 8, expver=np.array([1, 1, 1, 1, 5, 5, 5, 5]))
    cut = tmp_path / "cut.zarr"
    shutil.copytree(ref, cut)

    def fetch(times):
        return fetcher(final, np.full(8, EXPVER_FINAL))(times)

    assert replace_preliminary(ref, fetch, slab_size=4) == 4
    proc = subprocess.run([sys.executable, "-c", KILL_REPLACE, str(cut)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    # The final data are on disk but the flags still say preliminary, so the times are redone.
    store = open_store(cut).load()
    xr.testing.assert_identical(store.geopotential.isel(time=4).drop_attrs(),
                                final.geopotential.isel(time=4).drop_attrs())
    assert preliminary_times(cut).equals(pd.DatetimeIndex(first.time.values[4:]))
    assert replace_preliminary(cut, fetch, slab_size=4) == 4
    assert tree_digest(cut) == tree_digest(ref)


def test_a_store_without_the_replaced_flag_gets_it_when_opened_for_writing(tmp_path: Path) -> None:
    ds = analysis_dataset(periods=4)
    path = tmp_path / "old.zarr"
    create_store(path, layout(ds.time.values))
    shutil.rmtree(path / "replaced")  # as written before the flag existed
    consolidate(path)
    assert "replaced" not in open_store(path).data_vars
    with store_lock(path):
        assert open_store(path).replaced.values.tolist() == [0] * 4
