"""The rest of the traversal set: null bytes and overlong names, never a file outside a run, never a 500,
and an overlong request is not echoed back whole in the error."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from core.runs import run_name
from serve.app import MAX_DETAIL
from tests.serve.conftest import INIT

RUN = run_name(INIT)
LONG = "a" * 5000


@pytest.mark.parametrize(("url", "status"), [
    (f"/runs/{RUN}/files/forecast.nc%00", 404),
    (f"/runs/{RUN}/files/forecast.nc%00.png", 404),
    (f"/runs/{RUN}/files/..%00/secret.txt", 404),
    (f"/runs/{RUN}%00/files/forecast.nc", 422),
    (f"/runs/{RUN}/maps/geopotential_500%00/6.png", 404),
    (f"/runs/{RUN}/files/{LONG}", 404),
    (f"/runs/{RUN}/files/" + "a/" * 3000 + "x", 404),
    ("/runs/" + "2" * 5000, 422),
    (f"/runs/{RUN}/maps/geopotential_500/" + "9" * 400 + ".png", 404),
    (f"/runs/{RUN}/subset?variables={LONG}", 422),
    (f"/collections/{RUN}/position?coords=POINT(1%002)", 422),
])
def test_null_bytes_and_overlong_names_are_refused_briefly(client: TestClient, url: str, status: int) -> None:
    response = client.get(url)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert len(detail) <= MAX_DETAIL
    # The fixture's stray files hold these words: their content must never come back.
    assert "outside any run" not in response.text and "outside the forecasts" not in response.text
