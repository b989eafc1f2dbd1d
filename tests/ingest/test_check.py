"""`data inspect` / `data check` on real stores written by the real writer, then damaged on disk."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

from core.grid import get_grid
from core.testing import analysis_dataset
from ingest.check import MAX_PER_KIND, check_store, describe_missing, format_time_ranges, inspect_store
from ingest.store import (
    StoreLayout,
    build_store,
    consolidate,
    create_store,
    extend_store,
    intent_path,
    open_store,
    write_slab,
)
from tests.ingest.shards import drop_chunk, flip_bit

VARS = ("geopotential", "u_component_of_wind", "v_component_of_wind")
N = 8


def make_store(path: Path, periods: int = N, expver: list[int] | None = None, upto: int | None = None) -> Path:
    ds = analysis_dataset(periods=periods)
    if expver is not None:
        ds["expver"] = ("time", np.asarray(expver, np.int8))
    layout = StoreLayout(get_grid("tiny"), VARS, (500,), pd.DatetimeIndex(ds.time.values), "testing", "testing-0")
    if upto is None:
        build_store(path, layout, lambda times: ds.sel(time=pd.DatetimeIndex(times)), slab_size=4)
    else:
        create_store(path, layout)
        write_slab(path, open_store(path), ds.isel(time=slice(0, upto)), 0)
    return path


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return make_store(tmp_path / "a.zarr")


def only(report, needle: str) -> str:
    hits = [p for p in report.problems if needle in p]
    assert len(hits) == 1, report.report()
    return hits[0]


def test_a_healthy_store_passes(store: Path) -> None:
    report = check_store(store)
    assert report.ok and report.problems == [], report.report()
    assert report.chunks_read == N * len(VARS)
    assert report.report().startswith(f"store {store}: OK")
    assert check_store(store, full=False).ok


def test_checksum_codec_is_in_every_field_and_flag(tmp_path: Path) -> None:
    def codecs(path: Path, name: str) -> list[str]:
        (shard,) = json.loads((path / name / "zarr.json").read_text())["codecs"]
        assert shard["name"] == "sharding_indexed"  # a slab of times per file, one time per chunk
        conf = shard["configuration"]
        index = [c["name"] for c in conf["index_codecs"]]
        assert index == ["bytes", "crc32c"], name  # Zarr's default: a shard index is always checksummed
        return [c["name"] for c in conf["codecs"]]

    path = make_store(tmp_path / "a.zarr")
    for name in VARS + ("done", "expver", "replaced"):
        assert codecs(path, name) == ["bytes", "zstd", "crc32c"], name
    plain = tmp_path / "plain.zarr"
    ds = analysis_dataset(periods=2)
    layout = StoreLayout(get_grid("tiny"), VARS, (500,), pd.DatetimeIndex(ds.time.values), "t", "v")
    create_store(plain, layout, compression="none")
    assert codecs(plain, "geopotential") == ["bytes", "crc32c"]
    create_store(tmp_path / "bare.zarr", layout, checksum=False)
    assert codecs(tmp_path / "bare.zarr", "done") == ["bytes", "zstd"]
    with pytest.raises(ValueError, match="compression 'gzip'"):
        create_store(tmp_path / "x.zarr", layout, compression="gzip")


def test_deleted_and_bit_flipped_chunks_are_reported_by_name(store: Path) -> None:
    drop_chunk(store, "geopotential", 3)  # one time gone from a shard that is otherwise fine
    flip_bit(store, "u_component_of_wind", 5)
    with pytest.raises(ValueError, match="checksum"):  # what a reader would hit
        xr.open_zarr(store).u_component_of_wind.isel(time=5).load()
    report = check_store(store)
    assert not report.ok and len(report.problems) == 2, report.report()
    missing = only(report, "missing")
    assert "geopotential at 2000-01-01T18" in missing and "chunk 3 of shard geopotential/c.0.0.0.0" in missing
    broken = only(report, "does not decode")
    assert "u_component_of_wind at 2000-01-02T06" in broken and "chunk 1 of shard u_component_of_wind/c.1.0.0.0" in broken
    assert "checksum" in broken
    assert "PROBLEM geopotential at 2000-01-01T18" in report.report()
    quick = check_store(store, full=False)  # shard indexes only: finds the hole, cannot see the flip
    assert [p for p in quick.problems if "missing" in p] and not [p for p in quick.problems if "decode" in p]
    flipped_done = flip_bit(store, "done", 1)
    assert "flag 'done' at 2000-01-01T06 does not decode" in only(check_store(store), "flag 'done'")
    flipped_done.unlink()  # (the whole first slab's done flags gone: its times read as not done)
    (store / "v_component_of_wind/c.1.0.0.0").unlink()  # a whole shard file: each done time is named
    report = check_store(store)
    lost = [p for p in report.problems if "shard v_component_of_wind/c.1.0.0.0 is missing on disk" in p]
    assert [p.split(":")[0] for p in lost] == [f"v_component_of_wind at 2000-01-02T{h:02d}" for h in (0, 6, 12, 18)]


def test_a_damaged_shard_index_is_reported_once_with_the_file(store: Path) -> None:
    shard = store / "geopotential/c.1.0.0.0"
    raw = bytearray(shard.read_bytes())
    raw[-8] ^= 0x01  # inside the index, not a chunk
    shard.write_bytes(bytes(raw))
    report = check_store(store)
    assert "shard geopotential/c.1.0.0.0 is damaged (" in only(report, "damaged")
    assert "crc32c" in only(report, "damaged") and len(report.problems) == 1, report.report()


def test_nan_and_out_of_range_values_in_done_times_are_reported(store: Path) -> None:
    z = zarr.open_array(str(store / "geopotential"), mode="r+")
    z[2, 0, 3, 4] = np.nan
    t = zarr.open_array(str(store / "v_component_of_wind"), mode="r+")
    t[6, 0, 0, 0] = 1e9
    report = check_store(store)
    assert len(report.problems) == 2, report.report()
    assert "geopotential at 2000-01-01T12: 1 NaN/Inf values" in only(report, "NaN")
    rng = only(report, "outside the physical range")
    assert rng.startswith("v_component_of_wind at 2000-01-02T12 (level 500 hPa): values ")
    assert "1e+09" in rng and "[-250, 250] m s**-1" in rng


def test_many_bad_times_are_summarised(tmp_path: Path) -> None:
    path = make_store(tmp_path / "a.zarr", periods=MAX_PER_KIND + 4)
    z = zarr.open_array(str(path / "geopotential"), mode="r+")
    z[:, 0, 0, 0] = -1e6
    report = check_store(path)
    assert len(report.problems) == MAX_PER_KIND + 1
    assert report.problems[-1] == "range: geopotential: … and 4 more like the above"


def test_units_time_axis_grid_and_stale_metadata_are_reported(store: Path) -> None:
    zarr.open_array(str(store / "geopotential"), mode="r+").update_attributes({"units": "m"})
    time = zarr.open_array(str(store / "time"), mode="r+")
    time[3] = time[3] + 1
    lat = zarr.open_array(str(store / "latitude"), mode="r+")
    lat[1] = lat[1] + 0.5
    consolidate(store)
    zarr.open_array(str(store / "expver"), mode="r+").update_attributes({"note": "changed after consolidation"})
    report = check_store(store)
    assert "units: 'geopotential' has 'm', the vocabulary says 'm**2 s**-2'" in report.problems
    assert "not regular and increasing" in only(report, "time axis")
    assert "latitude coordinates do not match the grid attribute 'tiny:17x32:equiangular-poles'" in only(report, "grid")
    assert "consolidated metadata of 'expver' is stale" in only(report, "stale")


def test_incomplete_store_is_ok_unless_completeness_is_required(tmp_path: Path) -> None:
    path = make_store(tmp_path / "a.zarr", upto=3)
    assert describe_missing(path) == "5 of 8 times missing: 2000-01-01T18 .. 2000-01-02T18 (5 times)"
    report = check_store(path)
    assert report.ok and any("5 of 8 times not done" in n for n in report.notes)
    strict = check_store(path, require_complete=True)
    assert not strict.ok and "2000-01-01T18 .. 2000-01-02T18 (5 times)" in only(strict, "not done")


def test_an_interrupted_append_and_a_contract_violation_are_reported(store: Path) -> None:
    intent_path(store).write_text(json.dumps({"size": 12}))
    zarr.open_group(str(store), mode="r+").attrs.update({"schema_version": "0"})
    consolidate(store)
    report = check_store(store)
    assert "an append was interrupted" in only(report, "append")
    assert "contract: schema_version '0' is not '1'" in only(report, "schema_version")
    assert not check_store(store.parent / "nothing.zarr").ok


def test_inspect_shows_the_key_facts(tmp_path: Path) -> None:
    path = make_store(tmp_path / "a.zarr", expver=[1, 1, 1, 1, 1, 5, 5, 5])
    extend_store(path, pd.Timestamp("2000-01-03T06"))
    text = inspect_store(path)
    for fact in [f"analysis store {path}",
                 "period 2000-01-01T00 .. 2000-01-03T06, 10 times every 6 h",
                 "grid tiny:17x32:equiangular-poles (17 × 32)",
                 "geopotential [m**2 s**-2] at 500 hPa", "u_component_of_wind [m s**-1] at 500 hPa",
                 "done 8 of 10 times", "missing: 2000-01-03T00 .. 2000-01-03T06 (2 times)",
                 "preliminary (ERA5T): 2000-01-02T06 .. 2000-01-02T18 (3 times)",
                 "replaced by final ERA5: 0 times", "dataset_version: testing-0", "source: testing",
                 "chunks (1, 1, 17, 32) (geopotential), 4 times per shard file, codecs: zstd + crc32c",
                 "size on disk "]:
        assert fact in text, f"{fact!r} not in\n{text}"


def test_time_ranges_are_compressed() -> None:
    t = pd.DatetimeIndex(["2000-01-01T00", "2000-01-01T06", "2000-01-01T12", "2000-01-02T00"])
    assert format_time_ranges(t, pd.Timedelta(hours=6)) == "2000-01-01T00 .. 2000-01-01T12 (3 times), 2000-01-02T00"
    assert format_time_ranges(t[:0], pd.Timedelta(hours=6)) == "none"


def test_the_cli_check_fails_an_incomplete_store_unless_allowed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pipelines.cli import main

    path = make_store(tmp_path / "a.zarr", upto=3)
    assert main(["data", "check", "--store", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"store {path}: 1 problem(s)") and "5 of 8 times not done" in out
    assert main(["data", "check", "--store", str(path), "--allow-incomplete"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"store {path}: OK") and "5 of 8 times not done" in out
    complete = make_store(tmp_path / "b.zarr")
    assert main(["data", "check", "--store", str(complete)]) == 0
