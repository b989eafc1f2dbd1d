"""The FastAPI application: routers per resource, settings behind a dependency, JSON errors.

Every error is ``{"detail": "<message naming the offending parameter>"}``: catalog lookups
raise :class:`~serve.catalog.NotFound` (404) or :class:`~serve.catalog.BadParameter` (422),
request validation failures are flattened to one sentence (422).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.config import Config, load_config
from serve import routes_edr, routes_georef, routes_ops, routes_runs, routes_site, routes_stac, routes_subset
from serve.catalog import BadParameter, CatalogError, NotFound
from serve.errors import install_openapi
from serve.metrics import Metrics, MetricsMiddleware
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


MAX_DETAIL = 600


def bounded_detail(text: str) -> str:
    """An error message cut to :data:`MAX_DETAIL` characters: an overlong request is not echoed back whole."""
    return text if len(text) <= MAX_DETAIL else f"{text[:MAX_DETAIL - 30]}… ({len(text):,} characters in all)"


def _install_error_handlers(app: FastAPI) -> None:
    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": bounded_detail(str(exc))}, status_code=404)

    async def bad_parameter(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": bounded_detail(str(exc))}, status_code=422)

    async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": bounded_detail(_describe_validation(exc))}, status_code=422)

    async def broken_run(request: Request, exc: Exception) -> JSONResponse:
        # The log names the file and what is wrong; the response never shows a server path.
        log.error("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": "this run's data is temporarily unavailable; the operator has been told"},
                            status_code=503, headers={"Retry-After": "300"})

    app.add_exception_handler(NotFound, not_found)
    app.add_exception_handler(BadParameter, bad_parameter)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(CatalogError, broken_run)


def _compressed_subset(scope: Scope) -> bool:
    # Subsets in NetCDF-4, GRIB2 (CCSDS) and zip are compressed already; only CSV gains from gzip.
    if not scope.get("path", "").endswith("/subset"):
        return False
    return b"format=csv" not in scope.get("query_string", b"")


class CatalogGzip:
    """Gzip for the catalog's JSON, pages and CSV, never for run files, maps and compressed subsets (compact already)."""

    def __init__(self, app: ASGIApp, minimum_size: int = 500) -> None:
        self.app = app
        self.gzip = GZipMiddleware(app, minimum_size=minimum_size)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Route one request through gzip unless it asks for a run file or a map."""
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path and "/files/" not in path and "/maps/" not in path and not _compressed_subset(scope):
            await self.gzip(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def _uncached_path(path: str) -> bool:
    # Run files and maps keep their own no-cache + ETag; operations answers describe this moment only.
    return "/files/" in path or "/maps/" in path or "/static/" in path


class CatalogCacheControl:
    """``Cache-Control: public, max-age=N`` on successful JSON answers that set no caching policy of their own."""

    def __init__(self, app: ASGIApp, max_age_s: int) -> None:
        self.app = app
        self.value = f"public, max-age={max_age_s}" if max_age_s > 0 else "no-cache"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Add the header to the answer's start when it is a 200 JSON catalog answer without one."""
        if scope["type"] != "http" or _uncached_path(scope.get("path", "")):
            await self.app(scope, receive, send)
            return

        async def send_with_cache(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 200:
                headers = MutableHeaders(scope=message)
                kind = headers.get("content-type", "").split(";")[0].strip()
                if (kind == "application/json" or kind.endswith("+json")) and "cache-control" not in headers:
                    headers["Cache-Control"] = self.value
            await send(message)

        await self.app(scope, receive, send_with_cache)


class RequestTimeout:
    """503 with Retry-After for a request whose answer has not started within ``timeout_s``.

    A pure ASGI middleware: once the answer has started (a long download streaming), it is never cut.
    On timeout the handler task is cancelled but not awaited, since a synchronous handler's thread
    cannot be interrupted and awaiting it would hold the client until it finished; whatever it sends
    afterwards is dropped.
    """

    def __init__(self, app: ASGIApp, timeout_s: float, retry_after_s: int = 30) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.retry_after = str(retry_after_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request; answer 503 instead if it has not started its answer in time."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = asyncio.Event()
        abandoned = False

        async def guarded_send(message: Message) -> None:
            if abandoned:
                return
            if message["type"] == "http.response.start":
                started.set()
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, guarded_send))
        waiter = asyncio.ensure_future(started.wait())
        try:
            await asyncio.wait({task, waiter}, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if task.done() or started.is_set():
            await task  # finished, or streaming: let it run to its end without a limit
            return
        abandoned = True
        task.cancel()
        task.add_done_callback(_forget)
        log.warning("%s %s: no answer started within %g s, answered 503", scope.get("method"), scope.get("path"),
                    self.timeout_s)
        body = json.dumps({"detail": f"the request did not start its answer within {self.timeout_s:g} s; "
                                     "try again later"}).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", self.retry_after.encode()), (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": body})


