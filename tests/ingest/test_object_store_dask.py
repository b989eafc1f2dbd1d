"""Ingest and stats into an object store (moto's S3 server, real HTTP) from a real Dask cluster.

``paths.data_dir`` is an ``s3://`` URL; the endpoint and credentials come from the standard AWS
environment, in the test process and in the ``dask worker`` processes alike. The objects written are
byte for byte the files of a single-process build into a local directory, the writer lock object is
gone afterwards, a rerun writes nothing; a missing bucket and a lock held elsewhere are each one clear
error with nothing written.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import xarray as xr
from distributed import Client

from core.config import Config, load_config
from core.errors import SpherecastError, StoreLockedError
from ingest.build import ingest
from ingest.store import BuildReport
from tests.ingest.moto_s3 import FOREIGN_AWS_VARS, MotoS3, moto_s3
from tests.ingest.test_append import tree_digest
from tests.ingest.test_dask_cluster import Cluster, config_data, write_config
from tests.ingest.test_mirror_source import write_arco

SLABS = 6  # 12 times in slabs of 2 (config_data)


@pytest.fixture(scope="module")
def s3() -> Iterator[MotoS3]:
    with moto_s3() as server:
        yield server


@pytest.fixture(autouse=True)
def aws_env(s3: MotoS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The client side (this process) finds the server through the environment, as an operator's would."""
    # Relative paths resolve against the cwd when ingest runs: a URL taken for one would land in tmp_path
    # (``./s3:/…``), never in the working tree.
    monkeypatch.chdir(tmp_path)
    for name in FOREIGN_AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The local ARCO mirror both builds read (its absolute path is part of the dataset version)."""
    path = tmp_path_factory.mktemp("client") / "mirror" / "arco.zarr"
    path.parent.mkdir()
    return write_arco(path)


@pytest.fixture(scope="module")
def cluster(s3: MotoS3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Scheduler and two one-thread workers in a directory of their own, the server's AWS variables in their env."""
    c = Cluster(tmp_path_factory.mktemp("workers-cwd"))
    for name in FOREIGN_AWS_VARS:
        c.env.pop(name, None)
    c.env.update(s3.env)
    try:
        address = c.start_scheduler()
        c.start_worker("w1")
        c.start_worker("w2")
        c.wait_for_workers(address, 2)
        yield address
    finally:
        c.close()


@pytest.fixture(scope="module")
def reference(mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, xr.Dataset]:
    """The same config built in this process into a local data dir: the store's bytes, the data dir's, the stats."""
    root = tmp_path_factory.mktemp("reference")
    cfg = load_config(write_config(root, config_data(str(root / "out"), str(mirror))), env={})
    ingest(cfg, progress=False)
    return (tree_digest(cfg.paths.analysis_store), tree_digest(cfg.paths.data),
            xr.load_dataset(cfg.paths.stats_file))


def s3_config(tmp_path: Path, mirror: Path, bucket: str, address: str) -> Config:
    """The reference config with the data dir at ``s3://<bucket>/data`` and the cluster's scheduler."""
    data = config_data(str(tmp_path / "out"), str(mirror), scheduler_address=address)
    data["paths"]["data_dir"] = f"s3://{bucket}/data"
    return load_config(write_config(tmp_path, data), env={})


@pytest.fixture(scope="module")
def s3_build(s3: MotoS3, cluster: str, mirror: Path,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, BuildReport, list[str], dict[str, str]]:
    """One ingest on the cluster into a fresh bucket: the config, its report, the bucket's keys and digest after."""
    bucket = s3.create_bucket("analysis")
    tmp_path = tmp_path_factory.mktemp("s3-build")
    with pytest.MonkeyPatch.context() as mp:  # module scope: the autouse function fixture is not yet in force
        for name in FOREIGN_AWS_VARS:
            mp.delenv(name, raising=False)
        for name, value in s3.env.items():
            mp.setenv(name, value)
        # A URL taken for a relative path would land here (``./s3:/…``), not in the working tree.
        mp.chdir(tmp_path)
        cfg = s3_config(tmp_path, mirror, bucket, cluster)
        report = ingest(cfg, progress=False)
    return cfg, report, s3.keys(bucket), s3.object_digest(f"s3://{bucket}/data")


