"""The FastAPI application: routers per resource, settings behind a dependency, JSON errors.

Every error is ``{"detail": "<message naming the offending parameter>"}``: catalog lookups
raise :class:`~serve.catalog.NotFound` (404) or :class:`~serve.catalog.BadParameter` (422),
request validation failures are flattened to one sentence (422).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.gzip import GZipMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from core.config import Config
from serve import routes_edr, routes_ops, routes_runs, routes_site, routes_stac, routes_subset
from serve.catalog import BadParameter, CatalogError, NotFound
from serve.errors import install_openapi
from serve.settings import ServeSettings, settings_from_config

log = logging.getLogger(__name__)


def _describe_validation(exc: Exception) -> str:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    parts = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())]
        where = f"{loc[0]} parameter {loc[-1]!r}" if len(loc) >= 2 else "request"
        parts.append(f"invalid {where}: {err.get('msg', 'invalid value')}")
    return "; ".join(parts) or "invalid request"


def _install_error_handlers(app: FastAPI) -> None:
    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    async def bad_parameter(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": _describe_validation(exc)}, status_code=422)

    async def broken_run(request: Request, exc: Exception) -> JSONResponse:
        # The log names the file and what is wrong; the response never shows a server path.
        log.error("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": "this run's data is temporarily unavailable; the operator has been told"},
                            status_code=503, headers={"Retry-After": "300"})

    app.add_exception_handler(NotFound, not_found)
    app.add_exception_handler(BadParameter, bad_parameter)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(CatalogError, broken_run)


class CatalogGzip:
    """Gzip for the catalog's JSON and pages, never for run files and maps (already compact, and served by range)."""

    def __init__(self, app: ASGIApp, minimum_size: int = 500) -> None:
        self.app = app
        self.gzip = GZipMiddleware(app, minimum_size=minimum_size)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Route one request through gzip unless it asks for a run file or a map."""
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path and "/files/" not in path and "/maps/" not in path:
            await self.gzip(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def create_app(settings: ServeSettings) -> FastAPI:
    """Build the app serving the published runs under ``settings.forecasts_dir``."""
    app = FastAPI(
        title="spherecast",
        summary="Published forecast runs: catalog, downloads, maps and a web viewer.",
        version="0.1.0",
    )
    app.state.settings = settings
    app.include_router(routes_site.router)
    app.include_router(routes_runs.router)
    app.include_router(routes_subset.router)
    app.include_router(routes_edr.router)
    app.include_router(routes_stac.router)
    app.include_router(routes_ops.router)
    app.mount("/static", StaticFiles(directory=routes_site.STATIC_DIR), name="static")
    _install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(CatalogGzip)
    log.info("serving published runs from %s", settings.forecasts_dir)
    return app


def app_from_config(config: Config) -> FastAPI:
    """Build the app from the project config (what ``spherecast serve`` runs)."""
    return create_app(settings_from_config(config))