class RootPath:
    """Sets the ASGI ``root_path`` (the prefix a reverse proxy strips) on every request, for links and the docs."""

    def __init__(self, app: ASGIApp, root_path: str) -> None:
        self.app = app
        self.root_path = root_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on with its root_path set."""
        if scope["type"] in ("http", "websocket"):
            scope["root_path"] = self.root_path
        await self.app(scope, receive, send)


def _forget(task: asyncio.Future) -> None:
    # An abandoned handler's end (cancelled, or an error after its client got the 503) is only logged.
    if not task.cancelled() and task.exception() is not None:
        log.warning("a timed-out request ended with %r", task.exception())


def create_app(settings: ServeSettings) -> FastAPI:
    """Build the app serving the published runs under ``settings.forecasts_dir``."""
    app = FastAPI(
        title="spherecast",
        summary="Published forecast runs: catalog, downloads, maps and a web viewer.",
        version="0.1.0",
        # /docs and /redoc are served by routes_ops from files inside the package, never from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = Metrics(settings.forecasts_dir, settings.cycle_hours, settings.wait_minutes)
    app.include_router(routes_site.router)
    app.include_router(routes_runs.router)
    app.include_router(routes_subset.router)
    app.include_router(routes_edr.router)
    app.include_router(routes_stac.router)
    app.include_router(routes_ops.router)
    app.include_router(routes_georef.router)
    app.mount("/static", StaticFiles(directory=routes_site.STATIC_DIR), name="static")
    _install_error_handlers(app)
    install_openapi(app)
    # Added innermost first: metrics see every answer (timeouts and CORS preflights included) and the bytes sent.
    app.add_middleware(CatalogGzip)
    app.add_middleware(CatalogCacheControl, max_age_s=settings.catalog_max_age_s)
    if settings.request_timeout_s is not None:
        app.add_middleware(RequestTimeout, timeout_s=settings.request_timeout_s)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "HEAD"],
                           allow_headers=["Range", "If-None-Match", "If-Range"],
                           expose_headers=["ETag", "Content-Length", "Content-Range", "Accept-Ranges", "Link",
                                           "X-Total-Count", "X-Estimated-Size", "Retry-After"])
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics, routes=app)
    if settings.root_path:
        app.add_middleware(RootPath, root_path=settings.root_path)
    log.info("serving published runs from %s", settings.forecasts_dir)
    return app


def app_from_config(config: Config) -> FastAPI:
    """Build the app from the project config (what ``spherecast serve`` runs)."""
    return create_app(settings_from_config(config))


CONFIG_ENV = "SERVE_SPHERECAST_CONFIG"
"""Names the config file each server worker loads (not ``SPHERECAST_*``: those are config overrides)."""


def app_from_env() -> FastAPI:
    """Build the app from the config file named by ``$SERVE_SPHERECAST_CONFIG`` (the factory each worker calls)."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise RuntimeError(f"{CONFIG_ENV} is not set: start workers with `spherecast serve --workers N`")
    # The file holds the fully resolved config (environment and command line included): read it as it is.
    return app_from_config(load_config(path, env={}))
