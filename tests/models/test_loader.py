"""``train.loader``: validation read from the store scores exactly like validation held in memory, and ``auto``
switches from memory to the store above ``train.loader_memory_gib``."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from core.config import Config, config_from_dict, dump_config
from core.grid import get_grid
from models.data import WindowDataset, open_analysis
from models.evaluate import SINGLE, evaluate
from models.prepare import choose_loader, prepare, training_windows, window_bytes
from models.zarr_windows import ZarrWindowDataset
from tests.models.conftest import CHANNELS, moving_planet, tiny_config, write_data


def with_train(config: Config, **train: object) -> Config:
    data = dump_config(config)
    data["train"].update(train)
    return config_from_dict(data)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    write_data(root, moving_planet())
    return root


def test_validation_from_the_store_scores_like_validation_in_memory(root: Path) -> None:
    base = tiny_config(root, val_lead_hours=[6, 24], tensorboard=False)
    results, setups = [], []
    for loader in ("memory", "zarr"):
        setup = prepare(with_train(base, loader=loader), SINGLE, 4)  # same seed: the same initial weights
        setups.append(setup)
        clim = setup.train_ds.time_mean()
        results.append(evaluate(setup.model, setup.val_ds, setup.lead_steps, 6, clim))
    mem, store = setups
    assert isinstance(mem.val_ds, WindowDataset) and isinstance(store.val_ds, ZarrWindowDataset)
    assert isinstance(store.train_ds, ZarrWindowDataset)
    assert not hasattr(store.val_ds, "data")  # nothing of the validation period is held: windows are read per item
    a, b = results
    assert a["windows"] == b["windows"] == len(mem.val_ds) > 0
    for key in ("rmse", "persistence_rmse"):
        for lead in a[key]:
            for ch in CHANNELS:
                assert b[key][lead][ch] == pytest.approx(a[key][lead][ch], rel=1e-6, abs=0)
    assert b["score"] == pytest.approx(a["score"], rel=1e-6)
    # The climatology is streamed from the store a few states at a time, and equals the in-memory one exactly.
    assert torch.equal(mem.train_ds.time_mean(), store.train_ds.time_mean())
    x_mem, y_mem = mem.val_ds[3]
    x_zarr, y_zarr = store.val_ds[3]
    assert torch.equal(x_mem, x_zarr) and torch.equal(y_mem, y_zarr)


def test_auto_holds_windows_in_memory_below_the_limit_and_reads_the_store_above(root: Path, caplog) -> None:
    base = tiny_config(root)
    g = get_grid("tiny")
    # 2000-01-01..01-15T18 (60 times) and 2000-01-16..01-20T18 (20 times), 3 channels, float32.
    expected = (60 + 20) * len(CHANNELS) * g.nlat * g.nlon * 4
    setup = prepare(base, SINGLE, 4)
    ds = open_analysis(base.paths.analysis_store)
    assert window_bytes(base, ds) == expected
    assert base.train.loader == "auto" and isinstance(setup.train_ds, WindowDataset)  # the default, tiny data
    above = with_train(base, loader_memory_gib=expected / 2**30 * 1.01)
    below = with_train(base, loader_memory_gib=expected / 2**30 * 0.99)
    with caplog.at_level(logging.INFO, logger="models.prepare"):
        assert choose_loader(above, ds) == "memory"
        assert choose_loader(below, ds) == "zarr"
    assert [r.getMessage().rsplit(" ", 1)[-1] for r in caplog.records if "train.loader auto" in r.getMessage()] == \
        ["memory", "zarr"]
    train_ds, val_ds = training_windows(below, ds)
    assert isinstance(train_ds, ZarrWindowDataset) and isinstance(val_ds, ZarrWindowDataset)
    assert choose_loader(with_train(below, loader="memory"), ds) == "memory"  # an explicit choice is kept
    with pytest.raises(ValueError, match="loader_memory_gib"):
        with_train(base, loader_memory_gib=-1)


def test_training_reads_a_store_and_stats_on_an_object_store_like_local_ones(root: Path) -> None:
    from core.location import as_location, upload_tree

    data_url = f"memory://loader-{root.name}/data"
    upload_tree(root / "data", as_location(data_url))
    local = with_train(tiny_config(root, tensorboard=False), loader="zarr")
    data = dump_config(local)
    data["paths"]["data_dir"] = data_url
    remote = config_from_dict(data)
    mine, theirs = prepare(local, SINGLE, 4), prepare(remote, SINGLE, 4)
    assert str(theirs.train_ds.path) == f"{data_url}/analysis.zarr"
    assert len(theirs.train_ds) == len(mine.train_ds) and len(theirs.val_ds) == len(mine.val_ds) > 0
    for k in (0, len(mine.val_ds) - 1):
        assert all(torch.equal(a, b) for a, b in zip(mine.val_ds[k], theirs.val_ds[k], strict=True))
    assert torch.equal(mine.train_ds.time_mean(), theirs.train_ds.time_mean())
    import xarray as xr

    xr.testing.assert_identical(mine.stats, theirs.stats)
