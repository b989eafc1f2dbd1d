"""Faults of the whole ERA5 ingest (source ``cds``, the real cdsapi client, the CDS-protocol test server).

Kill -9 an ingest at several points (during a download, during a region write, mid-chunk, before
the done flag, before consolidation), resume with a plain ``ingest(config)``, and compare the store
with an uninterrupted build byte for byte — every file of the store, nothing excluded (the writer
lock, the downloads and the statistics live beside the store, not in it). Then fill the disk in the
middle of a build: a real tmpfs where mounting works (else zarr's file writer fails as a full disk
does), check the error and the slabs already done, make room, resume, compare again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from core.config import Config
from core.schema import EXPVER_FINAL, FLAG_VARIABLES
from ingest.build import ingest
from ingest.check import check_store
from ingest.plan import plan_requests
from ingest.regions import done_flags, open_store, read_flags
from ingest.store import slabs_to_do
from tests.ingest.cds_server import CdsServer, serve_cds
from tests.ingest.conftest import tiny_config
from tests.ingest.faults import (
    DOWNLOAD_CHUNK,
    KILL_AFTER_CHUNKS,
    PAGE,
    chunk_time,
    full_disk_after,
    mount_tmpfs,
    resize_tmpfs,
    run_killed,
    stray_files,
    tree_digest,
    unmount,
    used_bytes,
)
from tests.ingest.shards import stored_chunks, time_arrays

log = logging.getLogger(__name__)

# 3 days at 6 h in slabs of 3: 4 slabs; slabs 1 and 2 straddle midnight, so each needs two CDS
# requests per dataset (the planner's Cartesian blocks): 2 + 4 + 4 + 2 = 12 deliveries per build.
SLAB = 3
TIMES = pd.date_range("2000-01-01T00", "2000-01-03T18", freq="6h")
TASK = {"variables": ["geopotential", "temperature", "2m_temperature"], "levels": [500, 850]}
TRAIN = {"train_start": "2000-01-01", "train_end": "2000-01-01T18",
         "val_start": "2000-01-02", "val_end": "2000-01-03T18"}
# A small request budget keeps one job (and its requests) per slab, as these tests count them;
# packing across slabs is tests/ingest/test_packing.py's.
FAST_CDS = {"retry_max": 2, "sleep_max": 0.1, "timeout": 10.0, "max_fields_per_request": 15}
BIG_DISK = 64 << 20


def config_at(root: Path, fmt: str) -> tuple[Config, Path]:
    """The test ingest (source cds, tiny grid) rooted at ``root``, also written as ``root/config.yaml``."""
    ingest_section = {"source": "cds", "start": str(TIMES[0]), "end": str(TIMES[-1]), "slab_size": SLAB,
                      "workers": 1, "cds": {**FAST_CDS, "data_format": fmt}}
    return tiny_config(root, ingest=ingest_section, task=TASK, train=TRAIN)


def request_id(dataset: str, request: dict) -> str:
    """One CDS request as a hashable, order-independent string."""
    return json.dumps([dataset, request], sort_keys=True)


def delivered(server: CdsServer, job_ids: set[str] | None = None) -> dict[str, set[str]]:
    """sha256 of the files the server delivered, by request (only ``job_ids`` if given)."""
    out: dict[str, set[str]] = {}
    for job_id, job in list(server.jobs.items()):
        if job.path is not None and (job_ids is None or job_id in job_ids):
            digest = hashlib.sha256(job.path.read_bytes()).hexdigest()
            out.setdefault(request_id(job.dataset, job.request), set()).add(digest)
    return out


@dataclass
class Reference:
    """An uninterrupted build: its config, store, every file's sha256 and what the server delivered."""

    config: Config
    digest: dict[str, str]
    deliveries: dict[str, set[str]]

    @property
    def store(self) -> Path:
        """The reference analysis store."""
        return self.config.paths.analysis_store


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CdsServer]:
    """The CDS-protocol server (new API) for the whole module; CDSAPI_* and HOME point at it."""
    with pytest.MonkeyPatch.context() as mp:  # module scope: one server for the references and all faults
        yield from serve_cds(tmp_path_factory, mp)


