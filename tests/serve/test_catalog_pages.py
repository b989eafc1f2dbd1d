"""The run catalog over HTTP: pages (newest first, limit/offset, Link, X-Total-Count), since/until, the run
detail (variables, leads, files, scores, lineage), no server path in any answer, and the hardened OpenAPI."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from fastapi.testclient import TestClient

from core.climatology import cached_climatology
from core.grid import grid_for_shape
from core.runs import publish, run_name, sha256_file, staging_dir, write_manifest
from core.testing import analysis_dataset
from core.verify_runs import _flags, score_run, truth_state
from serve.app import create_app
from serve.catalog import RUN_PATTERN
from serve.maps import render_run_maps
from serve.settings import ServeSettings
from tests.serve.conftest import make_forecast

INITS = ["2000-01-01T00", "2000-01-01T06", "2000-01-01T12", "2000-01-01T18", "2000-01-02T00"]
NAMES = [run_name(i) for i in INITS]
TRAINING = "sfno-19991231T18"


def _publish(forecasts: Path, init: str, provenance: dict) -> None:
    forecast = make_forecast(init=init, leads=3, seed=len(init))
    name = run_name(init)
    tmp = staging_dir(forecasts, name)
    forecast.to_zarr(tmp / "forecast.zarr", zarr_format=3, consolidated=False)
    forecast.to_netcdf(tmp / "forecast.nc")
    render_run_maps(forecast, tmp, dpi=20)
    write_manifest(tmp, pd.Timestamp(init), provenance)
    publish(tmp, forecasts / name)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five runs whose provenance names server paths, a training run with its registry, and one run's scores."""
    root = tmp_path_factory.mktemp("catalog-site")
    runs_dir = root / "runs"
    checkpoint = runs_dir / TRAINING / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"weights of a tiny model")
    digest = sha256_file(checkpoint)
    (checkpoint.parent / "config.yaml").write_text(yaml.safe_dump({"train": {
        "train_start": "1999-01-01T00:00:00", "train_end": "1999-10-31T18:00:00",
        "val_start": "1999-11-01T00:00:00", "val_end": "1999-12-31T18:00:00"}}))
    # As models.checkpoint.register_checkpoint and models.promotion write them.
    (runs_dir / "registry.jsonl").write_text(json.dumps({
        "registered_at": "2000-01-01T00:00:00+00:00", "checkpoint": str(checkpoint), "sha256": digest,
        "train_step": 40, "dataset_version": "testing-0"}) + "\n")
    (runs_dir / "current.json").write_text(json.dumps({
        "checkpoint": f"{TRAINING}/checkpoint.pt", "checkpoint_sha256": digest, "run_name": TRAINING,
        "promoted_at": "2000-01-01T00:00:00+00:00"}))
    provenance = {"checkpoint": str(checkpoint), "checkpoint_sha256": digest, "dataset_version": "testing-0",
                  "code_version": "test", "lead_hours": 12, "init_source": f"analysis store {root}/data/analysis.zarr",
                  "config": {"paths": {"root": str(root), "forecasts_dir": str(root / "forecasts")}}}
    for init in INITS:
        _publish(root / "forecasts", init, provenance)
    # Real scores of the newest run: core.verify_runs.score_run against a tiny analysis store.
    verification = root / "verification"
    store = analysis_dataset(grid="tiny", start="1999-12-25", periods=40, step_hours=6, seed=3)
    clim = cached_climatology(store, pd.Timestamp("1999-12-25"), pd.Timestamp("2000-01-04"), 5, verification)
    fc = make_forecast(init=INITS[-1], leads=3, seed=len(INITS[-1]))
    payload, _, _ = score_run(NAMES[-1], fc, store, truth_state(fc, _flags(store)), clim, "fp")
    (verification / NAMES[-1]).mkdir(parents=True)
    (verification / NAMES[-1] / "scores.json").write_text(json.dumps(payload))
    return root


@pytest.fixture(scope="module")
def api(site: Path) -> TestClient:
    """The app over the site, with scores and lineage switched on."""
    return TestClient(create_app(ServeSettings(forecasts_dir=site / "forecasts", runs_dir=site / "runs",
                                               verification_dir=site / "verification")))


def _links(header: str | None) -> dict[str, str]:
    return {rel: url for url, rel in re.findall(r'<([^>]+)>;\s*rel="(\w+)"', header or "")}


