"""Windows read from the store per item: equal to the in-memory windows, history and static inputs, workers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from torch.utils.data import DataLoader, DistributedSampler

from core.fields import to_channels
from core.grid import get_grid
from ingest.store import StoreLayout, build_store
from models.data import WindowDataset, open_analysis
from models.zarr_windows import GRID_STATICS, ZarrWindowDataset
from tests.models.conftest import CHANNELS, moving_planet

NOT_DONE = (5, 12)
VARS = ("geopotential", "u_component_of_wind", "v_component_of_wind")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A 20-time tiny store written by the ingest writer (sharded, checksummed), two times not done."""
    ds = moving_planet(periods=20)
    path = tmp_path_factory.mktemp("zw") / "analysis.zarr"
    layout = StoreLayout(get_grid("tiny"), VARS, (500,), pd.DatetimeIndex(ds.time.values), "testing",
                         ds.attrs["dataset_version"])
    build_store(path, layout, lambda times: ds.sel(time=pd.DatetimeIndex(times)), slab_size=4)
    done = zarr.open_array(str(path / "done"), mode="r+")
    for i in NOT_DONE:  # as if those times were never fetched
        done[i] = 0
    return path, ds


def test_history_one_equals_the_in_memory_windows(store) -> None:
    path, _ = store
    lazy = ZarrWindowDataset(path, CHANNELS, "2000-01-01", "2000-01-05T18", steps=2, time_step_hours=6)
    eager = WindowDataset(open_analysis(path), CHANNELS, "2000-01-01", "2000-01-05T18", steps=2, time_step_hours=6)
    assert len(lazy) == len(eager) > 0 and np.array_equal(lazy.init_times, eager.init_times)
    for i in range(len(lazy)):
        (x, y), (x0, y0) = lazy[i], eager[i]
        assert torch.equal(x, x0) and torch.equal(y, y0)
    assert lazy.in_channels == len(CHANNELS)


def test_history_stacks_past_states_oldest_first_and_needs_them_done(store) -> None:
    path, raw = store
    ds = ZarrWindowDataset(path, CHANNELS, "2000-01-01", "2000-01-05T18", steps=1, time_step_hours=6, history=3)
    starts = [int(np.flatnonzero(raw.time.values == t)[0]) for t in ds.init_times]
    # Needs i-2, i-1, i, i+1 done and inside the period.
    assert starts == [i for i in range(2, 19) if not {i - 2, i - 1, i, i + 1} & set(NOT_DONE)]
    truth = torch.from_numpy(to_channels(raw, CHANNELS).values.astype(np.float32))
    x, y = ds[3]
    i = starts[3]
    assert x.shape == (3 * len(CHANNELS), 17, 32) and y.shape == (1, len(CHANNELS), 17, 32)
    assert torch.equal(x, torch.cat([truth[i - 2], truth[i - 1], truth[i]]))
    assert torch.equal(y[0], truth[i + 1])
    twelve = ZarrWindowDataset(path, CHANNELS, "2000-01-01", "2000-01-05T18", steps=1, time_step_hours=12,
                               history=2)
    j = int(np.flatnonzero(raw.time.values == twelve.init_times[0])[0])
    assert torch.equal(twelve[0][0], torch.cat([truth[j - 2], truth[j]])) and torch.equal(twelve[0][1][0], truth[j + 2])


def test_static_fields_follow_the_history_and_bad_names_are_refused(store) -> None:
    path, _ = store
    ds = ZarrWindowDataset(path, CHANNELS, "2000-01-01", "2000-01-05T18", steps=1, time_step_hours=6, history=2,
                           static=list(GRID_STATICS[:2]))
    x, _ = ds[0]
    assert x.shape[0] == ds.in_channels == 2 * len(CHANNELS) + 2
    lat = np.deg2rad(get_grid("tiny").latitudes)
    np.testing.assert_allclose(x[-2, :, 0].numpy(), np.cos(lat), atol=1e-6)
    np.testing.assert_allclose(x[-1, :, 5].numpy(), np.sin(lat), atol=1e-6)
    with pytest.raises(ValueError, match="unknown static field 'orography'.*cos_latitude"):
        ZarrWindowDataset(path, CHANNELS, "2000-01-01", "2000-01-05T18", steps=1, time_step_hours=6,
                          static=["orography"])
    with pytest.raises(ValueError, match="no variable '2m_temperature'"):
        ZarrWindowDataset(path, ["2m_temperature"], "2000-01-01", "2000-01-05T18", steps=1, time_step_hours=6)
    with pytest.raises(ValueError, match="history must be ≥ 1"):
        ZarrWindowDataset(path, CHANNELS, "2000-01-01", "2000-01-05T18", steps=1, time_step_hours=6, history=0)


def test_worker_processes_prefetch_the_same_batches_as_the_main_process(store) -> None:
    path, _ = store
    ds = ZarrWindowDataset(path, CHANNELS, "2000-01-01", "2000-01-05T18", steps=2, time_step_hours=6, history=2)
    batches = []
    for workers in (0, 2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=3, drop_last=True)
        sampler.set_epoch(1)
        # Spawned workers, as a trainer must use: Zarr keeps an event-loop thread and the store writer
        # a thread pool, and a forked child inherits their locks but not their threads (in the full
        # suite a forked worker died there).
        loader = DataLoader(ds, batch_size=2, sampler=sampler, num_workers=workers,
                            prefetch_factor=2 if workers else None, persistent_workers=False,
                            multiprocessing_context="spawn" if workers else None)
        batches.append([(x.clone(), y.clone()) for x, y in loader])
    assert len(batches[0]) == len(ds) // 2 // 2 > 0
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*batches, strict=True))
