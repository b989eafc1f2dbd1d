"""A real ``spherecast serve`` over two published runs, and Debian's chromium driven by playwright.

The browser is the system's (``chromium`` or ``chromium-browser`` on PATH; CI installs it, see .ci/run),
never one playwright downloads. Every page a test opens records console errors, page errors, failed
requests and HTTP answers ≥ 400; a test ends with :meth:`Watched.assert_clean`.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from core.climatology import cached_climatology
from core.runs import run_name, write_manifest
from core.testing import analysis_dataset
from core.verify_runs import _flags, score_run, truth_state
from tests.serve.conftest import INIT, LATER_INIT, PROVENANCE, make_forecast, publish_run
from tests.serve.test_serve_process import start_serve, stop_serve

REPO = Path(__file__).resolve().parents[2]
# The first run starts from the synthetic planet, as the live pipeline records it (core.ic_select).
SYNTHETIC = {**PROVENANCE, "init_source": "synthetic-shallow-water", "init_store_kind": "initial_conditions",
             "init_dataset_version": "swe-0123456789ab"}
# Map regions of both runs: the global map, a conic one and a polar one (values under the pointer on each).
REGIONS = ("global", "europe", "arctic")
DERIVED = "spread_geopotential_500"


def chromium_binary() -> str | None:
    """The system chromium, if installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Site:
    """The served site: base URL, the forecasts behind it, and the runs' catalog entries (newest first)."""

    base: str
    root: Path
    runs: list[dict[str, Any]]

    def json(self, path: str) -> Any:
        """GET a JSON answer of the server."""
        with urllib.request.urlopen(self.base + path, timeout=10) as response:
            return json.loads(response.read())


# Module scope, not session: playwright's sync API keeps an asyncio loop running in the main thread until it
# stops, and every later test that calls asyncio.run (Prefect, anyio) would fail inside it.
@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """Two published runs (the older one synthetic and scored; maps of :data:`REGIONS`) behind a real server."""
    if chromium_binary() is None:
        pytest.skip("no chromium binary on PATH (install Debian's chromium: apt-get install -y chromium)")
    root = tmp_path_factory.mktemp("browser-site")
    forecasts = root / "forecasts"
    older = make_forecast()
    run_dir = publish_run(forecasts, older, regions=REGIONS)
    # A derived product's maps (ensemble spread), as an ensemble run publishes them: the readout must say that
    # values under the pointer are for forecast products. The pixels are a copy; only the name matters here.
    shutil.copytree(run_dir / "maps" / "geopotential_500", run_dir / "maps" / DERIVED)
    write_manifest(run_dir, pd.Timestamp(INIT), SYNTHETIC)  # same files, the provenance the live pipeline writes
    publish_run(forecasts, make_forecast(init=LATER_INIT, leads=3, seed=1), regions=REGIONS)
    # Real scores of the older run, as deferred verification writes them.
    store = analysis_dataset(grid="tiny", start="1999-12-25", periods=40, step_hours=6, seed=3)
    clim = cached_climatology(store, pd.Timestamp("1999-12-25"), pd.Timestamp("2000-01-04"), 5, root / "verification")
    payload, _, _ = score_run(run_name(INIT), older, store, truth_state(older, _flags(store)), clim, "fp")
    (root / "verification" / run_name(INIT)).mkdir(parents=True)
    (root / "verification" / run_name(INIT) / "scores.json").write_text(json.dumps(payload))

    proc, base, _ = start_serve(root)
    try:
        served = Site(base, root, [])
        served.runs = served.json("/runs")
        yield served
    finally:
        stop_serve(proc)


@pytest.fixture(scope="module")
def browser(site: Site) -> Iterator[Any]:
    """Headless system chromium (``--no-sandbox`` when running as root, where its sandbox cannot start)."""
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=chromium_binary(), headless=True, args=args)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class Watched:
    """A page with everything that went wrong on it recorded."""

    page: Any
    problems: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        """No console error, page error, failed request or HTTP error answer so far."""
        assert not self.problems, "\n".join(self.problems)


def watch(page: Any) -> Watched:
    """Record console errors, uncaught exceptions, failed requests and answers ≥ 400 of a page."""
    w = Watched(page)
    page.on("console", lambda m: m.type == "error" and w.problems.append(f"console: {m.text} at {m.location}"))
    page.on("pageerror", lambda e: w.problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: w.problems.append(f"request failed: {r.url} ({r.failure})"))
    page.on("response", lambda r: r.status >= 400 and w.problems.append(f"HTTP {r.status}: {r.url}"))
    return w


@pytest.fixture
def desktop(browser: Any) -> Iterator[Watched]:
    """A desktop-sized page, watched."""
    context = browser.new_context(viewport={"width": 1100, "height": 1000})
    try:
        yield watch(context.new_page())
    finally:
        context.close()


@pytest.fixture
def phone(browser: Any) -> Iterator[Watched]:
    """A phone-sized page (390 × 844 CSS px, touch, 3× pixels), watched."""
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                                  device_scale_factor=3)
    try:
        yield watch(context.new_page())
    finally:
        context.close()
