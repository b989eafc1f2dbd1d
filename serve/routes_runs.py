"""Routes of the run catalog: listings, manifests, file downloads and map images."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi import Path as PathParam

from serve.catalog import Catalog
from serve.downloads import file_response
from serve.settings import ServeSettings, get_settings

router = APIRouter(prefix="/runs", tags=["runs"])

SettingsDep = Annotated[ServeSettings, Depends(get_settings)]


def get_catalog(settings: SettingsDep) -> Catalog:
    """The catalog of the configured forecasts directory."""
    return Catalog(settings.forecasts_dir)


CatalogDep = Annotated[Catalog, Depends(get_catalog)]
RunParam = Annotated[str, PathParam(description="Run name, the init time as YYYYMMDDTHH", examples=["20000101T00"])]


@router.head("", include_in_schema=False)
@router.get("", summary="List published runs")
def list_runs(catalog: CatalogDep) -> list[dict[str, Any]]:
    """Every published run with its init time, files, map channels and lead hours (oldest first)."""
    return catalog.entries()


@router.head("/latest", include_in_schema=False)
@router.get("/latest", summary="The newest published run")
def latest_run(catalog: CatalogDep) -> dict[str, Any]:
    """The listing entry of the newest published run."""
    return catalog.entry(catalog.latest())


@router.head("/{run}", include_in_schema=False)
@router.get("/{run}", summary="Manifest of a run")
def run_manifest(run: RunParam, catalog: CatalogDep) -> dict[str, Any]:
    """The run's manifest: files with sizes and sha256, and provenance."""
    return catalog.manifest(run)


@router.head("/{run}/files/{path:path}", include_in_schema=False)
@router.get("/{run}/files/{path:path}", summary="Download a run file", response_class=Response)
def run_file(run: RunParam, path: str, request: Request, catalog: CatalogDep, settings: SettingsDep) -> Response:
    """One file of a run by its manifest path, with ETag (its sha256), 304 and byte ranges."""
    return file_response(request, catalog.file(run, path), settings.chunk_size)


@router.head("/{run}/maps/{channel}/{lead}.png", include_in_schema=False)
@router.get("/{run}/maps/{channel}/{lead}.png", summary="Map image", response_class=Response,
            responses={200: {"content": {"image/png": {}}}})
def run_map(run: RunParam, channel: str, lead: Annotated[int, PathParam(description="Lead time in hours")],
            request: Request, catalog: CatalogDep, settings: SettingsDep) -> Response:
    """The PNG map of a channel (``geopotential_500``) at a lead time in hours."""
    return file_response(request, catalog.map_file(run, channel, lead), settings.chunk_size)
