"""The catalog of published forecast runs, and the only place request parameters become paths.

Every path handed out is built from validated parts: a run name that matches
:data:`core.runs.RUN_NAME_RE` *and* is a published run, then a file name that is a key of that
run's manifest (or ``manifest.json`` itself), then checked once more to resolve inside the run
directory (a symlink cannot point a download elsewhere). Raw request strings never reach
``open``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

from core.errors import DataContractError
from core.runs import MANIFEST, RUN_NAME_RE, list_runs, parse_run_name, read_manifest, sha256_file
from serve.layout import ERROR_MAPS_INDEX, MAPS_DIR, animation_index, animation_relpath, map_index, map_relpath
from serve.products_derived import ERROR_PREFIX

log = logging.getLogger(__name__)

# The run-name format as OpenAPI documents it: real months, days ≤ 31 and hours ≤ 23. A name it admits that
# is no calendar date (20000230T00) is a 404, not a 422: the request is well formed, the run cannot exist.
RUN_PATTERN = r"^[0-9]{4}(0[1-9]|1[0-2])(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3])$"
_RUN_PATTERN_RE = re.compile(RUN_PATTERN.removesuffix("$") + r"\Z")

class BadParameter(ValueError):
    """A request parameter is malformed (HTTP 422)."""


class NotFound(LookupError):
    """A well-formed request names something the catalog does not have (HTTP 404)."""


class CatalogError(RuntimeError):
    """A published run is inconsistent with its manifest (HTTP 503, neutral body)."""


@dataclass(frozen=True)
class RunFile:
    """A file of a published run, resolved and checked against its manifest entry."""

    run: str
    relpath: str
    path: Path
    size: int
    sha256: str
    lock_dir: Path | None = None
    """Directory whose reader lock covers the file; None: the published run the path lies in."""


@lru_cache(maxsize=256)
def _load_manifest(path: str, inode: int, mtime_ns: int, size: int) -> dict[str, Any]:
    # Keyed on the manifest's identity on disk: republishing a run renames a new directory into
    # place, which changes the inode, so a stale manifest is never served from the cache.
    return read_manifest(Path(path).parent)


@lru_cache(maxsize=256)
def _load_error_index(path: str, inode: int, mtime_ns: int, size: int) -> dict[str, dict[str, Any]]:
    # Keyed like the manifest: a re-verification swaps a new maps/ (new inode) in.
    files = json.loads(Path(path).read_text())["files"]
    if not isinstance(files, dict):
        raise DataContractError("'files' is not an object")
    # Only error maps: the index can never shadow or add a forecast map of the run.
    return {k: v for k, v in files.items() if k.startswith(f"{MAPS_DIR}/{ERROR_PREFIX}")}


@lru_cache(maxsize=256)
def _manifest_sha256(path: str, inode: int, mtime_ns: int, size: int) -> str:
    return sha256_file(Path(path))


@lru_cache(maxsize=4096)
def file_sha256(path: str, inode: int, size: int, mtime_ns: int) -> str:
    """The sha256 of a file, computed once per (inode, size, mtime): a change in place is a new key."""
    return sha256_file(Path(path))


class Catalog:
    """Read-only view of the published runs under one forecasts directory."""

    def __init__(self, forecasts_dir: Path, verification_dir: Path | None = None) -> None:
        self.forecasts_dir = Path(forecasts_dir)
        self.verification_dir = Path(verification_dir) if verification_dir is not None else None

    def run_names(self) -> list[str]:
        """Published runs, oldest first (staging ``.tmp-*`` directories are never listed)."""
        return list_runs(self.forecasts_dir)

    def select(self, since: datetime | None = None, until: datetime | None = None) -> list[str]:
        """Published runs with ``since <= init time < until``, newest first (bounds naive UTC, either may be None)."""
        out = []
        for name in reversed(self.run_names()):
            init = parse_run_name(name).to_pydatetime()
            if (since is None or init >= since) and (until is None or init < until):
                out.append(name)
        return out

    def latest(self) -> str:
        """Name of the newest published run."""
        names = self.run_names()
        if not names:
            raise NotFound(f"no published runs in {self.forecasts_dir.name!r}")
        return names[-1]

    def run_dir(self, run: str) -> Path:
        """Directory of a published run, after checking the name's form and that it is listed."""
        if not (RUN_NAME_RE.match(run) and _RUN_PATTERN_RE.match(run)):
            raise BadParameter(f"run {run!r} is not a run name (expected YYYYMMDDTHH with a real month, "
                               "day and hour, e.g. 20000101T00)")
        try:
            parse_run_name(run)
        except ValueError:  # well formed, but no such day (20000230T00): no run can have that name
            raise NotFound(f"no run {run!r} ({run} is not a calendar date)") from None
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
        map_files = [*manifest["files"], *self.error_maps(run)]
        maps = map_index(map_files)
        leads = sorted({lead for regions in maps.values() for hours in regions.values() for lead in hours})
        init = pd.Timestamp(manifest["init_time"])
        return {
            "name": run,
            "init_time": init.isoformat(),
            "created": manifest.get("created"),
            "files": sorted(k for k in manifest["files"] if not k.startswith(MAPS_DIR + "/")) + [MANIFEST],
            # Product names; ``channels`` is the key old clients read, ``maps`` has regions and leads.
            "channels": list(maps),
            "maps": maps,
            "animations": animation_index(map_files),
            "lead_hours": leads,
            "valid_times": [(init + pd.Timedelta(hours=h)).isoformat() for h in leads],
        }

    def entries(self, names: list[str] | None = None) -> list[dict[str, Any]]:
        """Entries of the given runs (default: every published run, oldest first) whose manifest is readable."""
        out = []
        for run in self.run_names() if names is None else names:
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

    def error_maps(self, run: str) -> dict[str, dict[str, Any]]:
        """Verification's error maps of a run (``maps/error_…`` path → size, sha256); empty when there are none."""
        if self.verification_dir is None:
            return {}
        path = self.verification_dir / run / ERROR_MAPS_INDEX
        try:
            st = path.stat()
            return _load_error_index(str(path), st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Scores and forecast maps stay served; the broken index only hides the error maps.
            log.warning("run %s: error maps index %s is unreadable (%s); no error maps listed", run, path, exc)
            return {}

    def _error_file(self, run: str, relpath: str) -> RunFile:
        entry = self.error_maps(run).get(relpath)
        if entry is None or self.verification_dir is None:
            raise NotFound(f"run {run!r} has no file {relpath!r}")
        base = (self.verification_dir / run).resolve()
        resolved = (base / relpath).resolve()
        if not resolved.is_relative_to(base):
            raise NotFound(f"file {relpath!r} of run {run!r} links out of its verification and is not served")
        try:
            st = resolved.stat()
        except FileNotFoundError:
            raise CatalogError(f"error map {resolved} of run {run!r} is in its index but missing on disk") from None
        if st.st_size != entry.get("size") or \
                file_sha256(str(resolved), st.st_ino, st.st_size, st.st_mtime_ns) != entry.get("sha256"):
            raise CatalogError(f"error map {resolved} of run {run!r} no longer matches its index")
        return RunFile(run, relpath, resolved, st.st_size, str(entry["sha256"]), lock_dir=self.run_dir(run))

    def _map_or_error_file(self, run: str, product: str, relpath: str) -> RunFile:
        return self._error_file(run, relpath) if product.startswith(ERROR_PREFIX) else self.file(run, relpath)

    def map_file(self, run: str, product: str, lead: int, region: str = "global") -> RunFile:
        """The PNG map of a run's product over a region at a lead time (hours)."""
        maps = self._map_regions(run, product, region)
        if lead not in maps[region]:
            leads = ", ".join(str(h) for h in maps[region])
            raise NotFound(f"run {run!r} has no map of {product!r} over {region!r} at lead {lead} h (leads: {leads})")
        return self._map_or_error_file(run, product, map_relpath(product, region, lead))

    def animation_file(self, run: str, product: str, region: str, fmt: str) -> RunFile:
        """The animation (``gif`` or ``mp4``) of a run's product over a region."""
        self._map_regions(run, product, region)
        rel = animation_relpath(product, region, fmt)
        if rel not in self.manifest(run)["files"] and rel not in self.error_maps(run):
            raise NotFound(f"run {run!r} has no {fmt} animation of {product!r} over {region!r}")
        return self._map_or_error_file(run, product, rel)

    def _map_regions(self, run: str, product: str, region: str) -> dict[str, list[int]]:
        # Names are only ever dictionary keys here; the path comes from the manifest, never from the request.
        maps = map_index([*self.manifest(run)["files"], *self.error_maps(run)])
        if product not in maps:
            known = ", ".join(maps) or "none"
            raise NotFound(f"run {run!r} has no maps for product {product!r} (products: {known})")
        if region not in maps[product]:
            known = ", ".join(maps[product])
            raise NotFound(f"run {run!r} has no maps of {product!r} over region {region!r} (regions: {known})")
        return maps[product]


def parse_time_bound(name: str, value: str | None, upper: bool) -> datetime | None:
    """A ``since``/``until`` value (ISO date or datetime) as a naive UTC bound; an ``until`` date covers its whole day.

    The bound returned for ``until`` is exclusive, so ``until=2000-01-01`` admits 2000-01-01T18.
    """
    if value is None:
        return None
    text = value.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            if not upper:
                return datetime.combine(day, datetime.min.time())
            return None if day == date.max else datetime.combine(day + timedelta(days=1), datetime.min.time())
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadParameter(f"query parameter {name!r} ({value!r}) is not an ISO 8601 date or datetime "
                           "(e.g. 2000-01-01 or 2000-01-01T06:00Z)") from None
    offset = moment.utcoffset()
    naive = moment.replace(tzinfo=None)
    if offset:
        try:
            naive -= offset
        except OverflowError:  # e.g. 0001-01-01T00:00+01:00 is before the first representable instant
            naive = datetime.min if offset > timedelta(0) else datetime.max
    if not upper:
        return naive
    return None if naive == datetime.max else naive + timedelta(microseconds=1)


# An absolute POSIX path inside any string (not the path part of a URL: that follows a host name).
_ABS_PATH = re.compile(r"(?:file://(?=/)|(?<![\w.~:/\\-]))/(?:[^\s/'\"]+/)*(?P<name>[^\s/'\"]*)")


def public(value: Any) -> Any:
    """A JSON value with every absolute server path (in keys and strings) cut to its last component."""
    if isinstance(value, dict):
        return {public(k): public(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [public(v) for v in value]
    if isinstance(value, str) and "/" in value:
        return _ABS_PATH.sub(lambda m: m["name"], value)
    return value


def cached_sha256(path: Path) -> str:
    """The sha256 of a file by its identity on disk (a checkpoint is hashed once, not per request)."""
    st = path.stat()
    return file_sha256(str(path), st.st_ino, st.st_size, st.st_mtime_ns)


def zarr_variables(catalog: Catalog, run: str) -> list[dict[str, Any]]:
    """Variables of a run's forecast.zarr from its arrays' ``zarr.json`` (metadata only) and the map channels."""
    from core.variables import VARIABLES, parse_channel
    from serve.products import product_channels

    def _product_channels(product: str) -> tuple[str, ...]:
        try:
            return product_channels(product)
        except ValueError:  # a map directory that is no product of this version: it names no level
            return ()

    files = catalog.manifest(run)["files"]
    levels: dict[str, list[int]] = {}
    for channel in {ch for product in map_index(files) for ch in _product_channels(product)}:
        name, level = parse_channel(channel)
        if level is not None:
            levels.setdefault(name, []).append(level)
    out = []
    for rel in sorted(files):
        parts = rel.split("/")
        if len(parts) != 3 or parts[0] != "forecast.zarr" or parts[2] != "zarr.json":
            continue
        try:
            meta = json.loads(catalog.file(run, rel).path.read_bytes())
        except ValueError as exc:
            raise CatalogError(f"run {run!r}: {rel} is not JSON ({exc})") from None
        dims = list(meta.get("dimension_names") or [])
        if meta.get("node_type") != "array" or "lead_time" not in dims or "latitude" not in dims:
            continue  # a coordinate, not a forecast variable
        attrs, name = meta.get("attributes") or {}, parts[1]
        known = VARIABLES.get(name)
        out.append({"name": name, "long_name": attrs.get("long_name") or (known.long_name if known else None),
                    "units": attrs.get("units") or (known.units if known else None),
                    "standard_name": attrs.get("standard_name") or (known.standard_name if known else None) or None,
                    "dims": dims, "levels": sorted(levels.get(name, [])) if "level" in dims else None})
    return out


def scores_summary(payload: dict[str, Any]) -> dict[str, Any]:
    """Per channel the model's RMSE and ACC (and persistence RMSE) at each scored lead, from a run's scores.json."""
    channels = list(payload.get("channels") or [])
    per: dict[str, dict[str, list[Any]]] = {
        ch: {"lead_hours": [], "rmse": [], "acc": [], "persistence_rmse": []} for ch in channels}
    for lead in payload.get("leads") or []:
        scores = lead.get("scores") or {}
        model, persistence = scores.get("model") or {}, scores.get("persistence") or {}
        for ch in channels:
            per[ch]["lead_hours"].append(int(lead["lead_hours"]))
            per[ch]["rmse"].append((model.get("rmse") or {}).get(ch))
            per[ch]["acc"].append((model.get("acc") or {}).get(ch))
            per[ch]["persistence_rmse"].append((persistence.get("rmse") or {}).get(ch))
    return {"scored_at": payload.get("scored_at"), "dataset_version": payload.get("dataset_version"),
            "pending_leads": payload.get("pending_leads"), "channels": per}
