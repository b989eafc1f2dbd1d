"""Ingest on a real Dask cluster: ``dask scheduler`` and two ``dask worker`` processes started from the
venv's CLI in another working directory, a relative ``paths.root`` resolved before jobs leave the
client, the store byte-identical to a single-process build; and the bad inputs an operator meets
(nothing answers, something else answers, a worker that cannot see the store), each one clear error
with nothing on disk changed.
"""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import xarray as xr
import yaml
from distributed import Client

from core.config import load_config
from core.errors import ConfigError
from ingest import parallel
from ingest.build import ingest
from tests.ingest.conftest import TINY
from tests.ingest.test_append import tree_digest
from tests.ingest.test_mirror_source import DATA, LEVELS, VARS, write_arco

DASK = Path(sys.executable).with_name("dask")
REPO = Path(__file__).resolve().parents[2]
STARTUP = 30.0  # seconds for the scheduler and its workers to come up


def config_data(root: str, mirror: str, **ingest_extra: object) -> dict:
    """A tiny-grid ingest of the local ARCO mirror (12 times, slabs of 2), stats over its first two days."""
    return {
        "paths": {"root": root},
        "grid": TINY["grid"],
        "task": {"variables": list(VARS), "levels": LEVELS},
        "ingest": {"source": "zarr", "mirror": {"url": mirror, "layout": "arco"}, "start": str(DATA[0]),
                   "end": str(DATA[-1]), "slab_size": 2, **ingest_extra},
        "train": {"train_start": str(DATA[0]), "train_end": str(DATA[7]), "val_start": str(DATA[8]),
                  "val_end": str(DATA[-1])},
    }


