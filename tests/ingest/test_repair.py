"""`spherecast data repair` through the real CLI on a store ingested from CDS deliveries on disk.

The files source re-serves any time exactly as it did the first time, so a repaired store must be
byte-identical to the healthy one it was copied from.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import netCDF4
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from core.config import load_config
from core.errors import DataContractError
from ingest.build import ingest
from ingest.check import check_store
from ingest.chunkio import chunk_writer
from ingest.lock import lock_path
from ingest.stats import READS, compute_stats
from ingest.stats_state import default_state_path
from pipelines.cli import main
from tests.ingest.cds_files import write_cds_netcdf
from tests.ingest.conftest import tiny_config
from tests.ingest.shards import flip_bit

VARS = ["geopotential", "u_component_of_wind", "v_component_of_wind"]
PERIOD = {"start": "2000-01-01T00", "end": "2000-01-02T18", "slab_size": 2}  # 8 times, 4 slabs


def _files(deliveries: Path) -> dict:
    return {**PERIOD, "source": "files", "files": {"paths": [str(deliveries)]}}


def snapshot(store: Path) -> dict[str, bytes]:
    """Every file of the store by relative path, with its bytes."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def delivered_store(root: Path) -> Path:
    """A complete store ingested through the one ingest path from a NetCDF delivery in ``root/era5``."""
    deliveries = root / "era5"
    deliveries.mkdir(exist_ok=True)
    if not (deliveries / "pl.nc").exists():
        write_cds_netcdf(deliveries / "pl.nc", pd.date_range(PERIOD["start"], PERIOD["end"], freq="6h"), VARS, [500],
                         grid_deg=3.0)
    config, _ = tiny_config(root / "base", ingest=_files(deliveries))
    ingest(config, progress=False)
    return config.paths.analysis_store


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete, healthy store built from a delivery that can re-serve any of its times."""
    return delivered_store(tmp_path_factory.mktemp("repair"))


@pytest.fixture
def store(healthy: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A fresh copy of the healthy store under a config of its own: (store, config file)."""
    config, config_file = tiny_config(tmp_path / "run", ingest=_files(healthy.parents[2] / "era5"))
    shutil.copytree(healthy, config.paths.analysis_store)
    return config.paths.analysis_store, config_file


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_repair_rewrites_damaged_and_missing_slabs_byte_identically(
        store: tuple[Path, Path], healthy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, config = store
    assert snapshot(path) == snapshot(healthy)
    flip_bit(path, "geopotential", 1)  # slab 0: one chunk fails its checksum, its shard index is fine
    missing = chunk_writer(path / "u_component_of_wind").key(4)
    missing.unlink()  # slab 2: one variable's whole shard file is gone
    unreadable = chunk_writer(path / "v_component_of_wind").key(6)
    raw = bytearray(unreadable.read_bytes())
    raw[-6] ^= 0xFF  # slab 3: the shard index fails its checksum, so no chunk of the file can be read
    unreadable.write_bytes(bytes(raw))
    assert cli(capsys, "data", "check", "--config", str(config))[0] == 1
    found = check_store(path)  # the structured findings repair works from, not the report's text
    assert found.bad_times() == {"geopotential": [1], "u_component_of_wind": [4, 5], "v_component_of_wind": [6, 7]}
    assert found.missing == {"u_component_of_wind": {4, 5}} and found.damaged_files == {unreadable}
    assert found.general == []

    code, out, err = cli(capsys, "data", "repair", "--config", str(config))
    assert code == 0, out + err
    assert "re-fetched 5 times in 3 slabs" in out
    assert "slab 0 (2000-01-01T00 .. 2000-01-01T06): geopotential damaged at 2000-01-01T06" in out
    assert "slab 2 (2000-01-02T00 .. 2000-01-02T06): u_component_of_wind missing at 2000-01-02T00 .. " in out
    assert "slab 3 (2000-01-02T12 .. 2000-01-02T18): v_component_of_wind damaged" in out
    assert f"removed unreadable shard file {unreadable}" in out
    assert "after the repair: healthy" in out
    assert cli(capsys, "data", "check", "--config", str(config))[0] == 0
    repaired, original = snapshot(path), snapshot(healthy)
    assert sorted(repaired) == sorted(original)
    assert [name for name in original if repaired[name] != original[name]] == []


def test_a_healthy_store_has_nothing_to_repair(store: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    path, config = store
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in path.rglob("*") if p.is_file()}
    code, out, _ = cli(capsys, "data", "repair", "--config", str(config), "--store", str(path))
    assert code == 0 and out.strip() == f"store {path}: nothing to repair (OK)"
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in path.rglob("*") if p.is_file()} == before


