"""Prometheus metrics of the service: requests, latency and bytes per route, and the state of the catalog.

Request metrics are counted by :class:`MetricsMiddleware`, a pure ASGI middleware wrapping ``send``
(``BaseHTTPMiddleware`` would buffer streamed downloads), so ``spherecast_http_response_bytes_total``
is the body bytes actually handed to the server. The ``route`` label is the matched route's
template (``/runs/{run}/files/{path:path}``), never the raw path, so a scraper cannot be made to
hold one series per URL; a request no route matches is ``unmatched``.

The catalog gauges (``spherecast_runs_served``, ``spherecast_newest_run_age_seconds``) are computed
when scraped, by :class:`CatalogCollector`, from the same judgement ``/health`` and ``/ready`` use.

Each app has its own :class:`~prometheus_client.CollectorRegistry` (tests build many apps). With
several server processes (``spherecast serve --workers N``) ``PROMETHEUS_MULTIPROC_DIR`` is set before
the workers start: each worker writes its counters there and a scrape of any worker reads them all.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.retention import run_status
from core.runs import list_runs

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
UNMATCHED = "unmatched"
# Seconds: from a cached catalog page to a long subset; the default buckets stop at 10 s.
# The ``*_created`` series double the exposition for a value Prometheus does not use (and multiprocess mode lacks).
disable_created_metrics()
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class CatalogCollector(Collector):
    """Gauges read from the forecasts directory at scrape time: runs published and the newest one's age."""

    def __init__(self, forecasts_dir: Path, cycle_hours: int, wait_minutes: float) -> None:
        self.forecasts_dir = Path(forecasts_dir)
        self.cycle_hours = cycle_hours
        self.wait_minutes = wait_minutes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield ``spherecast_runs_served`` and, when there is a run, ``spherecast_newest_run_age_seconds``."""
        try:
            served = len(list_runs(self.forecasts_dir))
            status = run_status(self.forecasts_dir, self.cycle_hours, self.wait_minutes)
        except OSError:  # an unreadable directory serves nothing; /ready says why
            served, status = 0, {"published": None}
        yield GaugeMetricFamily("spherecast_runs_served", "Published forecast runs being served.", value=served)
        age = GaugeMetricFamily("spherecast_newest_run_age_seconds",
                                "Seconds since the newest published run was published (absent: no run).")
        if status.get("published"):
            published = pd.Timestamp(status["published"])
            age.add_metric([], (pd.Timestamp.now(tz="UTC") - published).total_seconds())
        yield age


class Metrics:
    """The request metrics of one app and the registry a scrape reads."""

    def __init__(self, forecasts_dir: Path, cycle_hours: int = 6, wait_minutes: float = 0.0,
                 multiprocess: bool | None = None) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV)) if multiprocess is None else multiprocess
        # In multiprocess mode the values live in files shared by the workers, read back by MultiProcessCollector;
        # the metric objects are then registered nowhere, so a scrape never counts this worker twice.
        self.registry = CollectorRegistry()
        own = None if self.multiprocess else self.registry
        self.requests = Counter("spherecast_http_requests_total", "HTTP requests answered, by method, route and status.",
                                ["method", "route", "status"], registry=own)
        self.duration = Histogram("spherecast_http_request_duration_seconds",
                                  "Time from receiving a request to the end of its answer, by route.", ["route"],
                                  buckets=DURATION_BUCKETS, registry=own)
        self.bytes = Counter("spherecast_http_response_bytes_total", "Response body bytes sent, by route.", ["route"],
                             registry=own)
        if self.multiprocess:
            MultiProcessCollector(self.registry)
        self.registry.register(CatalogCollector(forecasts_dir, cycle_hours, wait_minutes))

    def observe(self, method: str, route: str, status: int | str, seconds: float, sent: int) -> None:
        """Count one finished request."""
        self.requests.labels(method=method, route=route, status=str(status)).inc()
        self.duration.labels(route=route).observe(seconds)
        if sent:
            self.bytes.labels(route=route).inc(sent)

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition of every metric and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def route_template(app: Any, scope: Scope) -> str:
    """After routing: the template of the route that handled ``scope`` (``/runs/{run}``), a mount's, or ``unmatched``.

    Routing records the matched route in the scope (an API route as ``route``, any other route or mount
    as its ``endpoint``); a method the route does not allow (405) still counts under that route.
    """
    route = scope.get("route")
    if isinstance(getattr(route, "path", None), str):
        return route.path
    endpoint = scope.get("endpoint")
    if endpoint is not None:
        for candidate in getattr(getattr(app, "router", None), "routes", ()):
            if isinstance(candidate, Mount) and candidate.app is endpoint:
                return candidate.path + "/{path:path}"
            if getattr(candidate, "endpoint", None) is endpoint and isinstance(getattr(candidate, "path", None), str):
                return candidate.path
    return UNMATCHED


class MetricsMiddleware:
    """Pure ASGI middleware counting requests, latency and body bytes actually sent, by route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Any) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request through, then record its status, duration and bytes."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: int | str = "none"  # the client left before any answer started
        sent = 0
        head = scope.get("method") == "HEAD"

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not head:
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except BaseException:
            if status == "none":
                status = 500
            raise
        finally:
            self.metrics.observe(scope.get("method", ""), route_template(self.routes, scope), status,
                                 time.perf_counter() - start, sent)
