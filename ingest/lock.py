"""The analysis store's single-writer lock: an OS advisory lock (``flock``) on ``<store>.lock``.

The lock file sits beside the store, not inside it, because the store directory itself is
created by an atomic rename and may not exist yet when a writer starts. ``flock`` belongs to the
open file, so the kernel releases it when the holding process dies, even by SIGKILL: a lock file
left behind by a dead writer never blocks the next one. The holder writes its pid, host and start
time into the file so that a refused writer can say who is in the way.

The lock is re-entrant within one process (a build that extends the store takes it twice), and it
is never inherited by child processes (Python opens files non-inheritable). Dask workers that
write slabs do not take it: the coordinating process holds it for the whole run.

On an object store (``s3://…``, ``memory://…``) the lock is the object ``<store>.lock``, created
with a conditional PUT (``If-None-Match: *``) and deleted on release; see :func:`_take_object`.
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
from core.location import as_location, is_remote

log = logging.getLogger(__name__)


class StoreLockedError(errors.StoreLockedError):
    """Another process holds the store's writer lock (a core.errors.StoreLockedError: one CLI line, exit 2)."""


# path of the lock file → [file descriptor, depth] for locks this process holds
_HELD: dict[str, list[int]] = {}
_GUARD = threading.Lock()


def lock_path(store: Path) -> Path:
    """The lock file of a store: ``<store>.lock`` in the same directory."""
    store = as_location(store)
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
    store = as_location(store)
    path = lock_path(store)
    remote = is_remote(path)
    key = str(path) if remote else str(path.resolve())
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
    if remote:
        _take_object(store, path)
        with _GUARD:
            _HELD[key] = [-1, 1]
        try:
            log.debug("writer lock %s taken", path)
            if on_acquire is not None:
                on_acquire(store)
            yield store
        finally:
            _release(key, path)
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
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_me()).encode(), 0)
        log.debug("writer lock %s taken", path)
        if on_acquire is not None:
            on_acquire(store)
        yield store
    finally:
        _release(key)


def _me() -> dict[str, object]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "since": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds")}


def _left_by_dead_process(info: dict[str, object] | None) -> bool:
    """True when the holder ran on this host and is no longer running (only then is it provably gone)."""
    if info is None or info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return False
    pid = int(info["pid"])  # type: ignore[arg-type]
    if pid == os.getpid():
        return True  # not in _HELD, so not ours now: a lock this process failed to delete earlier
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _take_object(store: Path, path: Path) -> None:
    """Create the lock object exclusively (If-None-Match: *), replacing one a dead process on this host left."""
    # An object store has no flock: the lock is an object that exists while a writer holds it. Its
    # creation is conditional, so of two writers exactly one succeeds. Nothing releases it when its
    # holder is killed, so a lock left by a process of this host that is gone is removed here; one
    # from another host cannot be proven dead and is for the operator to delete.
    for attempt in (1, 2):
        try:
            path.fs.pipe_file(path.path, json.dumps(_me()).encode(), mode="create")
            return
        except (FileNotFoundError, PermissionError) as exc:  # no such bucket, or these credentials may not write
            raise errors.ConfigError(f"cannot create the writer lock {path} for store {store}: {exc}; check that the "
                                     "bucket exists and that the credentials in this environment may write to it") from None
        except FileExistsError:
            info = lock_holder(store)
            if attempt == 1 and _left_by_dead_process(info):
                log.warning("removing the writer lock %s left by pid %s of this host, which is no longer running",
                            path, (info or {}).get("pid"))
                path.unlink(missing_ok=True)
                continue
            raise StoreLockedError(f"store {store} is being written by another process ({_describe_holder(store)}; "
                                   f"lock object {path}: if that process is gone, delete the object and rerun)") from None


def _release(key: str, remote: Path | None = None) -> None:
    with _GUARD:
        held = _HELD[key]
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[key]
    if remote is not None:
        try:
            remote.unlink(missing_ok=True)
        except OSError as exc:  # the data is safe; only the next writer is refused until it is deleted
            log.warning("could not remove the writer lock %s (%s): delete it before the next ingest", remote, exc)
        return
    # The file stays: deleting it would let a waiter lock an inode nobody else can find.
    fcntl.flock(held[0], fcntl.LOCK_UN)
    os.close(held[0])
