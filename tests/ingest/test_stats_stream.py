"""The streaming, incremental statistics: equal to a plain float64 computation, and reading only what changed."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from core.fields import to_channels
from core.grid import get_grid
from core.schema import EXPVER_FINAL, EXPVER_PRELIMINARY
from core.testing import analysis_dataset
from ingest.append import replace_times
from ingest.stats import READS, compute_stats, default_state_path
from ingest.stats_moments import combine
from ingest.store import StoreLayout, create_store, extend_store, open_store, store_lock, write_slab

VARS = ("geopotential", "temperature", "2m_temperature")
LEVELS = (500, 850)
CH = ["geopotential_500", "temperature_850", "temperature_500", "2m_temperature"]
GRID = "5.625deg"


def dataset(n: int, seed: int = 0) -> xr.Dataset:
    """Smooth random fields plus noise (so that each time's spatial variance is not a multiple of the others)."""
    ds = analysis_dataset(GRID, periods=n, variables=VARS, levels=LEVELS, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for name in VARS:
        ds[name] = ds[name] + rng.normal(0, 50.0, ds[name].shape).astype(np.float32)
    return ds


def make_store(ds: xr.Dataset, path: Path, upto: int, expver: int = EXPVER_FINAL) -> Path:
    create_store(path, StoreLayout(get_grid(GRID), VARS, LEVELS, pd.DatetimeIndex(ds.time.values[:upto]), "t", "v1"),
                 slab_size=4)
    part = ds.isel(time=slice(0, upto)).copy()
    part["expver"] = ("time", np.full(upto, expver, dtype=np.int8))
    write_slab(path, open_store(path), part, 0)
    return path


def oracle(ds: xr.Dataset, n: int) -> dict[str, np.ndarray]:
    """The whole-period float64 computation the streaming pass replaced (the old ``compute_stats``)."""
    x = to_channels(ds.isel(time=slice(0, n)), CH).values.astype(np.float64)
    g = get_grid(GRID)
    w = g.weights[None, None, :, None] / g.nlon

    def wmean(a: np.ndarray) -> np.ndarray:
        return (a * w).sum(axis=(2, 3)).mean(axis=0)

    mean = wmean(x)
    d = np.diff(x, axis=0)
    return {"mean": mean, "std": np.sqrt(wmean((x - mean[None, :, None, None]) ** 2)),
            "diff_std": np.sqrt(wmean((d - wmean(d)[None, :, None, None]) ** 2))}


def assert_equal_stats(got: xr.Dataset, want: dict[str, np.ndarray]) -> None:
    for name in ("std", "diff_std"):
        np.testing.assert_allclose(got[name].values, want[name], rtol=1e-10, atol=0)
    np.testing.assert_allclose(got["mean"].values, want["mean"], rtol=1e-10, atol=1e-10 * want["std"].max())


def test_combine_is_the_pooled_mean_and_variance() -> None:
    rng = np.random.default_rng(3)
    parts = [rng.normal(5, 2, size=(50, 2)) for _ in range(7)]
    mean = np.stack([p.mean(0) for p in parts])
    m2 = np.stack([((p - p.mean(0)) ** 2).mean(0) for p in parts])  # unit weight per part
    total, var = combine(mean, m2)
    allv = np.concatenate(parts)
    np.testing.assert_allclose(total, allv.mean(0), rtol=1e-13)
    np.testing.assert_allclose(var, allv.var(0), rtol=1e-12)


@pytest.mark.parametrize("budget", [1, 3 * 4 * 33 * 64 * 4, 1 << 30])
def test_streaming_stats_equal_the_whole_period_float64_computation(tmp_path: Path, budget: int) -> None:
    """One time per block, three per block (blocks straddle shards), and the whole period in one block."""
    ds = dataset(13)
    path = make_store(ds, tmp_path / "a.zarr", 13)
    st = compute_stats(path, CH, ds.time.values[0], ds.time.values[10], budget_bytes=budget, incremental=False)
    assert_equal_stats(st, oracle(ds, 11))
    assert st.attrs["samples"] == 11 and list(st["channel"].values) == CH
    assert not default_state_path(path).exists()  # incremental=False writes no state


def test_an_append_reads_only_the_new_times_and_equals_a_fresh_pass(tmp_path: Path) -> None:
    ds = dataset(20)
    path = make_store(ds, tmp_path / "analysis.zarr", 12)
    t = ds.time.values
    first = compute_stats(path, CH, t[0], t[11], budget_bytes=5 * 4 * 33 * 64 * 4)
    state = tmp_path / "analysis.stats-state.nc"
    assert state.is_file() and default_state_path(path) == state
    assert_equal_stats(first, oracle(ds, 12))
    # The daily append: grow the time axis, write the new times, refresh the statistics.
    extend_store(path, pd.Timestamp(t[19]))
    with store_lock(path):
        write_slab(path, open_store(path), ds.isel(time=slice(12, 20)), 12)
    before = READS.times
    again = compute_stats(path, CH, t[0], t[19], budget_bytes=5 * 4 * 33 * 64 * 4)
    # The 8 new times, and the last old one: the tendency into the first new time needs both fields.
    assert READS.times - before == 8 + 1
    scratch = compute_stats(path, CH, t[0], t[19], incremental=False)
    assert_equal_stats(again, oracle(ds, 20))
    xr.testing.assert_allclose(again, scratch, rtol=1e-12)
    # Nothing changed: nothing is read. A shorter period: nothing is read either.
    before = READS.times
    xr.testing.assert_allclose(compute_stats(path, CH, t[0], t[19]), scratch, rtol=1e-12)
    later = compute_stats(path, CH, t[4], t[19])
    assert READS.times == before
    assert_equal_stats(later, oracle(ds.isel(time=slice(4, None)), 16))


def test_a_replaced_time_is_read_again_with_its_neighbours(tmp_path: Path) -> None:
    """ERA5T → final flips ``replaced``/``expver`` of a time: its moments and both tendencies touching it are redone."""
    ds = dataset(12)
    path = make_store(ds, tmp_path / "analysis.zarr", 12, expver=EXPVER_PRELIMINARY)
    t = ds.time.values
    compute_stats(path, CH, t[0], t[11])
    final = ds.copy(deep=True)
    final["geopotential"][6] = final["geopotential"][6] + 500.0
    final["expver"] = ("time", np.full(12, EXPVER_FINAL, dtype=np.int8))
    with store_lock(path):
        assert replace_times(path, open_store(path), final.isel(time=[6]), [6]) == 1
    before = READS.times
    st = compute_stats(path, CH, t[0], t[11])
    assert READS.times - before == 3  # times 5, 6 and 7
    assert_equal_stats(st, oracle(final, 12))
    assert not np.allclose(st["std"].values, oracle(ds, 12)["std"], rtol=1e-6)  # the change did reach the stats


def test_a_rebuilt_store_or_a_broken_state_is_recomputed(tmp_path: Path) -> None:
    ds, other = dataset(10), dataset(10, seed=7)
    path = make_store(ds, tmp_path / "analysis.zarr", 10)
    t = ds.time.values
    compute_stats(path, CH, t[0], t[9])
    shutil.rmtree(path)
    make_store(other, path, 10)  # same times, flags, version and path: only the data differ
    assert_equal_stats(compute_stats(path, CH, t[0], t[9]), oracle(other, 10))
    default_state_path(path).write_bytes(b"not a netcdf file")
    before = READS.times
    assert_equal_stats(compute_stats(path, CH, t[0], t[9]), oracle(other, 10))
    assert READS.times - before == 10
