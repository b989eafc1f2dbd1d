"""Operations endpoints over real published runs: /metrics, /ready, offline /docs and /redoc, CORS, caching, timeouts."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pandas as pd
import pytest
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from core.config import config_from_dict
from core.runs import run_name
from serve.app import create_app
from serve.settings import ServeSettings, get_settings, settings_from_config
from tests.serve.conftest import make_forecast, publish_run

FILES_ROUTE = "/runs/{run}/files/{path:path}"


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics as {(sample name, sorted labels): value}, parsed by prometheus_client's own parser."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def sample(samples: dict, name: str, **labels: str) -> float:
    """One sample's value, 0 when the series does not exist yet."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def published_names(forecasts: Path) -> list[str]:
    """Published runs found independently of the server: run-named folders holding a manifest."""
    return sorted(p.name for p in forecasts.iterdir()
                  if re.fullmatch(r"\d{8}T\d{2}", p.name) and (p / "manifest.json").is_file())


@pytest.fixture()
def ops_client(forecasts_dir: Path) -> TestClient:
    """A client of a fresh app (its own metrics registry) over the session's published runs."""
    return TestClient(create_app(ServeSettings(forecasts_dir=forecasts_dir)))


@pytest.fixture(scope="module")
def fresh_forecasts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A forecasts directory whose one run is this cycle's: init time = now floored to 6 h, published now."""
    init = pd.Timestamp.now(tz="UTC").tz_localize(None).floor("6h")
    forecasts = tmp_path_factory.mktemp("fresh") / "forecasts"
    publish_run(forecasts, make_forecast(init=init.isoformat(), leads=2))
    return forecasts


def test_metrics_count_exactly_the_requests_made_by_route_template(ops_client: TestClient, run_dir: Path) -> None:
    run = run_dir.name
    before = scrape(ops_client)
    for _ in range(3):
        assert ops_client.get("/runs").status_code == 200
    downloads = [ops_client.get(f"/runs/{run}/files/{name}") for name in ("forecast.nc", "forecast.nc", "manifest.json")]
    assert all(r.status_code == 200 for r in downloads)
    assert ops_client.get(f"/runs/{run}").status_code == 200
    assert ops_client.get("/no/such/page/20000101T00").status_code == 404
    assert ops_client.post("/health").status_code == 405
    after = scrape(ops_client)

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    requests = "spherecast_http_requests_total"
    assert moved(requests, method="GET", route="/runs", status="200") == 3
    assert moved(requests, method="GET", route=FILES_ROUTE, status="200") == 3
    assert moved(requests, method="GET", route="/runs/{run}", status="200") == 1
    assert moved(requests, method="GET", route="unmatched", status="404") == 1
    assert moved(requests, method="POST", route="/health", status="405") == 1
    # The first scrape is counted once it has been answered, so the second one sees it.
    assert moved(requests, method="GET", route="/metrics", status="200") == 1
    # Bytes are the bodies actually sent: for downloads, exactly what Content-Length announced.
    sent = sum(int(r.headers["content-length"]) for r in downloads)
    assert sent == sum(len(r.content) for r in downloads)
    assert moved("spherecast_http_response_bytes_total", route=FILES_ROUTE) == sent
    assert moved("spherecast_http_request_duration_seconds_count", route="/runs") == 3
    assert moved("spherecast_http_request_duration_seconds_count", route=FILES_ROUTE) == 3
    assert moved("spherecast_http_request_duration_seconds_sum", route=FILES_ROUTE) > 0
    assert moved("spherecast_http_request_duration_seconds_bucket", route="/runs", le="+Inf") == 3
    # Labels are templates: no run name, file name or unmatched raw path ever becomes a label value.
    values = {v for (_, labels) in after for (_, v) in labels}
    assert not any(run in v or "forecast.nc" in v or "no/such" in v for v in values), values


