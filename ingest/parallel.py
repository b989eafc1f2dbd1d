"""Run slab jobs in parallel on Dask: a LocalCluster by default, or an existing scheduler.

Slabs are independent regions of the store (chunks are one time each), so workers may write them
concurrently without coordination; the single-writer lock is held by the coordinating process for
the whole run. Each job is a plain picklable call (function + arguments), so a worker in another
process or on another machine (with spherecast installed and the store on a shared filesystem)
runs it the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from core.errors import ConfigError

log = logging.getLogger(__name__)


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

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one job and return its result (blocking); exceptions propagate unchanged."""
        if self.client is None:
            return fn(*args)
        # pure=False: a retried slab must really run again, not return Dask's cached failure.
        return self.client.submit(fn, *args, pure=False).result()

    def map_unordered(self, fn: Callable[..., Any], jobs: Sequence[tuple[Any, ...]]) -> Iterator[Any]:
        """Run every job, yielding results as they finish; the first failure cancels the rest."""
        if self.client is None:
            for args in jobs:
                yield fn(*args)
            return
        from distributed import as_completed

        futures = [self.client.submit(fn, *args, pure=False) for args in jobs]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            self.client.cancel([f for f in futures if not f.done()])


SCHEDULER_TIMEOUT = 30.0  # seconds to connect to and greet an existing scheduler


def _probe(address: str, timeout: float) -> None:
    """Connect and handshake with a scheduler within ``timeout``, or raise a ValueError naming it."""
    import asyncio

    from distributed.comm import connect

    async def greet() -> None:
        comm = await asyncio.wait_for(connect(address, timeout=timeout), timeout)
        await comm.close()

    # In a thread of its own: the caller may already run an event loop (Prefect flows do).
    with ThreadPoolExecutor(1) as pool:
        try:
            pool.submit(asyncio.run, greet()).result()
        except (TimeoutError, OSError, ValueError, TypeError) as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise ConfigError(f"cannot reach the Dask scheduler at {address!r} (ingest.scheduler_address, "
                              f"e.g. tcp://host:8786) within {timeout:g} s: {reason}") from None


@contextmanager
def slab_executor(workers: int, scheduler_address: str | None = None) -> Iterator[SlabExecutor]:
    """A SlabExecutor on ``scheduler_address``, on a LocalCluster of ``workers`` processes, or inline."""
    if scheduler_address:
        from distributed import Client

        _probe(scheduler_address, SCHEDULER_TIMEOUT)
        try:
            client = Client(scheduler_address, timeout=f"{SCHEDULER_TIMEOUT:g}s")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot reach the Dask scheduler at {scheduler_address!r}: {exc}") from exc
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
