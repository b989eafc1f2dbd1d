"""The catalog of published forecast runs, and the only place request parameters become paths.

Every path handed out is built from validated parts: a run name that matches
:data:`core.runs.RUN_NAME_RE` *and* is a published run, then a file name that is a key of that
run's manifest (or ``manifest.json`` itself), then checked once more to resolve inside the run
directory (a symlink cannot point a download elsewhere). Raw request strings never reach
``open``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

from core.runs import MANIFEST, RUN_NAME_RE, list_runs, parse_run_name, read_manifest, sha256_file
from serve.layout import MAPS_DIR, map_index, map_relpath

log = logging.getLogger(__name__)

class BadParameter(ValueError):
    """A request parameter is malformed (HTTP 422)."""


class NotFound(LookupError):
    """A well-formed request names something the catalog does not have (HTTP 404)."""


class CatalogError(RuntimeError):
    """A published run is inconsistent with its manifest (HTTP 500)."""


@dataclass(frozen=True)
class RunFile:
    """A file of a published run, resolved and checked against its manifest entry."""

    run: str
    relpath: str
    path: Path
    size: int
    sha256: str


@lru_cache(maxsize=256)
def _load_manifest(path: str, inode: int, mtime_ns: int, size: int) -> dict[str, Any]:
    # Keyed on the manifest's identity on disk: republishing a run renames a new directory into
    # place, which changes the inode, so a stale manifest is never served from the cache.
    return read_manifest(Path(path).parent)


@lru_cache(maxsize=256)
def _manifest_sha256(path: str, inode: int, mtime_ns: int, size: int) -> str:
    return sha256_file(Path(path))


@lru_cache(maxsize=4096)
def file_sha256(path: str, inode: int, size: int, mtime_ns: int) -> str:
    """The sha256 of a file, computed once per (inode, size, mtime): a change in place is a new key."""
    return sha256_file(Path(path))


class Catalog:
    """Read-only view of the published runs under one forecasts directory."""

    def __init__(self, forecasts_dir: Path) -> None:
        self.forecasts_dir = Path(forecasts_dir)

    def run_names(self) -> list[str]:
        """Published runs, oldest first (staging ``.tmp-*`` directories are never listed)."""
        return list_runs(self.forecasts_dir)

    def latest(self) -> str:
        """Name of the newest published run."""
        names = self.run_names()
        if not names:
            raise NotFound(f"no published runs in {self.forecasts_dir.name!r}")
        return names[-1]

    def run_dir(self, run: str) -> Path:
        """Directory of a published run, after checking the name's form and that it is listed."""
        if not RUN_NAME_RE.match(run):
            raise BadParameter(f"run {run!r} is not a run name (expected YYYYMMDDTHH, e.g. 20000101T00)")
        try:
            parse_run_name(run)
        except ValueError as exc:  # the right shape, but no such date or hour (20001340T00)
            raise BadParameter(str(exc)) from None
        if run not in self.run_names():
            raise NotFound(f"run {run!r} is not a published run")
        return self.forecasts_dir / run

    def manifest(self, run: str) -> dict[str, Any]:
        """The validated manifest of a published run (shared and cached: do not mutate it)."""
        path = self.run_dir(run) / MANIFEST
        try:
            st = path.stat()
            return _load_manifest(str(path), st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError as exc:
            raise NotFound(f"run {run!r} is not a published run") from exc
        except ValueError as exc:
            raise CatalogError(f"run {run!r} has an invalid manifest: {exc}") from exc

    def entry(self, run: str) -> dict[str, Any]:
        """Summary of a run for listings: init time, downloadable files, map channels and leads."""
        manifest = self.manifest(run)
        maps = map_index(manifest["files"])
        leads = sorted({lead for hours in maps.values() for lead in hours})
        init = pd.Timestamp(manifest["init_time"])
        return {
            "name": run,
            "init_time": init.isoformat(),
            "created": manifest.get("created"),
            "files": sorted(k for k in manifest["files"] if not k.startswith(MAPS_DIR + "/")) + [MANIFEST],
            "channels": list(maps),
            "lead_hours": leads,
            "valid_times": [(init + pd.Timedelta(hours=h)).isoformat() for h in leads],
        }

    def entries(self) -> list[dict[str, Any]]:
        """Entries of every published run with a readable manifest, oldest first."""
        out = []
        for run in self.run_names():
            try:
                out.append(self.entry(run))
            except (NotFound, CatalogError) as exc:
                # One broken or vanishing run must not take the whole listing down.
                log.warning("skipping run %s in listing: %s", run, exc)
        return out

    def file(self, run: str, relpath: str) -> RunFile:
        """A file of a run by its manifest path (``forecast.nc``, ``forecast.zarr/zarr.json`` …)."""
        run_dir = self.run_dir(run)
        if relpath == MANIFEST:
            path = run_dir / MANIFEST
            self.manifest(run)  # validates it
            st = path.stat()
            return RunFile(run, relpath, path, st.st_size,
                           _manifest_sha256(str(path), st.st_ino, st.st_mtime_ns, st.st_size))
        manifest = self.manifest(run)
        entry = manifest["files"].get(relpath)
        if entry is None:
            prefix = relpath.rstrip("/") + "/"
            hint = (f"; {relpath.rstrip('/')!r} is a directory, request its files by their manifest paths"
                    if any(k.startswith(prefix) for k in manifest["files"]) else "")
            raise NotFound(f"run {run!r} has no file {relpath!r}{hint}")
        resolved = (run_dir / relpath).resolve()
        if not resolved.is_relative_to(run_dir.resolve()):
            # A symlink published inside a run must not become a way to read other files.
            raise NotFound(f"file {relpath!r} of run {run!r} links out of the run and is not served")
        if not resolved.is_file():
            raise CatalogError(f"file {resolved} of run {run!r} is in its manifest but missing on disk")
        st = resolved.stat()
        if st.st_size != entry["size"]:
            raise CatalogError(f"file {resolved} of run {run!r} is {st.st_size} bytes, manifest says {entry['size']}")
        # Same size is not the same bytes: a file damaged in place must not be served under its old ETag.
        if file_sha256(str(resolved), st.st_ino, st.st_size, st.st_mtime_ns) != entry["sha256"]:
            raise CatalogError(f"file {resolved} of run {run!r} no longer has the sha256 its manifest records")
        return RunFile(run, relpath, resolved, st.st_size, str(entry["sha256"]))

    def map_file(self, run: str, channel: str, lead: int) -> RunFile:
        """The PNG map of a run's channel at a lead time (hours)."""
        maps = map_index(self.manifest(run)["files"])
        if channel not in maps:
            known = ", ".join(maps) or "none"
            raise NotFound(f"run {run!r} has no maps for channel {channel!r} (channels: {known})")
        if lead not in maps[channel]:
            leads = ", ".join(str(h) for h in maps[channel])
            raise NotFound(f"run {run!r} has no map of {channel!r} at lead {lead} h (leads: {leads})")
        return self.file(run, map_relpath(channel, lead))
