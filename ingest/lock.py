"""The analysis store's single-writer lock: an OS advisory lock (``flock``) on ``<store>.lock``.

The lock file sits beside the store, not inside it, because the store directory itself is
created by an atomic rename and may not exist yet when a writer starts. ``flock`` belongs to the
open file, so the kernel releases it when the holding process dies, even by SIGKILL: a lock file
left behind by a dead writer never blocks the next one. The holder writes its pid, host and start
time into the file so that a refused writer can say who is in the way.

The lock is re-entrant within one process (a build that extends the store takes it twice), and it
is never inherited by child processes (Python opens files non-inheritable). Dask workers that
write slabs do not take it: the coordinating process holds it for the whole run.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from core import errors

log = logging.getLogger(__name__)


class StoreLockedError(errors.StoreLockedError):
    """Another process holds the store's writer lock (a core.errors.StoreLockedError: one CLI line, exit 2)."""


# path of the lock file → [file descriptor, depth] for locks this process holds
_HELD: dict[str, list[int]] = {}
_GUARD = threading.Lock()


def lock_path(store: Path) -> Path:
    """The lock file of a store: ``<store>.lock`` in the same directory."""
    store = Path(store)
    return store.with_name(store.name + ".lock")


def lock_holder(store: Path) -> dict[str, object] | None:
    """What the lock file says about its last holder (pid, host, since), or None if unreadable."""
    try:
        text = lock_path(store).read_text()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def _describe_holder(store: Path) -> str:
    info = lock_holder(store)
    if info is None:
        return "a process that has not yet written its details"
    return f"pid {info.get('pid')} on host {info.get('host')} since {info.get('since')}"


@contextmanager
def writer_lock(store: Path, on_acquire: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Hold the store's writer lock for the block; raise StoreLockedError at once if it is taken."""
    store = Path(store)
    path = lock_path(store)
    key = str(path.resolve())
    with _GUARD:
        held = _HELD.get(key)
        if held is not None:
            held[1] += 1
    if held is not None:
        try:
            yield store
        finally:
            _release(key)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # No O_TRUNC: truncating before we hold the lock would erase the holder's details.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreLockedError(f"store {store} is being written by another process "
                               f"({_describe_holder(store)}; lock file {path})") from None
    with _GUARD:
        _HELD[key] = [fd, 1]
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        log.debug("writer lock %s taken", path)
        if on_acquire is not None:
            on_acquire(store)
        yield store
    finally:
        _release(key)


def _release(key: str) -> None:
    with _GUARD:
        held = _HELD[key]
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[key]
    # The file stays: deleting it would let a waiter lock an inode nobody else can find.
    fcntl.flock(held[0], fcntl.LOCK_UN)
    os.close(held[0])