def test_head_counts_no_body_bytes(ops_client: TestClient, run_dir: Path) -> None:
    url = f"/runs/{run_dir.name}/files/forecast.nc"
    before = scrape(ops_client)
    head = ops_client.head(url)
    assert head.status_code == 200 and head.content == b""
    after = scrape(ops_client)
    labels = {"method": "HEAD", "route": FILES_ROUTE, "status": "200"}
    assert sample(after, "spherecast_http_requests_total", **labels) - sample(
        before, "spherecast_http_requests_total", **labels) == 1
    assert sample(after, "spherecast_http_response_bytes_total", route=FILES_ROUTE) == sample(
        before, "spherecast_http_response_bytes_total", route=FILES_ROUTE)


def test_catalog_gauges_match_the_published_runs(ops_client: TestClient, forecasts_dir: Path) -> None:
    names = published_names(forecasts_dir)
    created = pd.Timestamp(json.loads((forecasts_dir / names[-1] / "manifest.json").read_text())["created"])
    t0 = pd.Timestamp.now(tz="UTC")
    samples = scrape(ops_client)
    t1 = pd.Timestamp.now(tz="UTC")
    assert sample(samples, "spherecast_runs_served") == len(names) == 2
    age = samples[("spherecast_newest_run_age_seconds", ())]
    assert (t0 - created).total_seconds() <= age <= (t1 - created).total_seconds()


def test_catalog_gauges_without_a_catalog(tmp_path: Path) -> None:
    samples = scrape(TestClient(create_app(ServeSettings(forecasts_dir=tmp_path / "missing"))))
    assert sample(samples, "spherecast_runs_served") == 0
    assert ("spherecast_newest_run_age_seconds", ()) not in samples  # no run, no age: absent, not a made-up 0


def test_ready_when_this_cycles_run_is_published(fresh_forecasts: Path) -> None:
    client = TestClient(create_app(ServeSettings(forecasts_dir=fresh_forecasts)))
    response = client.get("/ready")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert body["newest_run"] == published_names(fresh_forecasts)[-1]
    assert body["newest_run"] == run_name(pd.Timestamp.now(tz="UTC").tz_localize(None).floor("6h"))
    assert response.headers["cache-control"] == "no-store"
    assert client.head("/ready").status_code == 200


def test_ready_is_503_while_the_newest_run_is_late(fresh_forecasts: Path, tmp_path: Path) -> None:
    forecasts = tmp_path / "forecasts"
    shutil.copytree(fresh_forecasts, forecasts)
    name = published_names(forecasts)[-1]
    manifest = forecasts / name / "manifest.json"
    doc = json.loads(manifest.read_text())
    # Published 7 h ago: past one 6 h cycle plus the 30 min wait allowed below.
    doc["created"] = (pd.Timestamp.now(tz="UTC") - pd.Timedelta(hours=7)).isoformat()
    manifest.write_text(json.dumps(doc))
    client = TestClient(create_app(ServeSettings(forecasts_dir=forecasts, cycle_hours=6, wait_minutes=30)))
    response = client.get("/ready")
    assert response.status_code == 503
    detail = response.json()["detail"]
    assert "late" in detail and name in detail and "6.5 h" in detail
    assert int(response.headers["retry-after"]) > 0
    assert str(tmp_path) not in response.text
    assert client.head("/ready").status_code == 503
    health = client.get("/health")  # liveness is not readiness
    assert health.status_code == 200 and health.json()["schedule"]["status"] == "late"


@pytest.mark.parametrize("layout", ["missing", "empty", "file"])
def test_ready_is_503_without_a_readable_catalog_or_a_run(tmp_path: Path, layout: str) -> None:
    forecasts = tmp_path / "forecasts"
    if layout == "empty":
        forecasts.mkdir()
    elif layout == "file":
        forecasts.write_text("not a directory")
    client = TestClient(create_app(ServeSettings(forecasts_dir=forecasts)))
    response = client.get("/ready")
    assert response.status_code == 503
    assert set(response.json()) == {"detail"}
    assert str(tmp_path) not in response.text and "forecasts" not in response.json()["detail"].split()
    assert int(response.headers["retry-after"]) > 0
    expected = "no forecast run" if layout == "empty" else "cannot be read"
    assert expected in response.json()["detail"]
    assert client.get("/health").status_code == 200