def test_ingest_on_a_cluster_into_s3_writes_the_bytes_of_a_local_build(
        s3: MotoS3, cluster: str, s3_build, reference: tuple[dict, dict, xr.Dataset], tmp_path: Path) -> None:
    cfg, report, keys, _ = s3_build
    store_digest, data_digest, stats = reference
    assert str(cfg.paths.analysis_store) == "s3://analysis/data/analysis.zarr"
    assert str(cfg.paths.stats_file) == "s3://analysis/data/stats.nc"
    assert str(report.path) == "s3://analysis/data/analysis.zarr"
    assert (report.written, report.skipped, report.total) == (SLABS, 0, SLABS)
    # Every object of the store, key for key and byte for byte, is a file of the local build.
    assert s3.object_digest("s3://analysis/data/analysis.zarr") == store_digest
    local = tmp_path / "stats.nc"
    local.write_bytes(s3.get("s3://analysis/data/stats.nc"))
    xr.testing.assert_identical(xr.load_dataset(local), stats)
    # Nothing else in the bucket: the lock object is gone and no temporary or stray object stayed. The local
    # build's data dir keeps its lock file (a flock file is never deleted); otherwise the same names.
    assert "data/analysis.zarr.lock" not in keys
    assert keys == sorted(f"data/{name}" for name in data_digest if name != "analysis.zarr.lock")
    # The workers did the writing (each built its own source), so they reached the server through their env.
    from ingest import build

    with Client(cluster) as client:
        sources = client.run(lambda: len(build._SOURCES))
    assert len(sources) == 2 and sum(sources.values()) >= 1


def test_a_rerun_into_s3_on_the_cluster_writes_nothing(s3: MotoS3, s3_build) -> None:
    cfg, _, keys, digest = s3_build
    again = ingest(cfg, progress=False)
    assert (again.written, again.skipped) == (0, SLABS)
    assert s3.keys("analysis") == keys
    assert s3.object_digest("s3://analysis/data") == digest


def _refused(s3: MotoS3, tmp_path: Path, mirror: Path, bucket: str, address: str,
             error: type[Exception]) -> str:
    """Ingest into ``bucket`` fails at once with ``error``, changing no bucket, no object, no local file."""
    cfg = s3_config(tmp_path, mirror, bucket, address)
    buckets = s3.buckets()
    objects = {b: s3.object_digest(f"s3://{b}") for b in buckets}
    local = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    began = time.monotonic()
    with pytest.raises(error) as info:  # the cwd is tmp_path: a URL taken for a relative path shows up below
        ingest(cfg, progress=False)
    assert time.monotonic() - began < 15
    assert s3.buckets() == buckets
    assert {b: s3.object_digest(f"s3://{b}") for b in buckets} == objects
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == local
    return str(info.value)


def test_a_bucket_that_does_not_exist_is_one_clear_error(
        s3: MotoS3, cluster: str, mirror: Path, tmp_path: Path) -> None:
    message = _refused(s3, tmp_path, mirror, "no-such-bucket", cluster, SpherecastError)
    assert "no-such-bucket" in message
    assert "no-such-bucket" not in s3.buckets()


def test_a_lock_object_held_elsewhere_refuses_the_writer_and_names_the_holder(
        s3: MotoS3, cluster: str, mirror: Path, tmp_path: Path) -> None:
    bucket = s3.create_bucket("locked")
    # A writer alive on another host: its pid cannot be checked from here, so its lock must stand.
    holder = {"pid": os.getpid(), "host": "otherhost",
              "since": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds")}
    s3.put("s3://locked/data/analysis.zarr.lock", json.dumps(holder).encode())
    message = _refused(s3, tmp_path, mirror, bucket, cluster, StoreLockedError)
    assert f"pid {os.getpid()}" in message and "otherhost" in message
    assert "s3://locked/data/analysis.zarr" in message
    assert s3.keys("locked") == ["data/analysis.zarr.lock"]
    assert json.loads(s3.get("s3://locked/data/analysis.zarr.lock")) == holder
