"""ERA5 from the Copernicus Climate Data Store through the real ``cdsapi`` client.

``CdsSource.fetch`` plans the requests (``ingest.plan``), retrieves each one into
``download_dir/.<key>.<ext>.part``, checks the bytes against the size the server announced and
only then renames to ``<key>.<ext>`` (with a ``<key>.json`` sidecar recording the size), so a
wrong file never sits under a final name and a resumed ingest reuses completed deliveries. The
deliveries are decoded (``ingest.delivered``), cut to exactly what was asked and regridded. They are
deleted only after the caller took (wrote) every result that needs them: a failed write leaves them,
and a rerun's ``fetch_groups(..., reuse=True)`` requests only the fields no completed delivery holds.

Bounded retries. cdsapi 0.7.7 picks its protocol by the key: ``uid:secret`` keeps the legacy
``/resources`` + ``/tasks`` client, any other key returns ecmwf-datastores' ``LegacyClient``
(``retrieve/v1``). Both honour ``retry_max`` (legacy ``robust``; new ``maximum_tries``),
``sleep_max`` (retry pause and poll cap; new ``retry_after`` = ``sleep_max``) and ``timeout``
per HTTP call. Their *downloads* differ: the legacy one sleeps a fixed 10 s before resuming a
short file and appends ``Range`` bytes into the target, the new one deletes and restarts. So the
client here only submits and waits; the download is ours, with the same three settings. The
legacy client also shares one module-level ``requests.Session`` between instances (a mutable
default argument), so each client gets its own session.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cdsapi
import numpy as np
import pandas as pd
import requests
import xarray as xr

from core.config import CdsConfig
from core.errors import ConfigError, SourceError, TransientSourceError
from core.grid import Grid
from core.variables import VARIABLES
from ingest import plan as planner
from ingest.delivered import decode_many
from ingest.plan import (
    CdsRequest,
    Field,
    covered_fields,
    fields_per_time,
    format_plan,
    pack_slabs,
    plan_requests,
    plan_uncovered,
)
from ingest.regrid import regrid

log = logging.getLogger(__name__)

# Bump when the way CDS deliveries are decoded changes what lands in the store.
DELIVERY_FORMAT_VERSION = "cds-2024-1"
_RETRIABLE = {408, 429, 500, 502, 503, 504}
_CHUNK = 1 << 20
# HTTP 4xx in cdsapi's message, but not 408 (timeout) or 429 (rate limit): the request itself is refused.
_REJECTED = re.compile(r"job has been rejected|job rejected", re.IGNORECASE)
_FAILED_JOB = re.compile(r"job has failed|job failed", re.IGNORECASE)
_CLIENT_ERROR = re.compile(r"\b(40[0-7]|409|41\d|42[0-8])\b[^;]*(client error|bad request|unauthori[sz]ed|forbidden|"
                           r"not found|unprocessable)", re.IGNORECASE)


def cds_credentials() -> tuple[str, str]:
    """The CDS URL and key cdsapi will use (env, then ~/.cdsapirc); ValueError if incomplete."""
    url, key = os.environ.get("CDSAPI_URL"), os.environ.get("CDSAPI_KEY")
    rc = Path(os.environ.get("CDSAPI_RC", os.path.expanduser("~/.cdsapirc")))
    if (url is None or key is None) and rc.is_file():
        found = cdsapi.api.read_config(str(rc))
        url = url if url is not None else found.get("url")
        key = key if key is not None else found.get("key")
    if not url or not key:
        missing = " and ".join(n for n, v in (("url", url), ("key", key)) if not v)
        raise ConfigError(f"CDS credentials are missing ({missing}): create {rc} with the lines 'url: "
                          "https://cds.climate.copernicus.eu/api' and 'key: <your personal access token>', "
                          "or set the CDSAPI_URL and CDSAPI_KEY environment variables")
    return url, key


def refused_for_good(reason: str) -> bool:
    """True when cdsapi's message says CDS refuses the request itself, so a later retry fails the same way."""
    if _REJECTED.search(reason):
        return True  # CDS rejected the job (too large, invalid, not allowed)
    if _FAILED_JOB.search(reason):
        return False  # the job ran and failed; CDS answers its results with a 400, but a rerun may pass
    return bool(_CLIENT_ERROR.search(reason))  # bad request, credentials, licence: refused at submission


