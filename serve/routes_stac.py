"""A STAC catalog of the published runs, for tools that crawl STAC (pystac, pystac-client, stac-browser)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse

from serve.catalog import RUN_PATTERN, Catalog
from serve.errors import error_responses
from serve.settings import ServeSettings, get_settings
from serve.stac import Links, as_json, forecasts_collection, root_catalog, run_item

router = APIRouter(prefix="/stac", tags=["stac"])

SettingsDep = Annotated[ServeSettings, Depends(get_settings)]
RunParam = Annotated[str, PathParam(description="Run name, the init time as YYYYMMDDTHH (UTC)",
                                    examples=["20000101T00"], json_schema_extra={"pattern": RUN_PATTERN})]
_JSON = {"application/json": {"schema": {"type": "object"}}}
_GEOJSON = {"application/geo+json": {"schema": {"type": "object"}}}
# STAC documents change whenever a run is published or removed: clients revalidate.
_HEADERS = {"Cache-Control": "no-cache"}


def _links(request: Request) -> Links:
    # base_url carries the ASGI root_path, so links stay right behind a proxy that mounts the app under a prefix.
    return Links(str(request.base_url))


@router.head("/catalog.json", include_in_schema=False)
@router.get("/catalog.json", summary="STAC root catalog", response_class=JSONResponse,
            responses={200: {"description": "A STAC Catalog", "content": _JSON}})
def stac_catalog(request: Request) -> JSONResponse:
    """The root STAC Catalog, linking the forecasts Collection."""
    return JSONResponse(as_json(root_catalog(_links(request))), headers=_HEADERS)


@router.head("/collections/forecasts.json", include_in_schema=False)
@router.get("/collections/forecasts.json", summary="STAC Collection of the forecast runs",
            response_class=JSONResponse,
            responses={200: {"description": "A STAC Collection", "content": _JSON}})
def stac_collection(request: Request, settings: SettingsDep) -> JSONResponse:
    """The Collection ``spherecast-forecasts``: the extent of every published run and a link to each run's Item."""
    body: dict[str, Any] = as_json(forecasts_collection(Catalog(settings.forecasts_dir), _links(request)))
    return JSONResponse(body, headers=_HEADERS)


@router.head("/items/{run}.json", include_in_schema=False)
@router.get("/items/{run}.json", summary="STAC Item of one run", response_class=JSONResponse,
            responses={200: {"description": "A STAC Item (GeoJSON Feature)", "content": _GEOJSON},
                       **error_responses(404, 422, 503)})
def stac_item(run: RunParam, request: Request, settings: SettingsDep) -> JSONResponse:
    """One run as a STAC Item: init and valid times, forecast extension fields, assets with size and checksum."""
    item = run_item(Catalog(settings.forecasts_dir), run, _links(request))
    return JSONResponse(as_json(item), media_type="application/geo+json", headers=_HEADERS)
