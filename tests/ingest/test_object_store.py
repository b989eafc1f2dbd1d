"""The analysis store on an object store (fsspec ``memory://``, in this process): the same bytes as a local
build through create, append, resume and statistics; the writer lock as an exclusive object; a killed
creation or a failed first slab leaves no store; an append that fails before writing is undone; ``data
check`` finds a damaged shard; and a URL where a local directory is required is one clear error.

The same code against a real S3 protocol server with Dask workers in other processes is in
``test_object_store_dask.py``.
"""

from __future__ import annotations

import hashlib
import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import xarray as xr
from fsspec.implementations.memory import MemoryFileSystem

from core.config import config_from_dict, load_config
from core.errors import ConfigError, StoreLockedError
from core.location import as_location, is_remote
from ingest.build import ingest
from ingest.check import check_store, inspect_store
from ingest.stats import read_stats
from ingest.store import build_store
from tests.ingest.test_append import tree_digest
from tests.ingest.test_dask_cluster import config_data, write_config
from tests.ingest.test_mirror_source import DATA, write_arco
from tests.ingest.test_store import layout_of

FS = MemoryFileSystem()


def digest(location: Path) -> dict[str, str]:
    """Relative path → sha256 of every file or object under a location (local or remote alike)."""
    if not is_remote(location):
        return tree_digest(location)
    root = location.path.rstrip("/") + "/"
    return {name[len(root):]: hashlib.sha256(location.fs.cat_file(name)).hexdigest()
            for name in sorted(location.fs.find(location.path))}


def everything(bucket: str) -> list[str]:
    """Every object in a memory:// bucket."""
    return sorted(FS.find(f"/{bucket}"))


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mirror") / "arco.zarr"
    return write_arco(path)


@pytest.fixture
def bucket() -> Iterator[str]:
    name = f"bucket-{uuid.uuid4().hex[:8]}"
    yield name
    if FS.exists(f"/{name}"):
        FS.rm(f"/{name}", recursive=True)


def configs(tmp_path: Path, mirror: Path, bucket: str, **ingest_extra: object) -> tuple:
    """The same ingest with a local data directory and with ``memory://<bucket>/data``."""
    local = load_config(write_config(tmp_path / "local", config_data(str(tmp_path / "local" / "out"), str(mirror),
                                                                     **ingest_extra)), env={})
    data = config_data(str(tmp_path / "remote" / "out"), str(mirror), **ingest_extra)
    data["paths"]["data_dir"] = f"memory://{bucket}/data"
    remote = load_config(write_config(tmp_path / "remote", data), env={})
    return local, remote


def test_an_ingest_into_a_memory_url_writes_the_bytes_a_local_build_writes(
        tmp_path: Path, mirror: Path, bucket: str) -> None:
    local, remote = configs(tmp_path, mirror, bucket)
    assert is_remote(remote.paths.analysis_store) and str(remote.paths.stats_file) == f"memory://{bucket}/data/stats.nc"
    ingest(local, progress=False)
    report = ingest(remote, progress=False)
    assert (report.written, report.total) == (6, 6)
    assert digest(remote.paths.analysis_store) == digest(local.paths.analysis_store)
    xr.testing.assert_identical(read_stats(remote.paths.stats_file), read_stats(local.paths.stats_file))
    # The store, its statistics and their running sums; the lock object is gone; downloads stay local.
    assert everything(bucket) == sorted(
        [f"/{bucket}/data/analysis.stats-state.nc", f"/{bucket}/data/stats.nc"]
        + [f"/{bucket}/data/analysis.zarr/{rel}" for rel in digest(local.paths.analysis_store)])
    assert remote.paths.local_data == tmp_path / "remote" / "out" / "data"
    again = ingest(remote, progress=False)
    assert (again.written, again.skipped) == (0, 6)
    assert digest(remote.paths.analysis_store) == digest(local.paths.analysis_store)
    checked = check_store(remote.paths.analysis_store)
    assert checked.ok, checked.problems
    assert "size on disk" in inspect_store(remote.paths.analysis_store)


def test_an_append_on_an_object_store_matches_the_same_append_on_disk(
        tmp_path: Path, mirror: Path, bucket: str) -> None:
    short_local, short_remote = configs(tmp_path / "short", mirror, bucket, end=str(DATA[5]))
    local, remote = configs(tmp_path / "short", mirror, bucket)
    for first, then in ((short_local, local), (short_remote, remote)):
        assert ingest(first, progress=False).total == 3
        assert ingest(then, progress=False).written == 3  # the period grows from 6 to 12 times
    assert digest(remote.paths.analysis_store) == digest(local.paths.analysis_store)
    assert not (remote.paths.analysis_store.parent / "analysis.zarr.append.json").exists()
    xr.testing.assert_identical(read_stats(remote.paths.stats_file), read_stats(local.paths.stats_file))


def test_a_lock_held_on_another_host_refuses_the_ingest_and_changes_nothing(
        tmp_path: Path, mirror: Path, bucket: str) -> None:
    _, remote = configs(tmp_path, mirror, bucket)
    lock = f"/{bucket}/data/analysis.zarr.lock"
    FS.pipe_file(lock, json.dumps({"pid": 4242, "host": "node-17", "since": "2026-12-05T06:00:00+00:00"}).encode())
    with pytest.raises(StoreLockedError) as info:
        ingest(remote, progress=False)
    assert "pid 4242 on host node-17" in str(info.value) and f"memory://{bucket}/data/analysis.zarr.lock" in str(info.value)
    assert everything(bucket) == [lock]  # no store, no statistics, the holder's lock untouched
    assert json.loads(FS.cat_file(lock))["host"] == "node-17"


