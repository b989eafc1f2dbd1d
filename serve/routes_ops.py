"""Operations: Prometheus metrics, readiness, and the API docs served from files inside the package.

``/health`` (in :mod:`serve.routes_site`) is liveness: 200 while the process answers. ``/ready`` is
readiness: 200 only while the catalog can be read and its newest run is within the schedule, so a
load balancer stops sending traffic to a server whose forecasts went stale or whose disk vanished.
"""

from __future__ import annotations

import logging
import os
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from core.retention import run_status
from serve.errors import ErrorBody
from serve.settings import ServeSettings, get_settings

log = logging.getLogger(__name__)
router = APIRouter(tags=["ops"])

SettingsDep = Annotated[ServeSettings, Depends(get_settings)]
NOT_READY_RETRY_S = 60  # seconds a client or balancer waits before asking /ready again
SWAGGER_JS = "/static/vendor/swagger-ui/swagger-ui-bundle.js"
SWAGGER_CSS = "/static/vendor/swagger-ui/swagger-ui.css"
FAVICON = "/static/vendor/swagger-ui/favicon-32x32.png"
REDOC_JS = "/static/vendor/redoc/redoc.standalone.js"
_NO_STORE = {"Cache-Control": "no-store"}
_NOT_READY = {503: {"model": ErrorBody, "description": "Not ready: the catalog cannot be read, or its newest run is "
                                                       "late or missing (Retry-After given)"}}


def _not_ready(detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=503,
                        headers={"Retry-After": str(NOT_READY_RETRY_S), **_NO_STORE})


def _catalog_readable(settings: ServeSettings) -> bool:
    """Whether the forecasts directory exists and can be listed."""
    try:
        with os.scandir(settings.forecasts_dir) as entries:
            next(entries, None)
    except OSError as exc:
        log.warning("not ready: cannot list %s: %s", settings.forecasts_dir, exc)
        return False
    return True


@router.head("/ready", include_in_schema=False)
@router.get("/ready", summary="Readiness: the catalog is readable and its newest run is within the schedule",
            responses=_NOT_READY)
def ready(settings: SettingsDep) -> JSONResponse:
    """200 ``{"status": "ready", ...}`` while serving is useful; 503 with the reason (and Retry-After) otherwise."""
    if not _catalog_readable(settings):
        return _not_ready("the forecast catalog cannot be read at the moment")
    try:
        status = run_status(settings.forecasts_dir, settings.cycle_hours, settings.wait_minutes)
    except OSError as exc:
        log.warning("not ready: reading the newest run failed: %s", exc)
        return _not_ready("the forecast catalog cannot be read at the moment")
    if status["newest_run"] is None:
        return _not_ready("no forecast run has been published yet")
    if status["status"] != "ok":
        age = f"{status['age_hours']:g} h ago" if status["age_hours"] is not None else "at an unknown time"
        return _not_ready(f"the newest run {status['newest_run']} is late: published {age}, "
                          f"a new run is due every {status['allowed_hours']:g} h")
    body: dict[str, Any] = {"status": "ready", "newest_run": status["newest_run"], "init_time": status["init_time"],
                            "published": status["published"], "age_hours": status["age_hours"],
                            "allowed_hours": status["allowed_hours"]}
    return JSONResponse(body, headers=_NO_STORE)


@router.head("/metrics", include_in_schema=False)
@router.get("/metrics", summary="Prometheus metrics (text exposition format)", response_class=Response,
            responses={200: {"description": "Metrics in the Prometheus text format",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}})
def metrics(request: Request) -> Response:
    """Request counts, latency and bytes by route, runs served and the newest run's age (every worker's)."""
    body, content_type = request.app.state.metrics.exposition()
    return Response(body, media_type=content_type, headers=_NO_STORE)


def _root(request: Request) -> str:
    # Behind a proxy that mounts the app under a prefix, every URL in the page carries that prefix.
    return str(request.scope.get("root_path", "")).rstrip("/")


@router.head("/docs", include_in_schema=False)
@router.get("/docs", include_in_schema=False)
def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI over this app's OpenAPI, with its script and style served by this app (works offline)."""
    root = _root(request)
    return get_swagger_ui_html(openapi_url=root + request.app.openapi_url, title=f"{request.app.title} - API",
                               swagger_js_url=root + SWAGGER_JS, swagger_css_url=root + SWAGGER_CSS,
                               swagger_favicon_url=root + FAVICON, oauth2_redirect_url=None,
                               # No "validator" badge: it would load an image from validator.swagger.io.
                               swagger_ui_parameters={"validatorUrl": None})


@router.head("/redoc", include_in_schema=False)
@router.get("/redoc", include_in_schema=False)
def redoc(request: Request) -> HTMLResponse:
    """ReDoc over this app's OpenAPI, with its script served by this app and no web fonts (works offline)."""
    root = _root(request)
    return get_redoc_html(openapi_url=root + request.app.openapi_url, title=f"{request.app.title} - API reference",
                          redoc_js_url=root + REDOC_JS, redoc_favicon_url=root + FAVICON, with_google_fonts=False)