@pytest.fixture(scope="module")
def references(server: CdsServer, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Reference]:
    """Uninterrupted builds by delivery format, made on first use."""
    built: dict[str, Reference] = {}

    def get(fmt: str) -> Reference:
        if fmt not in built:
            config, _ = config_at(tmp_path_factory.mktemp(f"reference-{fmt}"), fmt)
            before = set(server.jobs)
            report = ingest(config, progress=False)
            assert (report.written, report.skipped) == (4, 0)
            plan = [r for t in TIMES.values.reshape(-1, SLAB)
                    for r in plan_requests(list(pd.DatetimeIndex(t)), TASK["variables"], TASK["levels"],
                                           config.ingest.cds.max_fields_per_request, fmt)]
            jobs = set(server.jobs) - before
            deliveries = delivered(server, jobs)
            assert len(jobs) == len(plan) == 12
            assert set(deliveries) == {request_id(r.dataset, r.request) for r in plan}
            check = check_store(config.paths.analysis_store, full=True, require_complete=True)
            assert check.ok, check.report()
            built[fmt] = Reference(config, tree_digest(config.paths.analysis_store), deliveries)
        return built[fmt]

    return get


COORDS = ("time", "level", "latitude", "longitude")


def shard_files(store: Path) -> dict[str, int]:
    """Files of the per-time arrays (fields and flags), relative path → first time they hold."""
    out = {}
    for w in time_arrays(store).values():
        for p in sorted(w.dir.glob("c.*")):
            found = chunk_time(store, p) if not p.name.endswith(".partial") else None
            if found is not None:
                out[p.relative_to(store).as_posix()] = found[1] * w.per_file
    return out


def chunk_times(store: Path, names: list[str]) -> dict[str, set[int]]:
    """For each array, the time indices whose chunks are on disk (read from the shard indexes)."""
    out: dict[str, set[int]] = {name: set() for name in names}
    for name, t in stored_chunks(store):
        out.setdefault(name, set()).add(t)
    return out


def assert_kill_landed(point: str, config: Config, done: np.ndarray, server: CdsServer) -> None:
    """The store (and downloads) look exactly as a kill at ``point`` in slab 1 must leave them."""
    store, fields = config.paths.analysis_store, TASK["variables"]
    slab1 = set(range(SLAB, 2 * SLAB))
    if point == "before-consolidate":
        assert done.all() and not config.paths.stats_file.exists()
        return
    assert done.tolist() == [1] * SLAB + [0] * (len(TIMES) - SLAB), "the kill must land in slab 1"
    on_disk = chunk_times(store, fields)
    match point:
        case "download":
            parts = list((config.paths.data / "downloads").glob(".*.part"))
            assert len(parts) == 1, parts
            killed_job = list(server.jobs.values())[-1]
            assert parts[0].stat().st_size == KILL_AFTER_CHUNKS * DOWNLOAD_CHUNK < killed_job.size
            assert all(not (on_disk[n] & slab1) for n in fields)  # nothing of slab 1 written yet
        case "region-write":
            written = [n for n in fields if on_disk[n] >= slab1]
            assert len(written) == 1 and all(not (on_disk[n] & slab1) for n in fields if n not in written)
        case "mid-chunk":
            assert list(store.rglob("*.partial")), "no half-written chunk: the kill missed the chunk write"
        case "before-done":
            assert all(on_disk[n] >= slab1 for n in fields)
            assert read_flags(store)["expver"].values[SLAB:2 * SLAB].tolist() == [EXPVER_FINAL] * SLAB
        case _:
            raise AssertionError(f"no expectation for kill point {point!r}")


