"""OGC API-EDR: collections of runs, position and area queries as CoverageJSON or CSV.

Each published run is one collection (id = run name). See docs/edr.md for the conventions.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse

from serve import edr
from serve.catalog import BadParameter, Catalog, CatalogError, NotFound
from serve.edr_formats import COVJSON, CSV, collection, coverage, to_csv
from serve.errors import error_responses
from serve.settings import ServeSettings, get_settings

router = APIRouter(prefix="/collections", tags=["edr"])

SettingsDep = Annotated[ServeSettings, Depends(get_settings)]
RunParam = Annotated[str, PathParam(description="Run name (the collection id), the init time as YYYYMMDDTHH",
                                    examples=["20000101T00"])]
_NUM = r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
_PAIR = rf"\s*{_NUM}\s+{_NUM}\s*"
_INSTANT = (r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
            r"(?:T(?:[01][0-9]|2[0-3])(?::[0-5][0-9](?::[0-5][0-9](?:\.[0-9]+)?)?)?)?(?:Z|[+-][0-9]{2}:[0-9]{2})?")
# The patterns are enforced by FastAPI before the handler runs (422 naming the parameter), so the OpenAPI
# states exactly which strings are well-formed; whether a well-formed value exists in the run is checked after.
POINT_PATTERN = rf"^\s*POINT\s*\({_PAIR}\)\s*$"
POLYGON_PATTERN = rf"^\s*POLYGON\s*\(\s*\({_PAIR}(?:,{_PAIR})*\)\s*\)\s*$"
DATETIME_PATTERN = rf"^(?:{_INSTANT}|{_INSTANT}/{_INSTANT}|\.\./{_INSTANT}|{_INSTANT}/\.\.|\.\./\.\.)$"
Z_PATTERN = rf"^(?:\s*{_NUM}\s*(?:,\s*{_NUM}\s*)*|\s*{_NUM}\s*/\s*{_NUM}\s*)$"
PARAMS_PATTERN = r"^[A-Za-z0-9_]+(?:,[A-Za-z0-9_]+)*$"

ParamNames = Annotated[str | None, Query(alias="parameter-name", pattern=PARAMS_PATTERN, description=(
    "Comma-separated parameters (variables of the run, e.g. `geopotential,temperature`); all of one kind, "
    "pressure-level or single-level. Absent: every parameter of the run."))]
Datetime = Annotated[str | None, Query(pattern=DATETIME_PATTERN, description=(
    "Valid time(s), ISO 8601 (UTC if no zone): an instant, `start/end`, `../end`, `start/..`; "
    "absent: every valid time of the run."))]
Z = Annotated[str | None, Query(pattern=Z_PATTERN, description=(
    "Pressure level(s) in hPa: `500`, `500,850` or `250/700`; absent: every level. "
    "Only for pressure-level parameters."))]
Fmt = Annotated[Literal["CoverageJSON", "CSV"] | None, Query(alias="f", description="Output format (default CoverageJSON).")]
Crs = Annotated[Literal["CRS84"] | None, Query(description="Only `CRS84` (longitude, latitude in degrees).")]
Member = Annotated[int | None, Query(ge=0, description="Ensemble runs: the member (default 0, the control); "
                                                        "a deterministic run has member 0 only.")]
QUERY_KEYS = {"coords", "parameter-name", "datetime", "z", "f", "crs", "member"}
DATA_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "CoverageJSON Coverage, or CSV with `f=CSV`",
          "content": {COVJSON: {"schema": {"type": "object"}}, CSV: {"schema": {"type": "string"}}}},
    **error_responses(404, 413, 422, 503),
}


def get_catalog(settings: SettingsDep) -> Catalog:
    """The catalog of the configured forecasts directory."""
    return Catalog(settings.forecasts_dir)


CatalogDep = Annotated[Catalog, Depends(get_catalog)]


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _check_query(request: Request) -> None:
    """Refuse query parameters this endpoint does not define (rather than silently ignoring them)."""
    unknown = sorted(set(request.query_params) - QUERY_KEYS)
    if unknown:
        raise BadParameter(f"query parameter {unknown[0]!r} is not understood here; "
                           f"known: {', '.join(sorted(QUERY_KEYS))}")


def _respond(answer: edr.Answer, fmt: str, run: str, kind: str) -> Response:
    if fmt == "CSV":
        return Response(to_csv(answer), media_type=CSV,
                        headers={"Content-Disposition": f'inline; filename="{run}-{kind}.csv"'})
    return JSONResponse(coverage(answer), media_type=COVJSON)


@router.head("", include_in_schema=False)
@router.get("", summary="EDR collections: one per published run, newest first",
            responses=error_responses(503))
def list_collections(request: Request, catalog: CatalogDep) -> dict[str, Any]:
    """Every published run as an EDR collection (id = run name), newest first."""
    base = _base(request)
    out = []
    for run in reversed(catalog.run_names()):
        try:
            out.append(collection(edr.open_run(catalog, run), base))
        except (NotFound, CatalogError, BadParameter):
            continue  # one broken or vanishing run must not take the listing down
    return {"links": [{"href": f"{base}/collections", "rel": "self", "type": "application/json",
                       "title": "this document"},
                      {"href": f"{base}/runs", "rel": "alternate", "type": "application/json",
                       "title": "the run catalog"}],
            "collections": out}


@router.head("/{run}", include_in_schema=False)
@router.get("/{run}", summary="EDR collection of one run", responses=error_responses(404, 422, 503))
def get_collection(run: RunParam, request: Request, catalog: CatalogDep) -> dict[str, Any]:
    """The run's collection metadata: extent, parameters, data queries, CRS and output formats."""
    return collection(edr.open_run(catalog, run), _base(request))


