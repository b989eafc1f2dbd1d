"""Forecast-run files on disk: naming, checksums, manifest, atomic publication by rename.

A run is assembled in ``<forecasts>/.tmp-<name>-<pid>/`` and published by one ``os.rename`` to
``<forecasts>/<name>/``, so a reader never sees a partial run.

Readers of a published run hold a shared ``flock`` on the run directory itself (:func:`reading`);
whoever removes a run (retention, a republication) first takes the exclusive lock without
waiting, and leaves the run alone if a reader holds it. The lock is on the directory's inode, so
it follows the run through the renames of publication and removal, and the kernel drops it when
the reader dies.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from core.errors import ConfigError, DataContractError, MissingInputError
from core.schema import SCHEMA_VERSION, validate_manifest

# \Z, not $: "$" also matches before a trailing newline, so "20000101T00\n" would pass as a run name.
log = logging.getLogger(__name__)

RUN_NAME_RE = re.compile(r"^\d{8}T\d{2}\Z")
MANIFEST = "manifest.json"


def run_name(init_time: datetime | pd.Timestamp | str) -> str:
    """Directory name of the run for an initial time: ``%Y%m%dT%H``."""
    return pd.Timestamp(init_time).strftime("%Y%m%dT%H")


def parse_run_name(name: str) -> pd.Timestamp:
    """Initial time of a run directory name; ``ValueError`` if it is not one."""
    if not RUN_NAME_RE.match(name):
        raise ConfigError(f"{name!r} is not a run name (expected YYYYMMDDTHH)")
    try:
        return pd.Timestamp(datetime.strptime(name, "%Y%m%dT%H"))
    except ValueError:
        raise ConfigError(f"{name!r} is not a run name: no such date and hour (expected YYYYMMDDTHH)") from None


def is_run_name(name: str) -> bool:
    """Whether ``name`` is a run name of a real date and hour (``20000101T00``; not ``20001340T00``)."""
    try:
        parse_run_name(name)
    except ValueError:
        return False
    return True


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def staging_dir(forecasts_dir: Path, name: str) -> Path:
    """A fresh private directory to assemble run ``name`` in (removed if it already exists)."""
    forecasts_dir.mkdir(parents=True, exist_ok=True)
    tmp = forecasts_dir / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def write_manifest(run_dir: Path, init_time: datetime | pd.Timestamp, provenance: dict[str, Any]) -> dict[str, Any]:
    """Checksum every file under ``run_dir`` and write ``manifest.json`` describing them."""
    files = {}
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(run_dir).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "init_time": pd.Timestamp(init_time).isoformat(),
        "created": pd.Timestamp.now(tz="UTC").isoformat(),
        "files": files,
        "provenance": provenance,
    }
    validate_manifest(manifest)
    tmp = run_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, run_dir / MANIFEST)
    return manifest


def publish(staging: Path, final: Path) -> Path:
    """Move a finished run into place with one rename; an older run of that name is replaced."""
    if not (staging / MANIFEST).is_file():
        raise ValueError(f"refusing to publish {staging}: it has no {MANIFEST}")
    if final.exists():
        # Rename the old run aside first so the name is never empty of a complete run for long
        # and never holds a half-deleted one.
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.rename(final, old)
        os.rename(staging, final)
        # A reader still inside the old run keeps it; once this process is gone, retention's sweep removes it.
        remove_unread(old)
    else:
        os.rename(staging, final)
    return final


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """Load and validate a published run's manifest."""
    path = run_dir / MANIFEST
    if not path.is_file():
        raise DataContractError(f"run {run_dir.name}: no {MANIFEST}")
    manifest = json.loads(path.read_text())
    validate_manifest(manifest, what=f"manifest of run {run_dir.name}")
    return manifest


def list_runs(forecasts_dir: Path) -> list[str]:
    """Names of published runs (directories with a manifest), oldest first; other folders are skipped and logged."""
    if not forecasts_dir.is_dir():
        return []
    names = []
    for p in forecasts_dir.iterdir():
        if not (p.is_dir() and RUN_NAME_RE.match(p.name) and (p / MANIFEST).is_file()):
            continue
        if not is_run_name(p.name):  # a run's shape but no such date: not a run, and never a reason to fail
            log.warning("skipping %s: %r is not a real date and hour", p, p.name)
            continue
        names.append(p.name)
    return sorted(names)


class RunGone(MissingInputError):
    """The run was removed or replaced before its reader got hold of it."""


@contextmanager
def reading(run_dir: Path) -> Iterator[Path]:
    """Hold a shared reader lock on a published run for the block, so retention leaves it in place."""
    run_dir = Path(run_dir)
    try:
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise RunGone(f"run {run_dir.name} is not published") from None
    try:
        # Blocking: a remover holds the exclusive lock only for the instant of its rename.
        fcntl.flock(fd, fcntl.LOCK_SH)
        if not (run_dir / MANIFEST).is_file() or os.stat(run_dir).st_ino != os.fstat(fd).st_ino:
            raise RunGone(f"run {run_dir.name} was removed or replaced while being opened")
        yield run_dir
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextmanager
def exclusive(run_dir: Path) -> Iterator[bool]:
    """Try the exclusive lock of a run directory without waiting; yield whether no reader holds it."""
    try:
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            got = True
        except BlockingIOError:
            got = False
        yield got
    finally:
        os.close(fd)


def remove_unread(path: Path) -> bool:
    """Delete a directory unless a reader holds its lock; return whether it was removed."""
    with exclusive(path) as free:
        if not free:
            return False
        shutil.rmtree(path)
    return True
