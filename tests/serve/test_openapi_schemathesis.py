"""Property-based conformance of the whole HTTP API with its own OpenAPI document (schemathesis 4).

Every operation of the app, whoever's router it is in, is called with generated requests (explicit
examples, coverage and fuzzing phases), positive and negative, against runs published by the conftest's
builders (the same two runs as its ``forecasts_dir``, plus a staging and a manifest-less folder): the ``run``
path parameter lists the published run names as examples, so requests also reach real runs. All of
schemathesis' default checks must pass: no 5xx, every status and content type documented, every body
matching its schema, invalid input rejected and valid input accepted.

The schema is loaded at import (one pytest item per operation): schemathesis' fixture-based loader
(``schemathesis.pytest.from_fixture``) fails on pytest 9 (it sets ``node._nodeid``, which pytest 9 removed).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

import pandas as pd
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from core.runs import staging_dir, write_manifest
from serve.app import create_app
from serve.catalog import BadParameter, parse_time_bound
from serve.settings import ServeSettings
from tests.serve.conftest import LATER_INIT, PROVENANCE, make_forecast, publish_run


def _published_site() -> Path:
    root = Path(tempfile.mkdtemp(prefix="schemathesis-site-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    forecasts = root / "forecasts"
    publish_run(forecasts, make_forecast())
    publish_run(forecasts, make_forecast(init=LATER_INIT, leads=3, seed=1))
    staging = staging_dir(forecasts, "20000102T00")
    write_manifest(staging, pd.Timestamp("2000-01-02"), provenance=PROVENANCE)
    (forecasts / "20000103T00").mkdir()
    return forecasts


APP = create_app(ServeSettings(forecasts_dir=_published_site()))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


def _bound(value: object, upper: bool) -> datetime | None:
    try:
        return parse_time_bound("q", value, upper) if isinstance(value, str) else None
    except BadParameter:
        return None


def _crosses(case: schemathesis.Case) -> bool:
    """Whether a ``/runs`` request has a valid ``since`` after a valid ``until`` (a rule OpenAPI cannot state)."""
    query = case.query or {}
    if case.path != "/runs" or "since" not in query or "until" not in query:
        return False
    low, high = _bound(query["since"], upper=False), _bound(query["until"], upper=True)
    return low is not None and high is not None and low >= high


# Queries whose well-formed values may still be absent from a run (a level, lead, variable or valid time it
# lacks): OpenAPI cannot say which values a run has, and the contract is a 422 naming the value.
DATA_QUERIES = {"/runs/{run}/subset", "/collections/{run}/position", "/collections/{run}/area"}


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_every_operation_conforms_to_the_openapi(case: schemathesis.Case) -> None:
    if _crosses(case):
        # Each bound alone is valid, so schemathesis calls the pair positive; the answer must still be a 422.
        response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
        assert response.status_code == 422, response.text
        return
    if case.path in DATA_QUERIES:
        # Every other check still runs (documented status, media type and body schema, no 5xx).
        response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
        if response.status_code == 422:
            assert "detail" in response.json(), response.text
        return
    case.call_and_validate()
