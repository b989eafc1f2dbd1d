"""Routes of the run catalog: paginated listing, run detail, file downloads and map images.

Every body goes through :func:`serve.catalog.public` where it carries recorded provenance, so no response
shows a server filesystem path: only names and digests.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict

from core.lineage import lineage_at
from core.runs import MANIFEST
from serve.catalog import (
    RUN_PATTERN,
    BadParameter,
    Catalog,
    cached_sha256,
    parse_time_bound,
    public,
    scores_summary,
    zarr_variables,
)
from serve.downloads import file_response
from serve.errors import error_responses
from serve.settings import ServeSettings, get_settings

log = logging.getLogger(__name__)
router = APIRouter(prefix="/runs", tags=["runs"])

SettingsDep = Annotated[ServeSettings, Depends(get_settings)]


def get_catalog(settings: SettingsDep) -> Catalog:
    """The catalog of the configured forecasts directory (with verification's error maps where configured)."""
    return Catalog(settings.forecasts_dir, settings.verification_dir)


CatalogDep = Annotated[Catalog, Depends(get_catalog)]
RunParam = Annotated[str, PathParam(description="Run name, the init time as YYYYMMDDTHH (UTC)",
                                    examples=["20000101T00"], json_schema_extra={"pattern": RUN_PATTERN})]
MAX_LIMIT = 1000
FILE_TYPES = ["application/octet-stream", "application/x-netcdf", "application/x-grib2", "application/json",
              "image/png"]


class RunEntry(BaseModel):
    """A run in the listing: init time, downloadable files, map channels and leads."""

    name: str
    init_time: str
    created: str | None
    files: list[str]
    channels: list[str]
    """Map product names (kept under this key for clients of the per-channel maps)."""
    maps: dict[str, dict[str, list[int]]] = {}
    """Map product → region → lead hours: ``/runs/{run}/maps/{product}/{region}/{lead}.png``."""
    animations: dict[str, dict[str, list[str]]] = {}
    """Map product → region → animation formats: ``/runs/{run}/maps/{product}/{region}/animation.{fmt}``."""
    lead_hours: list[int]
    valid_times: list[str]


class RunDetail(BaseModel):
    """A run's manifest (files with their download URL path added) plus what it holds, its scores and lineage."""

    model_config = ConfigDict(extra="allow")

    schema_version: int | str
    init_time: str
    created: str | None = None
    files: dict[str, dict[str, Any]]
    provenance: dict[str, Any]
    name: str
    lead_hours: list[int]
    valid_times: list[str]
    variables: list[dict[str, Any]]
    scores: dict[str, Any] | None
    lineage: dict[str, Any] | None


_LIST_HEADERS = {
    "X-Total-Count": {"description": "Runs matching the filters, over all pages", "required": True,
                      "schema": {"type": "integer", "minimum": 0}},
    "Link": {"description": 'RFC 8288 links to the next and previous pages (rel="next", rel="prev")',
             "schema": {"type": "string"}},
}
# Documented as what it accepts (parsed by serve.catalog.parse_time_bound, which names the parameter if not).
_ISO_TIME: dict[str, Any] = {"anyOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "date-time"}]}
# JSON files of a run (manifest.json, zarr.json) are objects; everything else is bytes.
_FILE_BODY = {"content": {kind: {"schema": {"type": "object"} if kind == "application/json" else
                                 {"type": "string", "format": "binary"}} for kind in FILE_TYPES}}
_FILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The file (ETag = its sha256)", **_FILE_BODY},
    206: {"description": "The requested byte range", **_FILE_BODY},
    **error_responses(304, 404, 416, 422, 503),
}


def _link(request: Request, rel: str, offset: int, limit: int) -> str:
    url = request.url.include_query_params(offset=offset, limit=limit)
    return f'<{url}>; rel="{rel}"'


@router.head("", include_in_schema=False)
@router.get("", summary="List published runs, newest first", response_model=list[RunEntry],
            responses={200: {"headers": _LIST_HEADERS}, **error_responses(422)})
def list_runs(
    request: Request, response: Response, catalog: CatalogDep,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Runs per page")] = 100,
    offset: Annotated[int, Query(ge=0, description="Runs to skip (newest first)")] = 0,
    since: Annotated[str | None, Query(description="Earliest init time, inclusive (ISO date or datetime; UTC "
                                                   "if no offset)", json_schema_extra=_ISO_TIME)] = None,
    until: Annotated[str | None, Query(description="Latest init time, inclusive (a date covers its whole day)",
                                       json_schema_extra=_ISO_TIME)] = None,
) -> list[dict[str, Any]]:
    """A page of published runs with init time, files, map channels and lead hours, newest first."""
    low, high = parse_time_bound("since", since, upper=False), parse_time_bound("until", until, upper=True)
    if low is not None and high is not None and low >= high:
        raise BadParameter(f"query parameter 'since' ({since}) is after 'until' ({until})")
    names = catalog.select(low, high)
    page = names[offset:offset + limit]
    response.headers["X-Total-Count"] = str(len(names))
    links = []
    if offset + limit < len(names):
        links.append(_link(request, "next", offset + limit, limit))
    if offset > 0:
        links.append(_link(request, "prev", max(0, min(offset, len(names)) - limit), limit))
    if links:
        response.headers["Link"] = ", ".join(links)
    return catalog.entries(page)


@router.head("/latest", include_in_schema=False)
@router.get("/latest", summary="The newest published run", response_model=RunEntry,
            responses=error_responses(404, 503))
def latest_run(catalog: CatalogDep) -> dict[str, Any]:
    """The listing entry of the newest published run."""
    return catalog.entry(catalog.latest())


def _scores(settings: ServeSettings, run: str) -> dict[str, Any] | None:
    if settings.verification_dir is None:
        return None
    path = settings.verification_dir / run / "scores.json"
    if not path.is_file():
        return None
    try:
        return scores_summary(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        # Scores are an extra: a damaged file is logged for the operator and the run is still served.
        log.error("run %s: unreadable scores in %s: %s", run, path, exc)
        return None


def _lineage(settings: ServeSettings, run: str) -> dict[str, Any] | None:
    if settings.runs_dir is None:
        return None
    try:
        record = lineage_at(run, settings.forecasts_dir, settings.runs_dir, settings.verification_dir,
                            sha256=cached_sha256)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        log.info("run %s: no lineage: %s", run, exc)
        return None
    return public(record)


@router.head("/{run}", include_in_schema=False)
@router.get("/{run}", summary="A run: manifest, variables, leads, files, scores and lineage",
            response_model=RunDetail, responses=error_responses(404, 422, 503))
def run_detail(run: RunParam, request: Request, catalog: CatalogDep, settings: SettingsDep) -> dict[str, Any]:
    """The run's manifest with download URL paths, its variables (from forecast.zarr metadata), scores and lineage."""
    manifest = public(catalog.manifest(run))  # recorded provenance may name server paths: names only
    entry = catalog.entry(run)
    base = request.scope.get("root_path", "").rstrip("/")
    files = {rel: {**meta, "url": f"{base}/runs/{run}/files/{rel}"} for rel, meta in manifest["files"].items()}
    own = catalog.file(run, MANIFEST)
    files[MANIFEST] = {"size": own.size, "sha256": own.sha256, "url": f"{base}/runs/{run}/files/{MANIFEST}"}
    return {**manifest, "files": files, "name": run, "lead_hours": entry["lead_hours"],
            "valid_times": entry["valid_times"], "channels": entry["channels"], "maps": entry["maps"],
            "animations": entry["animations"], "variables": zarr_variables(catalog, run), "scores": _scores(settings, run),
            "lineage": _lineage(settings, run)}


@router.head("/{run}/files/{path:path}", include_in_schema=False)
@router.get("/{run}/files/{path:path}", summary="Download a run file", response_class=Response,
            responses=_FILE_RESPONSES)
def run_file(run: RunParam, path: Annotated[str, PathParam(description="The file's path in the run's manifest",
                                                         examples=["forecast.nc", "manifest.json"])],
             request: Request, catalog: CatalogDep, settings: SettingsDep) -> Response:
    """One file of a run by its manifest path, with ETag (its sha256), 304 and byte ranges."""
    return file_response(request, catalog.file(run, path), settings.chunk_size)


_ANIMATION_TYPES = {"gif": "image/gif", "mp4": "video/mp4"}
_MAP_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The map", "content": {"image/png": {}}},
    206: {"description": "The requested byte range", "content": {"image/png": {}}},
    **error_responses(304, 404, 416, 422, 503),
}
ProductParam = Annotated[str, PathParam(description="Map product (z500_t850, mslp, wind500, t2m, or a channel "
                                                    "such as geopotential_500)", examples=["geopotential_500"])]
RegionParam = Annotated[str, PathParam(description="Map region (global, global_robinson, europe, north_america, "
                                                   "arctic, antarctic, or a configured box)", examples=["global"])]
LeadParam = Annotated[int, PathParam(description="Lead time in hours", examples=[0, 6])]


@router.head("/{run}/maps/{product}/{region}/{lead}.png", include_in_schema=False)
@router.get("/{run}/maps/{product}/{region}/{lead}.png", summary="Map image of a product over a region",
            response_class=Response, responses=_MAP_RESPONSES)
def run_region_map(run: RunParam, product: ProductParam, region: RegionParam, lead: LeadParam,
                   request: Request, catalog: CatalogDep, settings: SettingsDep) -> Response:
    """The PNG map of a product over a region at a lead time in hours."""
    return file_response(request, catalog.map_file(run, product, lead, region), settings.chunk_size)


@router.head("/{run}/maps/{product}/{region}/animation.{fmt}", include_in_schema=False)
@router.get("/{run}/maps/{product}/{region}/animation.{fmt}", summary="Animation of a product over a region",
            response_class=Response,
            responses={200: {"description": "One frame per lead", "content": {"image/gif": {}, "video/mp4": {}}},
                       206: {"description": "The requested byte range", "content": {"video/mp4": {}}},
                       **error_responses(304, 404, 416, 422, 503)})
def run_animation(run: RunParam, product: ProductParam, region: RegionParam,
                  fmt: Annotated[Literal["gif", "mp4"], PathParam(description="gif or mp4")],
                  request: Request, catalog: CatalogDep, settings: SettingsDep) -> Response:
    """The animated GIF or MP4 of a product over a region, one frame per lead."""
    response = file_response(request, catalog.animation_file(run, product, region, fmt), settings.chunk_size)
    if response.headers.get("content-type") == "application/octet-stream":
        # serve.downloads names types by suffix and does not know these two (yet).
        response.headers["content-type"] = _ANIMATION_TYPES[fmt]
    return response


@router.head("/{run}/maps/{product}/{lead}.png", include_in_schema=False)
@router.get("/{run}/maps/{product}/{lead}.png", summary="Map image of a product over the globe",
            response_class=Response, responses=_MAP_RESPONSES)
def run_map(run: RunParam, product: ProductParam, lead: LeadParam,
            request: Request, catalog: CatalogDep, settings: SettingsDep) -> Response:
    """The PNG map of a product (``geopotential_500``) over region ``global`` at a lead time in hours."""
    return file_response(request, catalog.map_file(run, product, lead), settings.chunk_size)
