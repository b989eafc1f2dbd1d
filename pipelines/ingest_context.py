"""The Dask executor of the running ``ingest_era5`` flow, shared with its slab tasks.

Prefect tasks run in threads of the flow's process; a Dask client is not a task parameter
(Prefect records parameters), so the flow installs it here for the duration of the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ingest.parallel import SlabExecutor

_current: SlabExecutor | None = None


@contextmanager
def installed(executor: SlabExecutor) -> Iterator[SlabExecutor]:
    """Make ``executor`` the one slab tasks use until the block ends."""
    global _current
    previous, _current = _current, executor
    try:
        yield executor
    finally:
        _current = previous


def run(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a slab job on the installed executor, or inline when none is installed."""
    return fn(*args) if _current is None else _current.run(fn, *args)