def test_pages_are_newest_first_and_linked(api: TestClient) -> None:
    seen, url, pages = [], "/runs?limit=2", 0
    while url:
        response = api.get(url)
        assert response.status_code == 200 and response.headers["X-Total-Count"] == "5"
        seen += [e["name"] for e in response.json()]
        links = _links(response.headers.get("Link"))
        assert ("prev" in links) == (pages > 0)
        url, pages = links.get("next"), pages + 1
    assert seen == NAMES[::-1] and pages == 3
    last = api.get("/runs?limit=2&offset=4")
    assert [e["name"] for e in last.json()] == [NAMES[0]] and "next" not in _links(last.headers.get("Link"))
    assert _links(last.headers["Link"])["prev"].endswith("offset=2&limit=2")
    whole = api.get("/runs")
    assert [e["name"] for e in whole.json()] == NAMES[::-1] and "Link" not in whole.headers
    assert api.get("/runs?offset=10").json() == [] and api.get("/runs?offset=10").headers["X-Total-Count"] == "5"


@pytest.mark.parametrize("query, want", [
    ({"since": "2000-01-01T06", "until": "2000-01-01T18"}, NAMES[1:4]),  # both ends inclusive
    ({"until": "2000-01-01"}, NAMES[:4]),  # a date covers its whole day
    ({"since": "2000-01-02"}, NAMES[4:]),
    ({"since": "2000-01-01T08:00+02:00", "until": "2000-01-01T06:00:00Z"}, NAMES[1:2]),  # offsets: to UTC
    ({"since": "2000-01-01T06:00:00.000001"}, NAMES[2:]),
    ({"until": "1999-12-31"}, []),
])
def test_since_and_until_filter_on_init_time(api: TestClient, query: dict[str, str], want: list[str]) -> None:
    response = api.get("/runs", params=query)
    assert response.status_code == 200, response.text
    assert [e["name"] for e in response.json()] == want[::-1]
    assert response.headers["X-Total-Count"] == str(len(want))


@pytest.mark.parametrize("query, name", [
    ("limit=0", "limit"), ("limit=1001", "limit"), ("limit=ten", "limit"), ("offset=-1", "offset"),
    ("since=yesterday", "since"), ("until=2000-13-01", "until"), ("since=2000-01-02&until=2000-01-01", "since"),
])
def test_bad_listing_parameters_are_422_naming_them(api: TestClient, query: str, name: str) -> None:
    response = api.get(f"/runs?{query}")
    assert response.status_code == 422
    assert f"'{name}'" in response.json()["detail"]


def test_run_detail_has_variables_leads_files_and_scores(api: TestClient, site: Path) -> None:
    run = NAMES[-1]
    detail = api.get(f"/runs/{run}").json()
    assert detail["name"] == run and detail["lead_hours"] == [0, 6, 12]
    assert detail["valid_times"] == ["2000-01-02T00:00:00", "2000-01-02T06:00:00", "2000-01-02T12:00:00"]
    by_name = {v["name"]: v for v in detail["variables"]}
    assert set(by_name) == {"geopotential", "u_component_of_wind", "v_component_of_wind"}
    assert by_name["u_component_of_wind"] | {"dims": None} == {
        "name": "u_component_of_wind", "long_name": "U component of wind", "units": "m s**-1",
        "standard_name": "eastward_wind", "levels": [500], "dims": None}
    for rel, entry in detail["files"].items():
        body = api.get(entry["url"]).content
        assert (len(body), hashlib.sha256(body).hexdigest()) == (entry["size"], entry["sha256"]), rel
    scores = detail["scores"]
    payload = json.loads((site / "verification" / run / "scores.json").read_text())
    z500 = scores["channels"]["geopotential_500"]
    assert z500["lead_hours"] == [lead["lead_hours"] for lead in payload["leads"]] == [0, 6, 12]
    assert z500["rmse"] == [lead["scores"]["model"]["rmse"]["geopotential_500"] for lead in payload["leads"]]
    assert z500["acc"] == [lead["scores"]["model"]["acc"]["geopotential_500"] for lead in payload["leads"]]
    # The scored RMSE at +6 h is the area-weighted (the grid's quadrature) RMSE of the forecast against the analysis.
    fc = make_forecast(init=INITS[-1], leads=3, seed=len(INITS[-1]))["geopotential"].isel(init_time=0, level=0)
    truth = analysis_dataset(grid="tiny", start="1999-12-25", periods=40, step_hours=6, seed=3)["geopotential"]
    err = fc.isel(lead_time=1).values - truth.sel(time="2000-01-02T06", level=500).values
    weights = grid_for_shape(err.shape[0], 4).weights[:, None] * np.ones_like(err)
    assert z500["rmse"][1] == pytest.approx(np.sqrt((weights * err**2).sum() / weights.sum()), rel=1e-5)
    assert api.get(f"/runs/{NAMES[0]}").json()["scores"] is None  # not scored yet