def _same_origin_urls(html: str) -> list[str]:
    """Every URL the page loads (src, href, spec-url, Swagger's ``url:``), asserting none leaves the origin."""
    assert not re.search(r"(https?:)?//[A-Za-z0-9]", html.replace("://", ":__")), "no absolute or protocol-relative URL"
    assert "http://" not in html and "https://" not in html
    urls = re.findall(r'(?:src|href|spec-url)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)
    assert urls and all(u.startswith("/") and not u.startswith("//") for u in urls), urls
    return urls


@pytest.mark.parametrize("page, kinds", [("/docs", {"javascript", "css", "json", "png"}),
                                         ("/redoc", {"javascript", "json", "png"})])
def test_docs_are_served_offline_from_the_package(ops_client: TestClient, page: str, kinds: set[str]) -> None:
    response = ops_client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    seen = set()
    for url in _same_origin_urls(response.text):
        asset = ops_client.get(url)
        assert asset.status_code == 200, url
        kind = asset.headers["content-type"].split(";")[0]
        seen |= {k for k in ("javascript", "css", "json", "png") if k in kind}
        if kind == "application/json":
            assert asset.json()["openapi"].startswith("3.1")  # what Swagger UI 5 / ReDoc 2 render
        elif "javascript" in kind:
            assert len(asset.content) > 100_000  # the whole bundle, not a stub
    assert seen == kinds
    head = ops_client.head(page)
    assert head.status_code == 200 and head.content == b""


def test_docs_behind_a_proxy_prefix_reference_the_prefix(forecasts_dir: Path) -> None:
    client = TestClient(create_app(ServeSettings(forecasts_dir=forecasts_dir, root_path="/spherecast")))
    for page in ("/docs", "/redoc"):
        urls = _same_origin_urls(client.get(page).text)
        assert all(u.startswith("/spherecast/") for u in urls), urls
        for url in urls:  # the proxy forwards the prefixed path; the app strips its root_path
            assert client.get(url).status_code == 200, url
    assert client.get("/openapi.json").json()["servers"] == [{"url": "/spherecast"}]
    assert client.get("/spherecast/runs").status_code == 200


def test_head_answers_like_get_on_ops_routes(ops_client: TestClient) -> None:
    for url in ("/metrics", "/ready", "/docs", "/redoc", "/health"):
        get, head = ops_client.get(url), ops_client.head(url)
        assert head.status_code == get.status_code, url
        assert head.content == b"", url


def test_no_cors_headers_unless_configured(ops_client: TestClient, forecasts_dir: Path) -> None:
    origin = "https://maps.example.org"
    plain = ops_client.get("/runs", headers={"Origin": origin})
    assert not any(h.lower().startswith("access-control-") for h in plain.headers)
    preflight = ops_client.options("/runs", headers={"Origin": origin, "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in preflight.headers

    client = TestClient(create_app(ServeSettings(forecasts_dir=forecasts_dir, cors_origins=(origin,))))
    allowed = client.get("/runs", headers={"Origin": origin})
    assert allowed.headers["access-control-allow-origin"] == origin
    assert "x-total-count" in allowed.headers["access-control-expose-headers"].lower()
    preflight = client.options("/runs", headers={"Origin": origin, "Access-Control-Request-Method": "GET",
                                                 "Access-Control-Request-Headers": "range"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == origin
    assert "range" in preflight.headers["access-control-allow-headers"].lower()
    other = client.get("/runs", headers={"Origin": "https://elsewhere.example.org"})
    assert "access-control-allow-origin" not in other.headers


def test_catalog_json_carries_max_age_and_files_keep_no_cache(forecasts_dir: Path, run_dir: Path) -> None:
    client = TestClient(create_app(ServeSettings(forecasts_dir=forecasts_dir, catalog_max_age_s=120)))
    for url in ("/runs", "/runs/latest", f"/runs/{run_dir.name}"):
        assert client.get(url).headers["cache-control"] == "public, max-age=120", url
    download = client.get(f"/runs/{run_dir.name}/files/manifest.json")
    assert download.headers["cache-control"] == "no-cache" and download.headers["etag"]
    for url in ("/health", "/ready", "/metrics"):
        assert client.get(url).headers["cache-control"] == "no-store", url
    missing = client.get("/runs/19990101T00")
    assert missing.status_code == 404 and "max-age" not in missing.headers.get("cache-control", "")
    zero = TestClient(create_app(ServeSettings(forecasts_dir=forecasts_dir, catalog_max_age_s=0)))
    assert zero.get("/runs").headers["cache-control"] == "no-cache"


def test_a_request_that_does_not_start_its_answer_in_time_gets_503(forecasts_dir: Path) -> None:
    settings = ServeSettings(forecasts_dir=forecasts_dir, request_timeout_s=0.2)
    app = create_app(settings)

    async def stuck_settings() -> ServeSettings:
        await asyncio.sleep(5)
        return settings

    app.dependency_overrides[get_settings] = stuck_settings
    client = TestClient(app)
    response = client.get("/runs")
    assert response.status_code == 503
    assert "0.2 s" in response.json()["detail"]
    assert int(response.headers["retry-after"]) > 0
    app.dependency_overrides.clear()
    assert client.get("/runs").status_code == 200  # the server is not stuck afterwards
    samples = scrape(client)
    assert sample(samples, "spherecast_http_requests_total", method="GET", route="/runs", status="503") == 1


def test_a_started_stream_is_not_cut_by_the_timeout(forecasts_dir: Path) -> None:
    app = create_app(ServeSettings(forecasts_dir=forecasts_dir, request_timeout_s=0.2))

    async def slow_stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"first,"
            await asyncio.sleep(0.5)  # longer than the timeout, after the answer started
            yield b"second"
        return StreamingResponse(chunks(), media_type="text/plain")

    app.add_api_route("/test-only/slow-stream", slow_stream)
    response = TestClient(app).get("/test-only/slow-stream")
    assert response.status_code == 200 and response.content == b"first,second"


def test_serve_config_maps_to_settings_and_rejects_bad_values(tmp_path: Path) -> None:
    config = config_from_dict({"paths": {"root": str(tmp_path)}, "serve": {
        "root_path": "/spherecast", "cors_origins": ["https://maps.example.org", "http://localhost:3000"],
        "catalog_max_age_s": 30, "request_timeout_s": 15, "subset_max_bytes": 1234, "area_max_points": 99,
        "workers": 4}})
    settings = settings_from_config(config)
    assert (settings.root_path, settings.cors_origins, settings.catalog_max_age_s, settings.request_timeout_s,
            settings.subset_max_bytes, settings.area_max_points) == (
        "/spherecast", ("https://maps.example.org", "http://localhost:3000"), 30, 15.0, 1234, 99)
    assert settings.forecasts_dir == tmp_path / "forecasts"
    for bad, needle in [({"root_path": "spherecast/"}, "serve.root_path"),
                        ({"cors_origins": ["https://maps.example.org/path"]}, "serve.cors_origins"),
                        ({"cors_origins": ["*", "https://a.example"]}, "serve.cors_origins"),
                        ({"workers": 0}, "serve.workers"), ({"request_timeout_s": -1}, "serve.request_timeout_s"),
                        ({"catalog_max_age_s": -5}, "serve.catalog_max_age_s"),
                        ({"limit_concurrency": 0}, "serve.limit_concurrency"), ({"port": 70000}, "serve.port"),
                        ({"timeout_keep_alive_s": 0}, "serve.timeout_keep_alive_s"), ({"bogus": 1}, "serve.bogus")]:
        with pytest.raises(ValueError, match=re.escape(needle)):
            config_from_dict({"serve": bad})