def make_client(settings: CdsConfig) -> cdsapi.Client:
    """A cdsapi client bounded by ``settings``; credentials come only from cdsapi's own lookup."""
    cds_credentials()
    return cdsapi.Client(url=None, key=None, quiet=True, progress=False, retry_max=settings.retry_max,
                         sleep_max=settings.sleep_max, timeout=settings.timeout, wait_until_complete=True,
                         delete=False, session=requests.Session())


def _announced(result: object, req: CdsRequest) -> tuple[str, int]:
    # Both clients' result objects expose the download URL and the size the server announced.
    try:
        return str(result.location), int(result.content_length)  # type: ignore[attr-defined]
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise SourceError(f"CDS request {req.describe()}: the server's reply has no download location "
                          f"and size ({exc!r})") from None


def _download_once(session: requests.Session, url: str, part: Path, timeout: float) -> int:
    with session.get(url, stream=True, timeout=timeout) as resp:
        if resp.status_code in _RETRIABLE:
            raise requests.ConnectionError(f"HTTP {resp.status_code} {resp.reason}")
        resp.raise_for_status()
        written = 0
        with part.open("wb") as f:
            for chunk in resp.iter_content(_CHUNK):
                f.write(chunk)
                written += len(chunk)
    return written


@dataclass(frozen=True)
class Batch:
    """One step of ``fetch_groups``: its groups, the requests it sends and the completed deliveries it reuses."""

    groups: tuple[tuple[pd.Timestamp, ...], ...]
    plan: tuple[CdsRequest, ...]
    reused: tuple[Path, ...]