@router.head("/{run}/position", include_in_schema=False)
@router.get("/{run}/position", summary="Values at a point", response_class=Response, responses=DATA_RESPONSES)
def position(run: RunParam, request: Request, catalog: CatalogDep,
             coords: Annotated[str, Query(pattern=POINT_PATTERN,
                                          description="WKT `POINT(lon lat)`, lon −180 … 360, lat −90 … 90",
                                          examples=["POINT(2.35 48.85)"])],
             parameter_name: ParamNames = None, datetime: Datetime = None, z: Z = None, f: Fmt = None,
             crs: Crs = None, member: Member = None) -> Response:
    """Bilinear values at a point for the chosen parameters, valid times and levels."""
    _check_query(request)
    lon, lat = edr.parse_point(coords)
    data = edr.open_run(catalog, run)
    names = edr.parse_parameters(parameter_name, data)
    pressure = edr.VARIABLES[names[0]].level_type == "pressure"
    t = edr.parse_datetime(datetime, data)
    levels = edr.parse_z(z, data, pressure)
    answer = edr.position(data, lon, lat, names, t, levels, edr.parse_member(member, data))
    return _respond(answer, f or "CoverageJSON", run, "position")


@router.head("/{run}/area", include_in_schema=False)
@router.get("/{run}/area", summary="Grid values inside a polygon", response_class=Response,
            responses=DATA_RESPONSES)
def area(run: RunParam, request: Request, catalog: CatalogDep, settings: Annotated[ServeSettings, Depends(get_settings)],
         coords: Annotated[str, Query(pattern=POLYGON_PATTERN,
                                      description="WKT `POLYGON((lon lat, …))`, one closed ring, lon −180 … 360",
                                      examples=["POLYGON((-10 35, 30 35, 30 60, -10 60, -10 35))"])],
         parameter_name: ParamNames = None, datetime: Datetime = None, z: Z = None, f: Fmt = None,
         crs: Crs = None, member: Member = None) -> Response:
    """Grid values on the polygon's bounding grid box, null outside the polygon (domain type Grid)."""
    _check_query(request)
    ring = edr.parse_polygon(coords)
    data = edr.open_run(catalog, run)
    names = edr.parse_parameters(parameter_name, data)
    pressure = edr.VARIABLES[names[0]].level_type == "pressure"
    t = edr.parse_datetime(datetime, data)
    levels = edr.parse_z(z, data, pressure)
    chosen = edr.parse_member(member, data)
    rows, cols, mask = edr.area_domain(data, ring)
    count = edr.area_count(data, rows, cols, names, t, levels)
    if count > settings.area_max_points:
        return JSONResponse({"detail": f"coords: the area query would return {count:,} values "
                             f"({rows.size}×{cols.size} grid points × {len(names)} parameters × {t.size} times"
                             f"{'' if levels is None else f' × {levels.size} levels'}), more than the cap of "
                             f"{settings.area_max_points:,}; narrow the polygon, parameters, datetime or z"},
                            status_code=413)
    answer = edr.area(data, ring, rows, cols, mask, names, t, levels, chosen)
    return _respond(answer, f or "CoverageJSON", run, "area")