KILLS = [
    # (format, kill point, n-th occurrence): every n puts the kill inside slab 1 (times 3..5).
    pytest.param("netcdf", "download", 4, id="netcdf-download"),  # 2nd pressure request of slab 1
    pytest.param("netcdf", "region-write", 2, id="netcdf-region-write"),
    pytest.param("netcdf", "mid-chunk", 5, id="netcdf-mid-chunk"),  # a shard file per field per slab: slab 1's 2nd
    pytest.param("netcdf", "before-done", 2, id="netcdf-before-done"),
    pytest.param("netcdf", "before-consolidate", 1, id="netcdf-before-consolidate"),
    pytest.param("grib", "download", 4, id="grib-download"),
]


@pytest.mark.parametrize(("fmt", "point", "nth"), KILLS)
def test_kill_minus_9_then_resume_is_byte_identical(fmt: str, point: str, nth: int, server: CdsServer,
                                                    references: Callable[[str], Reference], tmp_path: Path) -> None:
    ref = references(fmt)
    config, config_path = config_at(tmp_path / "run", fmt)
    store = config.paths.analysis_store
    before = set(server.jobs)
    driver_log = tmp_path / "driver.log"
    code = run_killed(point, nth, config_path, driver_log)
    assert code == -signal.SIGKILL, f"driver exited {code}:\n{driver_log.read_text()[-3000:]}"
    done = done_flags(store)
    assert_kill_landed(point, config, done, server)

    killed_jobs = set(server.jobs)
    report = ingest(config, progress=False)
    assert report.written == len(slabs_to_do(done, SLAB)) and report.total == 4
    if point == "download":  # the delivery completed before the kill is reused, not requested again
        assert len(set(server.jobs) - killed_jobs) == 12 - (nth - 1)
    assert tree_digest(store) == ref.digest
    assert stray_files(tmp_path) == []
    assert list((config.paths.data / "downloads").iterdir()) == []  # keep_downloads is off
    check = check_store(store, full=True, require_complete=True)
    assert check.ok, check.report()
    assert config.paths.stats_file.is_file()
    # The server is deterministic: every request of the killed and resumed runs was delivered in
    # the reference run too, with the same bytes.
    here = delivered(server, set(server.jobs) - before)
    assert here and set(here) <= set(ref.deliveries)
    assert all(here[k] == ref.deliveries[k] and len(here[k]) == 1 for k in here)


# -- disk full --------------------------------------------------------------------------------------
FULL_SLABS = 2  # slabs that fit on the small disk; the third fails half-way


@dataclass
class DiskFull:
    """An ingest that ran out of space after FULL_SLABS slabs; ``grow`` makes room again."""

    config: Config
    error: BaseException
    grow: Callable[[], None]
    how: str


def _trim_to_slabs(store: Path, keep_times: int) -> None:
    """Delete every shard file from ``keep_times`` on (what the store holds after that many times; slab-aligned)."""
    for key, t in shard_files(store).items():
        if t >= keep_times:
            (store / key).unlink()


def _tmpfs_size_failing_in_slab(disk: Path, ref: Reference) -> int:
    """Measure on the mounted tmpfs what FULL_SLABS slabs take, and return a size half a slab above it."""
    copy = disk / "analysis.zarr"
    shutil.copytree(ref.store, copy)
    (disk / "analysis.zarr.lock").write_text(json.dumps({"pid": 0, "host": "h", "since": "t"}))
    full = used_bytes(disk)
    _trim_to_slabs(copy, FULL_SLABS * SLAB)
    kept = used_bytes(disk)
    per_slab = (full - kept) // (len(TIMES) // SLAB - FULL_SLABS)
    for entry in disk.iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    assert per_slab >= 4 * PAGE, f"a slab takes {per_slab} bytes: too little to fail half-way through one"
    return kept + per_slab // 2 // PAGE * PAGE


