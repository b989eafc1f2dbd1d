"""Executors that run slab jobs: inline, on a Dask LocalCluster, or on an existing Dask scheduler.

Slabs are independent regions of the store (chunks are one time each), so workers may write them
concurrently without coordination; the single-writer lock is held by the coordinating process for
the whole run. Each job is a plain picklable call (function + arguments), so a worker in another
process or on another machine runs it the same way, provided it has spherecast installed and sees
the store at the same absolute path (a shared filesystem: the orchestrator makes every path in the
config absolute before a job leaves it, and :meth:`SlabExecutor.check_sees` proves the sharing).

The orchestrator (``ingest.build.ingest``) takes any object with this class's three members
(``description``, ``check_sees``, ``map_unordered``): the Prefect flow passes one that submits each
slab as a Prefect task around a SlabExecutor, so retries stay per slab.
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from core.errors import ConfigError
from core.location import as_location, is_remote

log = logging.getLogger(__name__)

SCHEDULER_TIMEOUT = 30.0  # seconds to connect to and greet an existing scheduler, and to wait for a worker


class Executor(Protocol):
    """What the ingest orchestrator needs of an executor."""

    @property
    def description(self) -> str: ...

    def check_sees(self, directory: Path) -> None: ...

    def map_unordered(self, fn: Callable[..., Any], jobs: Sequence[tuple[Any, ...]]) -> Iterator[Any]: ...


def _read_probe(path: str) -> str | None:
    """On a worker: the text of the probe file, or None where this worker cannot read it."""
    try:
        return as_location(path).read_text()
    except OSError:  # FileNotFoundError, PermissionError; an object store's refusals are OSErrors too
        return None


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (where a probe file can be written)."""
    path = as_location(path)
    if is_remote(path):  # no directories on an object store: a probe object goes under the prefix itself
        return path
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class SlabExecutor:
    """Submits slab jobs to Dask, or runs them inline when one local worker is asked for."""

    def __init__(self, client: Any | None) -> None:
        self.client = client

    @property
    def description(self) -> str:
        """Where jobs run, for logs."""
        if self.client is None:
            return "in this process"
        return f"dask scheduler {self.client.scheduler.address} ({len(self.client.scheduler_info()['workers'])} workers)"

    def check_sees(self, directory: Path) -> None:
        """Raise ConfigError unless every Dask worker reads what this process writes under ``directory``."""
        if self.client is None:
            return
        address = self.client.scheduler.address
        try:
            self.client.wait_for_workers(1, timeout=SCHEDULER_TIMEOUT)
        except TimeoutError:
            raise ConfigError(f"the Dask scheduler at {address!r} (ingest.scheduler_address) has no workers "
                              f"after {SCHEDULER_TIMEOUT:g} s: start some (dask worker {address})") from None
        # A file written here and read back by every worker: same path, same bytes, or no shared filesystem.
        # It goes in the closest existing ancestor and is removed at once, so nothing on disk changes.
        where = nearest_existing(directory)
        probe = where / f".spherecast-probe-{uuid.uuid4().hex}"
        token = f"{socket.gethostname()} {uuid.uuid4().hex}"
        try:
            probe.write_text(token)
        except OSError as exc:
            raise ConfigError(f"cannot write under {where} (the store's directory): {exc.strerror or exc}") from None
        try:
            seen = self.client.run(_read_probe, str(probe))
        finally:
            probe.unlink(missing_ok=True)
        blind = sorted(worker for worker, text in seen.items() if text != token)
        if blind:
            raise ConfigError(f"{len(blind)} of {len(seen)} Dask workers of {address!r} cannot see {directory} "
                              f"({', '.join(blind)}): a file written in {where} here is not there for them. Workers "
                              + ("need the object store's endpoint and credentials in their environment "
                                 "(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, …)" if is_remote(where) else
                                 "need the store on a shared filesystem at the same absolute path")
                              + "; nothing was written")

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one job and return its result (blocking); exceptions propagate unchanged."""
        if self.client is None:
            return fn(*args)
        # pure=False: a retried slab must really run again, not return Dask's cached failure.
        return self.client.submit(fn, *args, pure=False).result()

    def map_unordered(self, fn: Callable[..., Any], jobs: Sequence[tuple[Any, ...]]) -> Iterator[Any]:
        """Run every job, yielding results as they finish; a failure is raised once every job has ended."""
        if self.client is None:
            for args in jobs:
                yield fn(*args)
            return
        from distributed import as_completed

        futures = [self.client.submit(fn, *args, pure=False) for args in jobs]
        failure: Exception | None = None
        try:
            for future in as_completed(futures):
                try:
                    result = future.result()
                except Exception as exc:  # noqa: BLE001 - re-raised below, after the other jobs
                    # Cancelling would not stop a job already running on a worker: it would go on writing
                    # after the caller saw the error (and maybe removed or rolled back the store). So every
                    # job ends first; the slabs they write are kept for the rerun.
                    failure = failure or exc
                    continue
                yield result
        finally:
            self.client.cancel([f for f in futures if not f.done()])  # only if the caller stopped early
        if failure is not None:
            raise failure


def _unreachable(address: str, why: str) -> ConfigError:
    return ConfigError(f"cannot reach the Dask scheduler at {address!r} (ingest.scheduler_address, "
                       f"e.g. tcp://host:8786): {why}")


def _probe(address: str, timeout: float) -> None:
    """Connect to a scheduler and ask its identity within ``timeout``, or raise a ConfigError naming it."""
    import asyncio

    from distributed.core import rpc

    # First plain TCP: "nothing there" and "something there that is not a scheduler" are different mistakes.
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme in ("tcp", "tls") and parts.hostname and parts.port:
        try:
            socket.create_connection((parts.hostname, parts.port), timeout=timeout).close()
        except OSError as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise _unreachable(address, f"nothing answers there within {timeout:g} s ({reason})") from None

    async def identity() -> dict:
        async with rpc(address, timeout=timeout) as scheduler:
            return await asyncio.wait_for(scheduler.identity(), timeout)

    # In a thread of its own: the caller may already run an event loop (Prefect flows do).
    with ThreadPoolExecutor(1) as pool:
        try:
            info = pool.submit(asyncio.run, identity()).result()
        except Exception as exc:  # noqa: BLE001  (any failure of the greeting means "not a scheduler")
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise _unreachable(address, f"something answers there, but not as a Dask scheduler within {timeout:g} s "
                                        f"({reason}); is it the dashboard's or another service's port? "
                                        "A scheduler listens on 8786 by default") from None
    if not isinstance(info, dict) or info.get("type") != "Scheduler":
        kind = info.get("type") if isinstance(info, dict) else type(info).__name__
        raise _unreachable(address, f"a Dask {kind} answers there, not a scheduler")


@contextmanager
def slab_executor(workers: int, scheduler_address: str | None = None) -> Iterator[SlabExecutor]:
    """A SlabExecutor on ``scheduler_address``, on a LocalCluster of ``workers`` processes, or inline."""
    if scheduler_address:
        from distributed import Client

        _probe(scheduler_address, SCHEDULER_TIMEOUT)
        try:
            client = Client(scheduler_address, timeout=f"{SCHEDULER_TIMEOUT:g}s")
        except (OSError, ValueError) as exc:
            raise _unreachable(scheduler_address, str(exc)) from exc
        with client:
            yield SlabExecutor(client)
        return
    if workers <= 1:
        yield SlabExecutor(None)
        return
    from distributed import Client, LocalCluster

    # One thread per worker process: regridding and zstd release the GIL only partly, and the
    # machine's cores are better used by processes. No dashboard: it needs bokeh and a port.
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.WARNING) as cluster, Client(cluster) as client:
        log.info("dask LocalCluster with %d workers", workers)
        yield SlabExecutor(client)
