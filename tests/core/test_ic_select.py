"""Picking the initial state from the analysis and initial-conditions stores (real Zarr on disk)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from core.config import Config, config_from_dict
from core.ic_select import ANALYSIS, INITIAL_CONDITIONS, check_compatible, choose_init, latest_cycle
from core.testing import analysis_dataset


def write_store(path: Path, start: str, periods: int, source: str, version: str, not_done: tuple[int, ...] = (),
                grid: str = "tiny") -> None:
    ds = analysis_dataset(grid, start=start, periods=periods)
    ds.attrs.update(source=source, dataset_version=version)
    ds["done"].values[list(not_done)] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_zarr(path, zarr_format=3, consolidated=False)


def config(root: Path, source: str = "auto") -> Config:
    return config_from_dict({"paths": {"root": str(root)}, "grid": {"preset": "tiny"},
                             "forecast": {"source": source}})


def test_latest_is_the_newest_done_time_of_either_store(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    write_store(cfg.paths.analysis_store, "2000-01-01", 8, "era5", "era5-v1")  # to 01-02T18
    with pytest.raises(ValueError, match="no complete time"):
        latest_cycle(config(tmp_path, "initial_conditions"))  # that store does not exist yet
    only = latest_cycle(cfg)
    assert (only.kind, only.init_time, only.source) == (ANALYSIS, pd.Timestamp("2000-01-02T18"), "era5")
    # Initial conditions run further, but their newest time is not done yet.
    write_store(cfg.paths.initial_conditions_store, "2000-01-02T12", 4, "opendata", "od-1", not_done=(3,))
    choice = latest_cycle(cfg)
    assert (choice.kind, choice.init_time, choice.source, choice.dataset_version) == (
        INITIAL_CONDITIONS, pd.Timestamp("2000-01-03T00"), "opendata", "od-1")
    assert choice.store == cfg.paths.initial_conditions_store
    assert choice.provenance()["init_source"] == "opendata" and choice.provenance()["cycle"] == "2000-01-03T00:00:00"
    assert latest_cycle(config(tmp_path, "analysis")).init_time == pd.Timestamp("2000-01-02T18")


def test_a_tie_goes_to_the_initial_conditions(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    write_store(cfg.paths.analysis_store, "2000-01-01", 8, "era5", "era5-v1")
    write_store(cfg.paths.initial_conditions_store, "2000-01-02T12", 2, "opendata", "od-1")
    assert latest_cycle(cfg).kind == INITIAL_CONDITIONS
    assert choose_init(cfg, "2000-01-02T18").kind == INITIAL_CONDITIONS
    assert choose_init(cfg, "2000-01-01T06").kind == ANALYSIS  # only the analysis holds it
    assert choose_init(config(tmp_path, "analysis"), "2000-01-02T18").kind == ANALYSIS


def test_an_init_time_without_complete_data_is_a_clear_error(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    write_store(cfg.paths.analysis_store, "2000-01-01", 8, "era5", "era5-v1", not_done=(2,))
    for when in ("2000-01-01T12", "2000-02-01T00"):
        with pytest.raises(ValueError) as info:
            choose_init(cfg, when)
        assert str(info.value) == (f"init time {pd.Timestamp(when).isoformat()} has no complete data in "
                                   f"initial_conditions store {cfg.paths.initial_conditions_store} and "
                                   f"analysis store {cfg.paths.analysis_store}")
    assert choose_init(cfg, pd.Timestamp("2000-01-01T18", tz="UTC")).init_time == pd.Timestamp("2000-01-01T18")


def test_a_checkpoint_that_does_not_fit_the_store_is_refused(tmp_path: Path) -> None:
    ds = analysis_dataset("tiny", periods=2)
    meta = {"channels": ["geopotential_500", "u_component_of_wind_500"], "grid": ds.attrs["grid"]}
    check_compatible(meta, ds, tmp_path)  # fits
    with pytest.raises(ValueError, match=r"lacks channel\(s\) \['temperature_850'\]"):
        check_compatible({**meta, "channels": ["geopotential_500", "temperature_850"]}, ds, tmp_path)
    with pytest.raises(ValueError, match=r"lacks channel\(s\) \['geopotential_850'\]"):
        check_compatible({**meta, "channels": ["geopotential_850"]}, ds, tmp_path)
    coarse = analysis_dataset("5.625deg", periods=2)
    with pytest.raises(ValueError, match="trained on tiny .* store's grid is 33x64; set forecast.grid"):
        check_compatible(meta, coarse, tmp_path)
    check_compatible(meta, coarse, tmp_path, transfer_grid="5.625deg")  # resolution transfer asked for