@pytest.fixture(scope="module", params=["tmpfs", "enospc-writer"])
def disk_full(request: pytest.FixtureRequest, server: CdsServer, references: Callable[[str], Reference],
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[DiskFull]:
    """Run an ingest whose disk fills during slab FULL_SLABS: on a small tmpfs, or with a failing writer."""
    ref = references("netcdf")
    root = tmp_path_factory.mktemp(f"full-{request.param}")
    config, _ = config_at(root / "run", "netcdf")
    disk = root / "disk"
    config.paths.data_dir = disk  # store, lock and stats on the small disk
    config.ingest.cds.download_dir = root / "downloads"  # deliveries elsewhere: the store must fill it
    why = mount_tmpfs(disk, BIG_DISK) if request.param == "tmpfs" else "the fallback itself is under test"
    try:
        if why is None:
            resize_tmpfs(disk, _tmpfs_size_failing_in_slab(disk, ref))
            with pytest.raises((OSError, ValueError)) as info:
                ingest(config, progress=False)
            yield DiskFull(config, info.value, lambda: resize_tmpfs(disk, BIG_DISK), "tmpfs")
            return
        if request.param == "tmpfs":
            log.warning("cannot mount a tmpfs here (%s): the disk fills through a failing writer instead", why)
        trimmed = root / "trimmed.zarr"
        shutil.copytree(ref.store, trimmed)
        _trim_to_slabs(trimmed, FULL_SLABS * SLAB)
        fits = len(shard_files(trimmed))
        # The disk fills after all but the last field's shard of the next slab.
        with full_disk_after(config.paths.analysis_store, fits + len(TASK["variables"]) - 1) as refused, \
                pytest.raises((OSError, ValueError)) as info:
            ingest(config, progress=False)
        assert refused() > 0
        yield DiskFull(config, info.value, lambda: None, f"failing writer: {why}")
    finally:
        if why is None:
            unmount(disk)


def _no_space(error: BaseException | None) -> bool:
    """True if ENOSPC is the error or anywhere in its cause/context chain."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        error = error.__cause__ or error.__context__
    return False


def test_disk_full_keeps_done_slabs_and_resume_is_byte_identical(
        disk_full: DiskFull, references: Callable[[str], Reference]) -> None:
    ref, config = references("netcdf"), disk_full.config
    store = config.paths.analysis_store
    assert _no_space(disk_full.error), f"{disk_full.how}: not a disk-full error: {disk_full.error!r}"
    # Failed in the middle: the first slabs are done, the one being written when space ran out is not.
    assert done_flags(store).tolist() == [1] * (FULL_SLABS * SLAB) + [0] * (len(TIMES) - FULL_SLABS * SLAB)
    assert stray_files(store) == []
    kept = slice(0, FULL_SLABS * SLAB)
    fields = [v for v in open_store(ref.store).data_vars if v not in FLAG_VARIABLES]
    xr.testing.assert_identical(open_store(store)[fields].isel(time=kept).load(),
                                open_store(ref.store)[fields].isel(time=kept).load())
    done_chunks = {k: ref.digest[k] for k, t in shard_files(ref.store).items() if t < kept.stop}
    assert len(done_chunks) == FULL_SLABS * (len(fields) + 2)  # a shard of each field, done and expver per slab
    now = tree_digest(store)
    assert {k: now.get(k) for k in done_chunks} == done_chunks

    disk_full.grow()
    report = ingest(config, progress=False)
    assert (report.written, report.skipped) == (len(TIMES) // SLAB - FULL_SLABS, FULL_SLABS)
    assert tree_digest(store) == ref.digest
    check = check_store(store, full=True, require_complete=True)
    assert check.ok, check.report()
    assert config.paths.stats_file.is_file()


def test_disk_full_error_names_the_store_and_the_slab(disk_full: DiskFull) -> None:
    message = str(disk_full.error)
    assert "No space left on device" in message
    assert str(disk_full.config.paths.analysis_store) in message
    assert f"{TIMES[FULL_SLABS * SLAB]:%Y-%m-%dT%H}" in message  # the first time of the slab that failed