def write_config(directory: Path, data: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class Cluster:
    """A scheduler and workers as process groups of their own, killed (group and all) by :meth:`close`."""

    def __init__(self, cwd: Path) -> None:
        self.cwd, self.procs = cwd, []
        self.scheduler_file = cwd / "scheduler.json"
        self.env = {**os.environ, "PYTHONPATH": str(REPO)}

    def _spawn(self, argv: list[str], name: str) -> None:
        log = open(self.cwd / f"{name}.log", "wb")  # noqa: SIM115  (closed with the process in close())
        self.procs.append((subprocess.Popen(argv, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True), log))

    def start_scheduler(self) -> str:
        self._spawn([str(DASK), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                     "--scheduler-file", str(self.scheduler_file)], "scheduler")
        deadline = time.monotonic() + STARTUP
        while not self.scheduler_file.is_file():
            assert time.monotonic() < deadline, (self.cwd / "scheduler.log").read_text()
            time.sleep(0.1)
        time.sleep(0.2)  # the file is written whole, but give the writer its close
        import json

        return json.loads(self.scheduler_file.read_text())["address"]

    def start_worker(self, name: str, wrap: list[str] | None = None) -> None:
        argv = [str(DASK), "worker", "--scheduler-file", str(self.scheduler_file), "--host", "127.0.0.1",
                "--nworkers", "1", "--nthreads", "1", "--no-dashboard", "--name", name]
        self._spawn((wrap or []) + argv, name)

    def wait_for_workers(self, address: str, n: int) -> None:
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(n, timeout=STARTUP)

    def close(self) -> None:
        for proc, log in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
            log.close()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mirror at ``<client dir>/mirror/arco.zarr`` (its absolute path is part of the dataset version)."""
    path = tmp_path_factory.mktemp("client") / "mirror" / "arco.zarr"
    path.parent.mkdir()
    return write_arco(path)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """Scheduler and two one-thread workers, all running in a directory the test never uses."""
    elsewhere = tmp_path_factory.mktemp("workers-cwd")
    c = Cluster(elsewhere)
    try:
        address = c.start_scheduler()
        c.start_worker("w1")
        c.start_worker("w2")
        c.wait_for_workers(address, 2)
        yield address, elsewhere
    finally:
        c.close()


@pytest.fixture(scope="module")
def reference(mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, xr.Dataset]:
    """The same config built in this process: the store's bytes and the stats."""
    root = tmp_path_factory.mktemp("reference")
    cfg = load_config(write_config(root, config_data(str(root / "out"), str(mirror))), env={})
    ingest(cfg, progress=False)
    return tree_digest(cfg.paths.analysis_store), xr.load_dataset(cfg.paths.stats_file)


def test_relative_root_on_a_real_cluster_in_another_cwd_gives_the_same_bytes(
        cluster: tuple[str, Path], mirror: Path, reference: tuple[dict, xr.Dataset],
        monkeypatch: pytest.MonkeyPatch) -> None:
    address, elsewhere = cluster
    client_dir = mirror.parents[1]
    # Relative paths (the root and the mirror), as an operator writes them; the workers' cwd is another directory.
    path = write_config(client_dir, config_data("out", "mirror/arco.zarr", scheduler_address=address))
    monkeypatch.chdir(client_dir)
    report = ingest(load_config(path, env={}), progress=False)
    assert report.path == client_dir / "out" / "data" / "analysis.zarr"
    assert (report.written, report.skipped, report.total) == (6, 0, 6)
    assert tree_digest(report.path) == reference[0]
    xr.testing.assert_identical(xr.load_dataset(client_dir / "out" / "data" / "stats.nc"), reference[1])
    # Nothing landed where a relative path would have led the workers.
    assert sorted(p.name for p in elsewhere.iterdir()) == ["scheduler.json", "scheduler.log", "w1.log", "w2.log"]
    # The workers did the writing: each built its own source (a per-process cache) and they share six slabs.
    from ingest import build

    with Client(address) as client:
        sources = client.run(lambda: len(build._SOURCES))
    assert len(sources) == 2 and sum(sources.values()) >= 1


def test_a_rerun_on_the_cluster_writes_nothing(cluster: tuple[str, Path], mirror: Path, tmp_path: Path) -> None:
    path = write_config(tmp_path, config_data(str(tmp_path / "out"), str(mirror), scheduler_address=cluster[0]))
    cfg = load_config(path, env={})
    ingest(cfg, progress=False)
    before = tree_digest(cfg.paths.analysis_store)
    again = ingest(cfg, progress=False)
    assert (again.written, again.skipped) == (0, 6)
    assert tree_digest(cfg.paths.analysis_store) == before


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def http_port() -> Iterator[int]:
    """An HTTP server (say, a dashboard) where an operator might point the scheduler address by mistake."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    server.RequestHandlerClass.log_message = lambda *a: None  # type: ignore[method-assign]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _refused(tmp_path: Path, mirror: Path, address: str) -> str:
    path = write_config(tmp_path, config_data(str(tmp_path / "out"), str(mirror), scheduler_address=address))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    began = time.monotonic()
    with pytest.raises(ConfigError) as info:
        ingest(load_config(path, env={}), progress=False)
    assert time.monotonic() - began < 15
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, not even the data dir
    return str(info.value)


def test_an_address_where_nothing_answers_is_one_clear_error(mirror: Path, tmp_path: Path) -> None:
    address = f"tcp://127.0.0.1:{_unused_port()}"
    message = _refused(tmp_path, mirror, address)
    assert f"cannot reach the Dask scheduler at '{address}'" in message and "nothing answers there" in message


def test_an_http_server_is_not_taken_for_a_scheduler(
        mirror: Path, tmp_path: Path, http_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "SCHEDULER_TIMEOUT", 2.0)
    address = f"tcp://127.0.0.1:{http_port}"
    message = _refused(tmp_path, mirror, address)
    assert f"cannot reach the Dask scheduler at '{address}'" in message
    assert "not as a Dask scheduler" in message


def test_an_http_url_is_refused_by_the_config(mirror: Path, tmp_path: Path) -> None:
    path = write_config(tmp_path, config_data(str(tmp_path / "out"), str(mirror),
                                              scheduler_address="http://127.0.0.1:8787/status"))
    with pytest.raises(ConfigError, match="ingest.scheduler_address 'http://127.0.0.1:8787/status' is not a Dask"):
        load_config(path, env={})


UNSHARE = shutil.which("unshare")


def _can_unshare() -> bool:
    if UNSHARE is None:
        return False
    probe = subprocess.run([UNSHARE, "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        probe = subprocess.run([UNSHARE, "-rm", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs unshare(1) with a mount namespace (root or user namespaces)")
def test_a_worker_that_cannot_see_the_store_is_refused_before_anything_is_written(
        mirror: Path, tmp_path: Path) -> None:
    # The worker runs in a mount namespace of its own where an empty tmpfs hides the test's directory:
    # the same absolute path, another filesystem (like a node without the shared mount).
    hidden = tmp_path / "shared"
    hidden.mkdir()
    elsewhere = tmp_path / "cluster"
    elsewhere.mkdir()
    c = Cluster(elsewhere)
    flag = "-m" if subprocess.run([UNSHARE, "-m", "true"], capture_output=True).returncode == 0 else "-rm"
    try:
        address = c.start_scheduler()
        c.start_worker("blind", wrap=[UNSHARE, flag, "sh", "-c", f'mount -t tmpfs none "{hidden}" && exec "$0" "$@"'])
        c.wait_for_workers(address, 1)
        message = _refused(hidden, mirror, address)
    finally:
        c.close()
    assert f"1 of 1 Dask workers of '{address}' cannot see {hidden / 'out' / 'data'}" in message
    assert "shared filesystem" in message


class ThreadsInReverse:
    """An executor passed in by the caller: jobs on a thread pool, submitted last slab first."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    description = "a thread pool, last slab first"

    def check_sees(self, directory: Path) -> None:
        """Threads share this process's filesystem."""

    def map_unordered(self, fn, jobs):
        from concurrent.futures import ThreadPoolExecutor, as_completed

        self.seen += [(start, stop, replace) for _, start, stop, replace in jobs]
        with ThreadPoolExecutor(2) as pool:
            for future in as_completed([pool.submit(fn, *args) for args in reversed(jobs)]):
                yield future.result()


def test_an_executor_passed_in_runs_every_slab_and_gives_the_same_bytes(
        mirror: Path, reference: tuple[dict, xr.Dataset], tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, config_data(str(tmp_path / "out"), str(mirror))), env={})
    executor = ThreadsInReverse()
    report = ingest(cfg, progress=False, executor=executor)
    assert sorted(executor.seen) == [(k, k + 2, False) for k in range(0, 12, 2)]
    assert tree_digest(report.path) == reference[0]
    xr.testing.assert_identical(xr.load_dataset(cfg.paths.stats_file), reference[1])


def test_relative_paths_become_absolute_and_urls_stay(tmp_path: Path) -> None:
    from core.config import absolute_paths

    data = config_data("out", "gs://bucket/era5.zarr")
    data["paths"]["runs_dir"] = "/abs/runs"
    data["ingest"]["cds"] = {"download_dir": "dl"}
    cfg = absolute_paths(load_config(write_config(tmp_path, data), env={}), cwd=tmp_path)
    assert cfg.paths.analysis_store == tmp_path / "out" / "data" / "analysis.zarr"
    assert cfg.paths.runs == Path("/abs/runs") and cfg.paths.forecasts == tmp_path / "out" / "forecasts"
    assert cfg.ingest.mirror.url == "gs://bucket/era5.zarr" and cfg.ingest.cds.download_dir == tmp_path / "dl"
