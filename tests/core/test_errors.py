"""The user-error hierarchy: every class is a SpherecastError and a ValueError, and the converted
call sites raise their new class with the message they had before."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pandas as pd
import pytest

from core import errors
from core.config import load_config
from core.errors import (
    ConfigError,
    DataContractError,
    MissingInputError,
    SourceError,
    SpherecastError,
    StoreLockedError,
    StoreWriteError,
    TransientSourceError,
    is_permanent,
)
from core.grid import PRESETS, get_grid, parse_grid_attr
from core.lineage import stats_identity
from core.runs import MANIFEST, RunGone, parse_run_name, read_manifest
from core.variables import VARIABLES, get_variable
from ingest.chunkio import ShardIndexError
from ingest.delivered import sniff_format
from ingest.initial_conditions import InitialConditionsError
from ingest.lock import lock_path, writer_lock
from ingest.opendata import OpenDataError
from ingest.regions import open_store
from models.stats import load_stats
from pipelines.cycles import CycleLockTimeout, cycle_times

USER_ERRORS = [ConfigError, DataContractError, SourceError, StoreLockedError, MissingInputError]


@pytest.mark.parametrize("cls", USER_ERRORS)
def test_every_user_error_is_a_spherecast_error_and_a_value_error(cls: type[Exception]) -> None:
    assert issubclass(cls, SpherecastError) and issubclass(cls, ValueError)
    with pytest.raises(ValueError, match="^why$"):  # the handlers written for ValueError still catch it
        raise cls("why")
    assert cls.__doc__ and "\n" not in cls.__doc__.split("\n\n")[0].strip()


def test_a_store_write_error_is_a_spherecast_error_and_an_os_error() -> None:
    assert issubclass(StoreWriteError, SpherecastError) and issubclass(StoreWriteError, OSError)
    assert issubclass(TransientSourceError, SourceError)
    exc = StoreWriteError(28, "writing … failed: No space left on device")
    assert exc.errno == 28 and is_permanent(exc) and not is_permanent(TransientSourceError("503"))


def test_the_module_exports_exactly_the_hierarchy() -> None:
    classes = [SpherecastError, *USER_ERRORS, StoreWriteError, TransientSourceError]
    assert sorted(errors.__all__) == sorted([*(c.__name__ for c in classes), "is_permanent"])
    assert not issubclass(SpherecastError, ValueError)  # the base alone says nothing about ValueError


def test_older_error_classes_joined_the_hierarchy() -> None:
    import ingest.lock

    # ingest's lock error keeps its name (tracebacks, `from ingest.store import StoreLockedError`) and is core's.
    assert issubclass(ingest.lock.StoreLockedError, StoreLockedError)
    assert issubclass(CycleLockTimeout, StoreLockedError) and issubclass(CycleLockTimeout, TimeoutError)
    assert issubclass(OpenDataError, SourceError) and issubclass(InitialConditionsError, SourceError)
    assert issubclass(ShardIndexError, DataContractError) and issubclass(RunGone, MissingInputError)


def test_config_file_mistakes_are_config_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing, env={})
    assert str(info.value) == f"config file {missing} does not exist"
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError) as info:
        load_config(listed, env={})
    assert str(info.value) == f"config file {listed} must hold a mapping, not list"


def test_a_pydantic_validation_failure_is_one_config_error_line() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={"grid": {"preset": "7deg"}, "train": {"epochs": 3}})
    text = str(info.value)
    assert text.startswith("invalid config (defaults + parameters): ") and "\n" not in text
    assert "unknown key 'train.epochs'" in text and "unknown grid preset '7deg'" in text


def test_grid_and_vocabulary_mistakes_are_config_errors() -> None:
    with pytest.raises(ConfigError) as info:
        get_grid("7deg")
    assert str(info.value) == f"unknown grid preset '7deg'; known presets: {', '.join(PRESETS)}"
    with pytest.raises(ConfigError) as info:
        get_variable("vorticity")
    assert str(info.value).startswith("unknown variable 'vorticity'")
    assert str(info.value).endswith(f"; known: {', '.join(VARIABLES)}")
    with pytest.raises(ConfigError) as info:
        parse_run_name("2000-03-20")
    assert str(info.value) == "'2000-03-20' is not a run name (expected YYYYMMDDTHH)"
    with pytest.raises(ConfigError) as info:
        cycle_times("2000-01-02T00", "2000-01-01T00", 6)
    assert str(info.value) == f"backfill end {pd.Timestamp('2000-01-01')} is before its start {pd.Timestamp('2000-01-02')}"


def test_broken_stores_and_runs_are_data_contract_errors(tmp_path: Path) -> None:
    with pytest.raises(DataContractError) as info:
        parse_grid_attr("tiny-8x16")
    assert str(info.value) == "malformed grid attribute 'tiny-8x16' (expected name:NLATxNLON:kind)"
    run = tmp_path / "20000101T00"
    run.mkdir()
    with pytest.raises(DataContractError) as info:
        read_manifest(run)
    assert str(info.value) == f"run 20000101T00: no {MANIFEST}"
    with pytest.raises(DataContractError) as info:
        open_store(tmp_path)
    assert str(info.value) == f"{tmp_path} is not an analysis store (no zarr.json)"


def test_inputs_of_earlier_steps_that_are_absent_are_missing_input_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError) as info:
        stats_identity(tmp_path / "stats.nc")
    assert str(info.value) == f"statistics file {tmp_path / 'stats.nc'} does not exist"
    with pytest.raises(MissingInputError) as info:
        load_stats(tmp_path / "stats.nc", None, ["t_500"], 6)
    assert str(info.value) == (f"statistics file {tmp_path / 'stats.nc'} does not exist; "
                               "compute it with `spherecast ingest` first")


def test_a_delivered_file_that_is_no_known_format_is_a_source_error(tmp_path: Path) -> None:
    path = tmp_path / "delivery.bin"
    path.write_bytes(b"<html>quota exceeded</html>")
    with pytest.raises(SourceError) as info:
        sniff_format(path)
    assert str(info.value) == f"delivered file {str(path)!r} starts with b'<htm': not GRIB, NetCDF or a CDS zip"


def test_a_store_held_by_another_open_file_is_store_locked(tmp_path: Path) -> None:
    store = tmp_path / "a.zarr"
    path = lock_path(store)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a second open file description conflicts like a process
        with pytest.raises(StoreLockedError) as info, writer_lock(store):
            pass
        assert str(info.value).startswith(f"store {store} is being written by another process (")
        assert str(info.value).endswith(f"; lock file {path})")
    finally:
        os.close(fd)