def test_a_store_locked_by_another_writer_is_refused_untouched(
        store: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    path, config = store
    flip_bit(path, "geopotential", 3)
    damaged = snapshot(path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from ingest.lock import writer_lock\n"
         f"with writer_lock({str(path)!r}):\n    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout.readline().strip() == "held"
        code, out, err = cli(capsys, "data", "repair", "--config", str(config))
    finally:
        holder.communicate("", timeout=30)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "is being written by another process" in err and str(lock_path(path)) in err
    assert snapshot(path) == damaged


@pytest.mark.parametrize("kind", ["missing", "no zarr.json"])
def test_a_path_that_is_not_a_store_is_one_line(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "analysis.zarr"
    if kind != "missing":
        target.mkdir()
        (target / "notes.txt").write_text("not a store")
    code, out, err = cli(capsys, "data", "repair", "--store", str(target))
    want = "does not exist" if kind == "missing" else "is not an analysis store (no zarr.json)"
    assert code == 2 and out == "" and err.count("\n") == 1 and want in err, err


def test_damaged_metadata_is_reported_not_repaired(store: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    path, config = store
    flip_bit(path, "geopotential", 0)
    meta = path / "u_component_of_wind" / "zarr.json"
    meta.write_text(meta.read_text()[:40])  # truncated JSON: re-fetching data cannot rebuild it
    damaged = snapshot(path)
    code, out, err = cli(capsys, "data", "repair", "--config", str(config))
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "cannot be repaired by re-fetching data" in err and "nothing was changed" in err
    assert snapshot(path) == damaged


def test_damage_the_source_delivers_again_remains_and_exits_1(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "era5").mkdir()
    delivery = write_cds_netcdf(tmp_path / "era5" / "pl.nc", pd.date_range(PERIOD["start"], PERIOD["end"], freq="6h"),
                                VARS, [500], grid_deg=3.0)
    with netCDF4.Dataset(delivery, "r+") as nc:
        nc["z"][3] = nc["z"][3] * 10  # a delivery with geopotential far above its physical range at 2000-01-01T18
    path = delivered_store(tmp_path)
    config = tmp_path / "base" / "config.yaml"
    code, out, err = cli(capsys, "data", "repair", "--config", str(config))
    assert code == 1, out + err
    assert "slab 1 (2000-01-01T12 .. 2000-01-01T18): geopotential damaged at 2000-01-01T18" in out
    assert "after the repair: DAMAGE REMAINS" in out
    assert "PROBLEM geopotential at 2000-01-01T18 (level 500 hPa): values" in out
    assert cli(capsys, "data", "check", "--store", str(path))[0] == 1


def test_a_failed_re_fetch_leaves_the_damage_to_do_and_says_so(healthy: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    # Deliveries covering the first day only: the source cannot serve slab 2 again.
    (tmp_path / "day1").mkdir()
    write_cds_netcdf(tmp_path / "day1" / "pl.nc", pd.date_range(PERIOD["start"], periods=4, freq="6h"), VARS, [500],
                     grid_deg=3.0)
    config, config_file = tiny_config(tmp_path / "run", ingest=_files(tmp_path / "day1"))
    shutil.copytree(healthy, config.paths.analysis_store)
    flip_bit(config.paths.analysis_store, "u_component_of_wind", 5)
    code, out, err = cli(capsys, "data", "repair", "--config", str(config_file))
    assert code == 2 and err.count("\n") == 1, out + err
    assert "is in none of the files" in err and "the damaged times of slabs [2] stay marked not done" in err
    code, out, _ = cli(capsys, "data", "repair", "--config", str(config_file))
    assert code == 0 and "nothing to repair (OK)" in out
    assert "note: 1 of 8 times not done: 2000-01-02T06: `spherecast ingest` writes them" in out


def test_statistics_read_while_a_shard_was_missing_are_read_again_after_the_repair(
        store: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    path, config = store
    cfg = load_config(config)
    channels, t = cfg.task.channels(), cfg.train
    chunk_writer(path / "u_component_of_wind").key(4).unlink()  # slab 2 of u: reads back as fill values
    state = default_state_path(path)
    with pytest.raises(DataContractError, match="non-finite"):  # but saves per-time sums from the bad reads first
        compute_stats(path, channels, t.train_start, t.train_end)
    with xr.open_dataset(state) as saved:
        assert not np.isfinite(saved["mean"].values).all()
    assert cli(capsys, "data", "repair", "--config", str(config))[0] == 0
    with xr.open_dataset(state) as saved:
        assert saved["done"].values.tolist() == [1, 1, 1, 1, -1, -1, 1, 1]  # the repaired times are marked stale
    before = READS.times
    refreshed = compute_stats(path, channels, t.train_start, t.train_end)
    assert READS.times - before >= 2  # the repaired times were read again, not taken from the state
    scratch = compute_stats(path, channels, t.train_start, t.train_end, incremental=False)
    xr.testing.assert_allclose(refreshed, scratch, rtol=1e-12)
    assert np.isfinite(refreshed["mean"].values).all()
