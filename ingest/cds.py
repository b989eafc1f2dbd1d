"""ERA5 from the Copernicus Climate Data Store through the real ``cdsapi`` client.

``CdsSource.fetch`` plans the requests (``ingest.plan``), retrieves each one into
``download_dir/.<key>.<ext>.part``, checks the bytes against the size the server announced and
only then renames to ``<key>.<ext>`` (with a ``<key>.json`` sidecar recording the size), so a
wrong file never sits under a final name and a resumed ingest reuses completed deliveries. The
deliveries are decoded (``ingest.delivered``), cut to exactly what was asked and regridded.

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
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import cdsapi
import numpy as np
import pandas as pd
import requests
import xarray as xr

from core.config import CdsConfig
from core.errors import ConfigError, SourceError
from core.grid import Grid
from core.variables import VARIABLES, get_variable
from ingest import plan as planner
from ingest.delivered import decode_many
from ingest.plan import CdsRequest, format_plan, plan_requests
from ingest.regrid import regrid

log = logging.getLogger(__name__)

# Bump when the way CDS deliveries are decoded changes what lands in the store.
DELIVERY_FORMAT_VERSION = "cds-2024-1"
_RETRIABLE = {408, 429, 500, 502, 503, 504}
_CHUNK = 1 << 20


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


class CdsSource:
    """ERA5 on a grid from CDS: plan, retrieve (size-checked, atomic), decode, select, regrid."""

    name = "era5-cds"

    def __init__(self, grid: Grid, settings: CdsConfig, download_dir: Path) -> None:
        self.grid = grid
        self.settings = settings
        self.download_dir = Path(download_dir)

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
        raise SourceError(f"CDS request {req.describe()}: {problem} after {s.retry_max} attempts")

    def _retrieve(self, client: cdsapi.Client, req: CdsRequest) -> Path:
        try:
            result = client.retrieve(req.dataset, req.request)
        except Exception as exc:  # cdsapi raises bare Exception; both clients after their own bounded retries
            s = self.settings
            reason = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or repr(exc)
            raise SourceError(f"CDS request {req.describe()} failed (cdsapi gave up; retry_max={s.retry_max}, "
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

    # -- planning, for `spherecast ingest --plan` and appends -------------------------------------
    def describe_requests(self, slabs: Sequence[Sequence[pd.Timestamp]], variables: Sequence[str],
                          levels: Sequence[int]) -> str:
        """The table of CDS requests that fetching each slab of times would send."""
        s = self.settings
        plan = [req for times in slabs
                for req in plan_requests(times, variables, levels, s.max_fields_per_request, s.data_format)]
        return format_plan(plan)

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
        """The analysis at ``times`` for ``variables`` (at ``levels``) on the grid, from CDS."""
        s = self.settings
        plan = plan_requests(times, variables, levels, s.max_fields_per_request, s.data_format)
        out = self._decode(plan, self.retrieve_all(plan), times, variables, levels)
        if not s.keep_downloads:
            self.discard(plan)
        return out

    def fetch_groups(self, groups: Sequence[Sequence[pd.Timestamp]], variables: Sequence[str],
                     levels: Sequence[int]) -> Iterator[xr.Dataset]:
        """Each group's analysis, in order, from as few CDS requests as the union of groups allows."""
        # Groups are batched up to one request's cost limit (max_fields_per_request), so the
        # deliveries on disk at once never exceed what a single request may bring.
        s = self.settings
        for batch in _batches(groups, _fields_per_time(variables, levels), s.max_fields_per_request):
            union = sorted({pd.Timestamp(t) for group in batch for t in group})
            plan = plan_requests(union, variables, levels, s.max_fields_per_request, s.data_format)
            paths = self.retrieve_all(plan)
            for times in batch:
                yield self._decode(plan, paths, times, variables, levels)
            # Only once every group of the batch was taken: a consumer that stopped (a failed
            # write) leaves the deliveries for its retry to reuse.
            if not s.keep_downloads:
                self.discard(plan)

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
            for req in plan:
                self._sidecar(req).unlink(missing_ok=True)
            raise
        return _finish(out)


def _fields_per_time(variables: Sequence[str], levels: Sequence[int]) -> int:
    """Fields one time costs: one per single-level variable, one per level of each pressure variable."""
    nlev = max(1, len(set(levels)))
    return sum(nlev if get_variable(v).level_type == "pressure" else 1 for v in set(variables))


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
