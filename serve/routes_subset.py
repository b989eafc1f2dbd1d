"""Subsetting at download time: a run cut by bbox, variables, levels and leads, converted and streamed.

The request is parsed before any file is touched; the run's ``forecast.zarr`` is then opened lazily
under the run's reader lock (:func:`core.runs.reading`), which the response holds until its last
byte, so retention never removes a run mid-download. The answer's size is estimated from the
selection before any value is read; above ``subset_max_bytes`` the answer is 413.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import anyio
import xarray as xr
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from core.runs import RunGone, reading
from serve.catalog import CatalogError, NotFound
from serve.errors import error_responses
from serve.routes_runs import CatalogDep, RunParam, SettingsDep
from serve.subset import FORMATS, SubsetQuery, check_format, estimate_bytes, parse_query, select
from serve.subset_formats import stream

log = logging.getLogger(__name__)

router = APIRouter(tags=["subset"])
STORE = "forecast.zarr"

_DOC_200 = {
    "description": "The subset as a file attachment (``spherecast_<run>_subset.<ext>``), streamed; "
                   "``X-Estimated-Size`` gives its estimated uncompressed size in bytes",
    "content": {media.partition(";")[0]: {"schema": {"type": "string", "format": "binary"}}
                for media, _ in FORMATS.values()},
    "headers": {"X-Estimated-Size": {"description": "Estimated uncompressed size in bytes",
                                     "schema": {"type": "integer"}}},
}


class ClosingStream(StreamingResponse):
    """A streamed body whose source generator is closed however the response ends, client gone included."""

    def __init__(self, source: Iterator[bytes], first: bytes, **kwargs: object) -> None:
        self.source = source
        super().__init__(itertools.chain([first], source), **kwargs)  # type: ignore[arg-type]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the response, then close the source (releasing its lock and temporary files)."""
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Shielded: on a disconnect this task is being cancelled, and the cleanup must still run.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.source.close)  # type: ignore[attr-defined]


def _open(run_dir: Path, run: str, stack: ExitStack) -> xr.Dataset:
    try:
        stack.enter_context(reading(run_dir))
    except RunGone as exc:
        raise NotFound(str(exc)) from None
    try:
        ds = xr.open_zarr(run_dir / STORE, zarr_format=3, consolidated=False, decode_timedelta=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CatalogError(f"run {run!r}: cannot open {STORE}: {exc}") from exc
    stack.callback(ds.close)
    return ds


def _body(stack: ExitStack, sub: xr.Dataset, fmt: str, block_size: int) -> Iterator[bytes]:
    with stack:  # the reader lock and the open store, held to the last byte
        yield from stream(sub, fmt, block_size)


@router.head("/runs/{run}/subset", include_in_schema=False)
@router.get("/runs/{run}/subset", summary="Download a subset of a run", response_class=Response,
            responses={200: _DOC_200, **error_responses(404, 413, 422, 503)})
def run_subset(
    run: RunParam, request: Request, catalog: CatalogDep, settings: SettingsDep,
    bbox: Annotated[str | None, Query(description="W,S,E,N in degrees (longitudes -180 … 360; W > E crosses "
                                                  "0°/the dateline); default the whole globe",
                                      examples=["-30,30,40,75"])] = None,
    variables: Annotated[str | None, Query(description="Comma-separated variable names; default all",
                                           examples=["geopotential,u_component_of_wind"])] = None,
    levels: Annotated[str | None, Query(description="Comma-separated pressure levels in hPa; default all",
                                        examples=["500,850"])] = None,
    leads: Annotated[str | None, Query(description="Comma-separated lead times in hours; default all",
                                       examples=["0,6,24"])] = None,
    members: Annotated[str | None, Query(description="Comma-separated ensemble members; default all")] = None,
    format: Annotated[str, Query(description="Output format", json_schema_extra={"enum": list(FORMATS)})] = "nc",
) -> Response:
    """A published run cut to a box, variables, levels, leads (and members), as NetCDF, GRIB2, CSV or zipped Zarr."""
    query: SubsetQuery = parse_query({k: request.query_params.getlist(k) for k in request.query_params})
    run_dir = catalog.run_dir(run)
    if not any(k.startswith(STORE + "/") for k in catalog.manifest(run)["files"]):
        raise NotFound(f"run {run!r} has no {STORE} to cut a subset from")
    media, ext = FORMATS[query.format]
    stack = ExitStack()
    try:
        sub = select(_open(run_dir, run, stack), query)
        check_format(sub, query.format)
        estimate = estimate_bytes(sub, query.format)
        headers = {"X-Estimated-Size": str(estimate), "Cache-Control": "no-cache",
                   "Content-Disposition": f'attachment; filename="spherecast_{run}_subset.{ext}"'}
        if estimate > settings.subset_max_bytes:
            stack.close()
            return JSONResponse(
                {"detail": f"the subset's estimated size, {estimate} bytes, exceeds the cap of "
                           f"{settings.subset_max_bytes} bytes; narrow bbox, variables, levels or leads"},
                status_code=413, headers={"X-Estimated-Size": str(estimate)})
        if request.method == "HEAD":
            stack.close()
            return Response(status_code=200, headers=headers, media_type=media)
        body = _body(stack, sub, query.format, settings.chunk_size)
        try:
            first = next(body)  # the work before the first byte fails as a status code, not a cut-off body
        except StopIteration:
            first = b""
        except (OSError, KeyError, ValueError) as exc:  # a damaged store or a NaN in a published run
            raise CatalogError(f"run {run!r}: reading {STORE} for a subset failed: {exc}") from exc
    except BaseException:
        stack.close()
        raise
    return ClosingStream(body, first, headers=headers, media_type=media)