class CdsSource:
    """ERA5 on a grid from CDS: plan, retrieve (size-checked, atomic), decode, select, regrid."""

    name = "era5-cds"

    def __init__(self, grid: Grid, settings: CdsConfig, download_dir: Path) -> None:
        self.grid = grid
        self.settings = settings
        self.download_dir = Path(download_dir)
        self._held: list[CdsRequest] = []

    def dataset_version(self) -> str:
        """Hash of source, grid and delivery decoding version (the same for every period)."""
        blob = json.dumps({"source": self.name, "grid": self.grid.describe(), "delivery": DELIVERY_FORMAT_VERSION},
                          sort_keys=True)
        return f"era5-cds-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    # -- downloads ------------------------------------------------------------------------------
    def final_path(self, req: CdsRequest) -> Path:
        """Where the completed delivery of ``req`` lives."""
        return self.download_dir / f"{req.key}.{req.extension}"

    def _sidecar(self, req: CdsRequest) -> Path:
        return self.download_dir / f"{req.key}.json"

    def is_complete(self, req: CdsRequest) -> bool:
        """True if ``req``'s delivery is on disk with the size recorded when it was published."""
        path, sidecar = self.final_path(req), self._sidecar(req)
        if not (path.is_file() and sidecar.is_file()):
            return False
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return meta.get("request") == req.request and meta.get("size") == path.stat().st_size

    def _download(self, session: requests.Session, url: str, size: int, req: CdsRequest) -> Path:
        s = self.settings
        part = self.download_dir / f".{req.key}.{req.extension}.part"
        problem = ""
        for attempt in range(1, s.retry_max + 1):
            try:
                got = _download_once(session, url, part, s.timeout)
            except requests.RequestException as exc:
                problem = f"download failed: {exc}"
            except BaseException:
                part.unlink(missing_ok=True)  # e.g. disk full or interrupted: never leave a partial behind
                raise
            else:
                if got == size:
                    final = self.final_path(req)
                    os.replace(part, final)
                    meta = {"dataset": req.dataset, "request": req.request, "size": size}
                    tmp = self._sidecar(req).with_suffix(".json.tmp")
                    tmp.write_text(json.dumps(meta, sort_keys=True))
                    os.replace(tmp, self._sidecar(req))
                    return final
                problem = f"downloaded {got} bytes but the server announced {size}"
            part.unlink(missing_ok=True)
            log.warning("CDS request %s: %s (attempt %d of %d)", req.key, problem, attempt, s.retry_max)
            if attempt < s.retry_max:
                time.sleep(min(s.sleep_max, 2.0 ** (attempt - 1)))
        raise TransientSourceError(f"CDS request {req.describe()}: {problem} after {s.retry_max} attempts")

    def _retrieve(self, client: cdsapi.Client, req: CdsRequest) -> Path:
        try:
            result = client.retrieve(req.dataset, req.request)
        except Exception as exc:  # cdsapi raises bare Exception; both clients after their own bounded retries
            s = self.settings
            reason = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or repr(exc)
            kind = SourceError if refused_for_good(reason) else TransientSourceError
            raise kind(f"CDS request {req.describe()} failed (cdsapi gave up; retry_max={s.retry_max}, "
                       f"timeout={s.timeout:g} s): {reason}") from exc
        url, size = _announced(result, req)
        return self._download(client.session, url, size, req)

    def retrieve_all(self, plan: Sequence[CdsRequest]) -> list[Path]:
        """Make every request's delivery complete on disk (reusing finished ones); return their paths."""
        self.download_dir.mkdir(parents=True, exist_ok=True)
        paths: list[Path] = []
        client = None
        try:
            for i, req in enumerate(plan, 1):
                if self.is_complete(req):
                    log.info("CDS request %d/%d reused: %s", i, len(plan), req.describe())
                    paths.append(self.final_path(req))
                    continue
                self.final_path(req).unlink(missing_ok=True)  # a file without its sidecar is unverified
                if client is None:
                    client = make_client(self.settings)
                log.info("CDS request %d/%d: %s", i, len(plan), req.describe())
                paths.append(self._retrieve(client, req))
        finally:
            if client is not None:
                client.session.close()
        return paths

    def discard(self, plan: Sequence[CdsRequest]) -> None:
        """Delete the deliveries (and sidecars) of ``plan``."""
        for req in plan:
            self.final_path(req).unlink(missing_ok=True)
            self._sidecar(req).unlink(missing_ok=True)

    # -- planning, for `spherecast ingest --plan`, packed jobs and appends ------------------------
    def pack_slabs(self, slabs: Sequence[Sequence[pd.Timestamp]], variables: Sequence[str],
                   levels: Sequence[int]) -> list[list[int]]:
        """Consecutive slabs (their times to fetch) joined into jobs that ``fetch_groups`` plans as one."""
        return pack_slabs(slabs, fields_per_time(variables, levels), self.settings.max_fields_per_request)

    def plan_groups(self, groups: Sequence[Sequence[pd.Timestamp]], variables: Sequence[str], levels: Sequence[int],
                    *, reuse: bool = False) -> list[Batch]:
        """How ``fetch_groups`` fetches ``groups``: batches within one request's budget, what each sends and reuses."""
        s = self.settings
        index = self._on_disk() if reuse else {}
        out = []
        for batch in _batches(groups, fields_per_time(variables, levels), s.max_fields_per_request):
            union = sorted({pd.Timestamp(t) for group in batch for t in group})
            plan, reused = plan_uncovered(index, union, variables, levels, s.max_fields_per_request, s.data_format)
            out.append(Batch(tuple(tuple(g) for g in batch), tuple(plan), tuple(reused)))
        return out

    def requests_for(self, calls: Sequence[tuple[Sequence[Sequence[pd.Timestamp]], bool]], variables: Sequence[str],
                     levels: Sequence[int]) -> tuple[list[CdsRequest], int]:
        """The requests ``fetch_groups(groups, reuse=reuse)`` for each call would send, and how many deliveries it reuses."""
        send: list[CdsRequest] = []
        reused = 0
        for groups, reuse in calls:
            for batch in self.plan_groups(groups, variables, levels, reuse=reuse):
                done = [r for r in batch.plan if self.is_complete(r)]  # retrieve_all reuses these by key
                send += [r for r in batch.plan if r not in done]
                reused += len(batch.reused) + len(done)
        return send, reused

    def describe_requests(self, calls: Sequence[tuple[Sequence[Sequence[pd.Timestamp]], bool]],
                          variables: Sequence[str], levels: Sequence[int]) -> str:
        """The table of CDS requests that ``fetch_groups(groups, reuse=reuse)`` for each call would send."""
        send, reused = self.requests_for(calls, variables, levels)
        table = format_plan(send)
        if reused:
            table += f"\nreused: {reused} completed deliveries already in {self.download_dir} (not requested again)"
        return table

    def _on_disk(self) -> dict[Field, list[Path]]:
        """Every field held by a completed delivery of this data format in ``download_dir``, with its files."""
        fields: dict[Field, list[Path]] = {}
        ext = planner.DATA_FORMATS[self.settings.data_format]
        for sidecar in sorted(self.download_dir.glob("*.json")) if self.download_dir.is_dir() else []:
            path = sidecar.with_suffix(f".{ext}")
            try:
                meta = json.loads(sidecar.read_text())
                complete = path.is_file() and meta.get("size") == path.stat().st_size
                request, dataset = dict(meta["request"]), str(meta["dataset"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # unreadable or half-written: never trusted, fetched again
            if complete and request.get("data_format") == self.settings.data_format:
                for f in covered_fields(dataset, request):
                    fields.setdefault(f, []).append(path)
        return fields

    def latest_available(self, variables: Sequence[str], levels: Sequence[int]) -> pd.Timestamp:
        """The newest time CDS serves (ERA5T lags real time by ``ingest.plan.ERA5T_LAG``)."""
        return planner.latest_available()  # through the module: one place to pin "now" in tests

    def validate(self, times: Sequence[pd.Timestamp], variables: Sequence[str], levels: Sequence[int]) -> None:
        """Before the store changes: credentials are set and every time can be requested (plan, no network)."""
        cds_credentials()  # missing credentials fail here at once, not after the client's retries
        s = self.settings
        plan_requests(times, variables, levels, s.max_fields_per_request, s.data_format)

    # -- the Source protocol --------------------------------------------------------------------
    def fetch(self, times: Sequence[pd.Timestamp], variables: Sequence[str], levels: Sequence[int]) -> xr.Dataset:
        """The analysis at ``times`` for ``variables`` (at ``levels``) on the grid, from CDS.

        The deliveries stay on disk until the next ``fetch`` or :meth:`release`: the caller has not
        written the result yet, and a rerun after a failed write (a new process) reuses them.
        """
        s = self.settings
        plan = plan_requests(times, variables, levels, s.max_fields_per_request, s.data_format)
        # A new fetch asks CDS afresh (ERA5T may have turned final since): the last one's files go.
        self.release()
        self._held = [] if s.keep_downloads else list(plan)
        return self._decode(plan, self.retrieve_all(plan), times, variables, levels)

    def release(self) -> None:
        """Delete the deliveries the last ``fetch`` kept for its caller (once its result is written)."""
        self.discard(self._held)
        self._held = []

    def fetch_groups(self, groups: Sequence[Sequence[pd.Timestamp]], variables: Sequence[str],
                     levels: Sequence[int], *, reuse: bool = False) -> Iterator[xr.Dataset]:
        """Each group's analysis, in order, from as few CDS requests as the union of groups allows.

        With ``reuse`` times already held by completed deliveries on disk (left by a failed write,
        whatever request brought them) are not requested again.
        """
        # Groups are batched up to one request's cost limit (max_fields_per_request), so the
        # deliveries on disk at once never exceed what a single request may bring.
        s = self.settings
        for batch in self.plan_groups(groups, variables, levels, reuse=reuse):
            paths = self.retrieve_all(batch.plan) + list(batch.reused)
            for times in batch.groups:
                yield self._decode(batch.plan, paths, times, variables, levels)
            # Only once every group of the batch was taken and the consumer asked for more (it wrote
            # the last one): a consumer that stopped (a failed write) leaves them for its retry.
            if not s.keep_downloads:
                self.discard(batch.plan)
                for path in batch.reused:
                    path.unlink(missing_ok=True)
                    path.with_suffix(".json").unlink(missing_ok=True)

    def _decode(self, plan: Sequence[CdsRequest], paths: Sequence[Path], times: Sequence[pd.Timestamp],
                variables: Sequence[str], levels: Sequence[int]) -> xr.Dataset:
        """``times`` decoded from the deliveries of ``plan``, selected and regridded (in memory)."""
        try:
            with decode_many(paths) as raw:
                # Regrid before loading: a 0.25° slab is ~1 GB at native resolution, a few MB after.
                out = regrid(_select(raw, times, variables, levels), self.grid).load()
        except ValueError:
            # The right size but undecodable: keep the bytes for inspection, but stop trusting them so
            # the next attempt fetches them again instead of failing on the same file forever.
            for path in paths:
                Path(path).with_suffix(".json").unlink(missing_ok=True)
            raise
        return _finish(out)


def _batches(groups: Sequence[Sequence[pd.Timestamp]], per_time: int,
             max_fields: int) -> Iterator[list[Sequence[pd.Timestamp]]]:
    """Consecutive groups joined while their fields stay within ``max_fields`` (a group alone may exceed it)."""
    batch: list[Sequence[pd.Timestamp]] = []
    size = 0
    for group in groups:
        if batch and (size + len(group)) * per_time > max_fields:
            yield batch
            batch, size = [], 0
        batch.append(group)
        size += len(group)
    if batch:
        yield batch


def _select(ds: xr.Dataset, times: Sequence[pd.Timestamp], variables: Sequence[str],
            levels: Sequence[int]) -> xr.Dataset:
    """Exactly the requested times, variables and levels; ValueError naming anything missing."""
    names = list(dict.fromkeys(variables))
    missing = [n for n in names if n not in ds.data_vars]
    if missing:
        raise SourceError(f"CDS deliveries lack variable(s) {', '.join(missing)}")
    if "expver" not in ds:
        raise SourceError("CDS deliveries carry no per-time expver")
    want = pd.DatetimeIndex([pd.Timestamp(t) for t in times])
    have = pd.DatetimeIndex(ds["time"].values)
    absent = want.difference(have)
    if len(absent):
        raise SourceError(f"CDS deliveries lack time(s) {', '.join(f'{t:%Y-%m-%dT%H}' for t in absent[:5])}")
    out = ds[names + ["expver"]].sel(time=want.values)
    if any(VARIABLES[n].level_type == "pressure" for n in names):
        lv = [int(v) for v in levels]
        lacking = sorted(set(lv) - {int(v) for v in out["level"].values})
        if lacking:
            raise SourceError(f"CDS deliveries lack pressure level(s) {lacking} hPa")
        out = out.sel(level=lv)
    elif "level" in out.dims or "level" in out.coords:
        out = out.drop_vars("level", errors="ignore")
    return out


def _finish(ds: xr.Dataset) -> xr.Dataset:
    # The contract: float32 data in ERA5 long names with CF attributes, int8 expver per time.
    for name in ds.data_vars:
        if name == "expver":
            continue
        var = VARIABLES[name]
        ds[name] = ds[name].astype(np.float32)
        ds[name].attrs.update(units=var.units, long_name=var.long_name)
    ds["expver"] = ds["expver"].astype(np.int8)
    if "level" in ds.coords:
        ds = ds.assign_coords(level=ds["level"].astype(np.int32))
    return ds