def test_run_detail_lineage_names_and_digests_only(api: TestClient, site: Path) -> None:
    run = NAMES[-1]
    lineage = api.get(f"/runs/{run}").json()["lineage"]
    checkpoint = site / "runs" / TRAINING / "checkpoint.pt"
    ckpt = lineage["checkpoint"]
    assert (ckpt["path"], ckpt["sha256"], ckpt["file_now"]) == ("checkpoint.pt", sha256_file(checkpoint), "same")
    assert (ckpt["train_step"], ckpt["current"], ckpt["training_run"]["name"]) == (40, True, TRAINING)
    assert ckpt["training_run"]["train_period"] == ["1999-01-01T00:00:00", "1999-10-31T18:00:00"]
    assert lineage["forecast"]["manifest_sha256"] == sha256_file(site / "forecasts" / run / "manifest.json")
    assert lineage["forecast"]["dir"] == run
    scores = site / "verification" / run / "scores.json"
    assert lineage["scores"] == {"path": "scores.json", "sha256": sha256_file(scores)}
    assert lineage["dataset"]["dataset_version"] == "testing-0"
    without = TestClient(create_app(ServeSettings(forecasts_dir=site / "forecasts")))
    assert without.get(f"/runs/{run}").json()["lineage"] is None  # no runs_dir: no lineage


def test_no_answer_shows_a_server_path(api: TestClient, site: Path) -> None:
    manifest = (site / "forecasts" / NAMES[0] / "manifest.json").read_text()
    assert str(site) in manifest  # the recorded provenance does name server paths
    urls = ["/runs", "/runs/latest", "/health", "/openapi.json", "/stac/catalog.json",
            "/stac/collections/forecasts.json"]
    urls += [f"/runs/{n}" for n in NAMES] + [f"/stac/items/{n}.json" for n in NAMES]
    urls += ["/runs/20991231T00", "/runs/20000230T00", "/runs/nonsense", "/runs?since=x"]
    for url in urls:
        response = api.get(url)
        assert str(site) not in response.text and "/tmp/" not in response.text, url
    detail = api.get(f"/runs/{NAMES[0]}").json()
    assert detail["provenance"]["checkpoint"] == "checkpoint.pt"
    assert detail["provenance"]["init_source"] == "analysis store analysis.zarr"


def test_openapi_documents_error_body_and_run_pattern(api: TestClient) -> None:
    doc = api.get("/openapi.json").json()
    assert "HTTPValidationError" not in json.dumps(doc)
    pattern = re.compile(RUN_PATTERN)
    for path, item in doc["paths"].items():
        for method, op in item.items():
            responses = op["responses"]
            # The request timeout and the concurrency limit can answer 503 anywhere.
            assert responses["503"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
            if op.get("parameters"):
                assert responses["422"]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorBody"}, (method, path)
            for code, entry in responses.items() if path.startswith(("/runs", "/stac")) else ():
                if int(code) >= 400:
                    assert entry["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
            for param in op.get("parameters", []):
                if param["name"] == "run":
                    assert param["schema"]["pattern"] == RUN_PATTERN
                    assert param["schema"]["examples"] == NAMES[::-1][:3]
    assert all(pattern.match(n) for n in [*NAMES, "20000230T00", "20001231T23"])
    assert not any(pattern.match(n) for n in ["20001340T00", "20000132T00", "20000101T24", "20000100T00"])
    run = doc["paths"]["/runs/{run}/files/{path}"]["get"]["responses"]
    assert {"200", "206", "304", "404", "416", "422", "503"} <= set(run)
    assert "application/x-netcdf" in run["200"]["content"]
    listing = doc["paths"]["/runs"]["get"]["responses"]["200"]
    assert {"X-Total-Count", "Link"} <= set(listing["headers"])
