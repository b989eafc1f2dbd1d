"""The zip decoder of CDS deliveries: the new CDS zips the parts of a request that mixes instantaneous
and accumulated variables (``data_stream-oper_stepType-instant.nc`` + ``…-accum.nc``); members are
extracted once per (file, size, mtime) into a private directory and merged.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import xarray as xr

from core.errors import SourceError
from ingest.delivery import merge

_ZIP_CACHE: dict[tuple[str, int, int], Path] = {}


def open_zip(path: Path, open_member: Callable[[Path], xr.Dataset]) -> xr.Dataset:
    """A zipped delivery: each member opened by ``open_member`` (the format of its own bytes), merged."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _ZIP_CACHE:
        target = Path(tempfile.mkdtemp(prefix="spherecast-cds-zip-"))
        atexit.register(shutil.rmtree, target, True)
        try:
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if not n.endswith("/")]
                archive.extractall(target)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise SourceError(f"CDS zip {str(path)!r} is corrupt ({type(exc).__name__}: {exc})") from exc
        if not names:
            raise SourceError(f"CDS zip {str(path)!r} is empty")
        _ZIP_CACHE[key] = target
    members = sorted(p for p in _ZIP_CACHE[key].rglob("*") if p.is_file())
    pieces = []
    for member in members:
        try:
            pieces.append((f"{path}!{member.name}", open_member(member)))
        except ValueError as exc:
            raise SourceError(f"CDS zip {str(path)!r}, member {member.name!r}: {exc}") from exc
    return merge(pieces) if len(pieces) > 1 else pieces[0][1]
