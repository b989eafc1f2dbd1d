"""Where a store lives: a local path, or an object-store URL (``s3://``, ``gs://``, ``memory://`` …).

A local location stays a plain :class:`pathlib.Path`, so every local code path is unchanged. A URL
becomes a :class:`upath.UPath`, which keeps the pathlib API (``/``, ``name``, ``parent``,
``exists``, ``read_bytes``, ``write_bytes``, ``unlink``, ``iterdir``) over fsspec. What an object
store cannot do as a filesystem does — rename, ``flock``, ``open(path)`` for NetCDF libraries —
is done here or in the one module that needs it, after asking :func:`is_remote`. Credentials and
endpoints come from the filesystem's own environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``GOOGLE_APPLICATION_CREDENTIALS`` …), as every fsspec user expects, never from the config file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import xarray as xr
from upath import UPath

from core.errors import ConfigError

# Protocols that name this machine's own filesystem: they stay plain paths.
_LOCAL = {"", "file", "local"}


def is_url(value: object) -> bool:
    """Whether a config value names a URL (``scheme://…``) rather than a filesystem path."""
    return isinstance(value, UPath) or (isinstance(value, str) and "://" in value)


def as_location(value: str | os.PathLike[str] | UPath) -> Path:
    """A local ``Path`` for a path or ``file://`` URL, a ``UPath`` for any other URL."""
    if isinstance(value, UPath):
        return Path(value.path) if value.protocol in _LOCAL else value
    if isinstance(value, Path):
        return value
    text = os.fspath(value)
    if "://" not in text:
        return Path(text)
    try:
        # No listing cache: other processes (Dask workers, the next ingest) write the same prefix, and
        # a cached listing would answer "absent" for what they wrote.
        upath = UPath(text, use_listings_cache=False)
    except (ValueError, ImportError) as exc:  # an unknown protocol, or its fsspec package is missing
        raise ConfigError(f"cannot use {text!r} as a location: {exc}") from None
    return Path(upath.path) if upath.protocol in _LOCAL else upath


def is_remote(location: object) -> bool:
    """Whether a location is on an object store (no rename, no locks, no local open)."""
    return isinstance(location, UPath) and location.protocol not in _LOCAL


def zarr_url(location: Path) -> str:
    """The string Zarr and xarray open a location by (a local path, or the URL)."""
    return str(location)


def exists(location: Path) -> bool:
    """Whether a file or object (or a directory/prefix holding some) exists at the location."""
    if is_remote(location):
        location.fs.invalidate_cache()  # a listing cached before another process wrote must not answer
    return location.exists()


def object_version(info: dict[str, Any]) -> object:
    """What changes on every write of an object, from its fsspec ``info``: S3/GCS ETag, else a time."""
    return info.get("ETag") or info.get("LastModified") or info.get("created") or info.get("mtime")


def stamp(location: Path) -> tuple[object, ...] | None:
    """What changes when a file is rewritten (size, mtime and inode; an object's size and ETag), None if absent."""
    if is_remote(location):
        try:
            info = location.fs.info(location.path)
        except FileNotFoundError:
            return None
        return (info.get("size"), object_version(info))
    try:
        st = location.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def write_bytes(location: Path, data: bytes) -> None:
    """Replace a file whole: temp file + rename locally, one PUT (atomic by itself) on an object store."""
    if is_remote(location):
        location.fs.pipe_file(location.path, data)
        return
    location.parent.mkdir(parents=True, exist_ok=True)
    tmp = location.with_name(f".{location.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, location)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def local_copy(location: Path) -> Iterator[Path]:
    """A local path holding the file's bytes (the file itself when local), for libraries that open paths."""
    if not is_remote(location):
        yield location
        return
    with tempfile.TemporaryDirectory(prefix="spherecast-get-") as tmp:
        path = Path(tmp) / location.name
        location.fs.get_file(location.path, str(path))
        yield path


def load_netcdf(location: Path, **kwargs: Any) -> xr.Dataset:
    """A NetCDF file read whole into memory, from a local path or an object store."""
    with local_copy(location) as path, xr.open_dataset(path, **kwargs) as ds:
        return ds.load()


def write_netcdf(ds: xr.Dataset, location: Path) -> None:
    """Write a dataset as NetCDF atomically (temp file + rename locally, one upload remotely)."""
    if not is_remote(location):
        location.parent.mkdir(parents=True, exist_ok=True)
        tmp = location.with_name(f".{location.name}.{os.getpid()}.tmp")
        try:
            ds.to_netcdf(tmp)
            os.replace(tmp, location)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return
    with tempfile.TemporaryDirectory(prefix="spherecast-put-") as tmp:
        path = Path(tmp) / location.name
        ds.to_netcdf(path)
        location.fs.put_file(str(path), location.path)


def upload_tree(local: Path, location: Path, last: str | None = None) -> None:
    """Copy a local directory's files under a remote prefix; the file named ``last`` (relative) goes up last."""
    files = sorted(p for p in local.rglob("*") if p.is_file())
    tail = [p for p in files if last is not None and p.relative_to(local).as_posix() == last]
    for path in [p for p in files if p not in tail] + tail:
        location.fs.put_file(str(path), (location / path.relative_to(local).as_posix()).path)


def remove_tree(location: Path) -> None:
    """Remove a directory or a remote prefix and everything under it (nothing if absent)."""
    if is_remote(location):
        if location.fs.exists(location.path):
            location.fs.rm(location.path, recursive=True)
        return
    shutil.rmtree(location, ignore_errors=True)