def test_a_lock_left_by_a_dead_process_of_this_host_is_taken_over(
        tmp_path: Path, mirror: Path, bucket: str, caplog: pytest.LogCaptureFixture) -> None:
    _, remote = configs(tmp_path, mirror, bucket)
    dead = 2**22 + 17  # above pid_max's default: no process has it
    FS.pipe_file(f"/{bucket}/data/analysis.zarr.lock",
                 json.dumps({"pid": dead, "host": socket.gethostname(), "since": "2026-12-05T06:00:00"}).encode())
    assert ingest(remote, progress=False).written == 6
    assert f"left by pid {dead} of this host" in caplog.text
    assert not FS.exists(f"/{bucket}/data/analysis.zarr.lock")


def test_objects_a_killed_creation_left_are_not_a_store_and_are_replaced(
        tmp_path: Path, mirror: Path, bucket: str) -> None:
    local, remote = configs(tmp_path, mirror, bucket)
    ingest(local, progress=False)
    # A creation killed mid-upload: some array metadata, no root zarr.json (it goes up last).
    FS.pipe_file(f"/{bucket}/data/analysis.zarr/done/zarr.json", b"{half")
    FS.pipe_file(f"/{bucket}/data/analysis.zarr/stray-object", b"left over")
    assert ingest(remote, progress=False).written == 6
    assert digest(remote.paths.analysis_store) == digest(local.paths.analysis_store)


def test_a_first_slab_that_fails_leaves_no_store_on_the_object_store(bucket: str) -> None:
    from core.testing import analysis_dataset

    ds = analysis_dataset(periods=6)
    path = as_location(f"memory://{bucket}/data/analysis.zarr")

    def broken(times: list[pd.Timestamp]) -> xr.Dataset:
        raise OSError("the source went away")

    with pytest.raises(OSError, match="the source went away"):
        build_store(path, layout_of(ds), broken, slab_size=2)
    assert everything(bucket) == []  # neither the new store nor its lock object


def test_an_append_that_fails_before_writing_is_undone_byte_for_byte(bucket: str) -> None:
    from core.testing import analysis_dataset

    ds = analysis_dataset(periods=8)
    path = as_location(f"memory://{bucket}/data/analysis.zarr")
    short = ds.isel(time=slice(0, 4))
    build_store(path, layout_of(short), lambda t: short.sel(time=t), slab_size=2)
    before = digest(path)

    def broken(times: list[pd.Timestamp]) -> xr.Dataset:
        raise OSError("the source went away")

    with pytest.raises(OSError, match="the source went away"):
        build_store(path, layout_of(ds), broken, slab_size=2)
    assert digest(path) == before  # the time axis is back to 4 times, every object as it was
    assert everything(bucket) == sorted(f"/{bucket}/data/analysis.zarr/{rel}" for rel in before)
    build_store(path, layout_of(ds), lambda t: ds.sel(time=t), slab_size=2)
    assert check_store(path).ok


def test_data_check_names_a_damaged_shard_on_the_object_store(tmp_path: Path, mirror: Path, bucket: str) -> None:
    _, remote = configs(tmp_path, mirror, bucket)
    ingest(remote, progress=False)
    shard = f"/{bucket}/data/analysis.zarr/temperature/c.1.0.0.0"
    raw = bytearray(FS.cat_file(shard))
    raw[10] ^= 0xFF  # one flipped bit's worth of damage inside the first chunk's compressed bytes
    FS.pipe_file(shard, bytes(raw))
    report = check_store(remote.paths.analysis_store)
    assert not report.ok
    assert report.problems == ["temperature at 2024-04-29T12: chunk 0 of shard temperature/c.1.0.0.0 does not "
                               "decode (crc32c checksum mismatch)"]


def test_urls_where_a_local_directory_is_needed_are_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"paths\.root: .*'s3://b/out' is a URL: only paths\.data_dir"):
        config_from_dict({"paths": {"root": "s3://b/out"}})
    with pytest.raises(ConfigError, match="cannot use 'nope://b/data' as a location"):
        config_from_dict({"paths": {"data_dir": "nope://b/data"}})
    # A file:// URL is a local path.
    assert config_from_dict({"paths": {"data_dir": "file:///srv/era5"}}).paths.data == Path("/srv/era5")


def test_data_repair_refetches_a_damaged_shard_on_the_object_store(tmp_path: Path, mirror: Path, bucket: str) -> None:
    from ingest.repair import repair_store

    local, remote = configs(tmp_path, mirror, bucket)
    ingest(local, progress=False)
    ingest(remote, progress=False)
    shard = f"/{bucket}/data/analysis.zarr/temperature/c.1.0.0.0"
    raw = bytearray(FS.cat_file(shard))
    raw[10] ^= 0xFF
    FS.pipe_file(shard, bytes(raw))
    result = repair_store(remote)
    assert not result.before.ok and result.ok
    assert digest(remote.paths.analysis_store) == digest(local.paths.analysis_store)
    assert not FS.exists(f"/{bucket}/data/analysis.zarr.lock")
