"""The ``verify_forecasts`` Prefect flow on a temporary Prefect server: scores, table rows, per-run and
aggregate scorecards; an up-to-date rerun draws nothing new; a run that cannot be scored fails the
flow only after every other run was scored and drawn."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import xarray as xr
from prefect.testing.utilities import prefect_test_harness

from core.climatology import store_channels
from core.config import Config, dump_config
from core.testing import analysis_dataset
from pipelines.verify import AGGREGATE_PNG, SCORECARD_PNG, verify_forecasts
from serve.layout import ERROR_MAPS_INDEX, map_index
from serve.products import products_for
from tests.core.test_verify_runs import db_rows, make_config, make_forecast, make_store, publish_forecast, write_time


def map_index_products(config: Config, name: str) -> list[str]:
    """The forecast products a run of the test store has (every one gets an error map)."""
    with xr.open_zarr(config.paths.forecasts / name / "forecast.zarr", consolidated=False) as fc:
        return [p.name for p in products_for(store_channels(fc))]


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_verify_forecasts_flow(tmp_path: Path, harness: None) -> None:
    config = make_config(tmp_path)
    overrides = {k: dump_config(config)[k] for k in ("paths", "grid", "train", "verify")}
    ds = make_store(config)
    name = publish_forecast(config, make_forecast(ds, init=10, leads=4))  # valid 10…13: 10, 11 have truth

    result = verify_forecasts(overrides=overrides)
    assert result["scored"] == [name] and result["failed"] == {}
    run_png = config.paths.verification / name / SCORECARD_PNG
    agg_png = config.paths.verification / AGGREGATE_PNG
    assert sorted(result["scorecards"]) == sorted([str(run_png), str(agg_png)])
    for png in (run_png, agg_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
    scores = json.loads((config.paths.verification / name / "scores.json").read_text())
    assert [lead["lead_hours"] for lead in scores["leads"]] == [0, 6] and scores["pending_leads"] == [12, 18]
    assert {r["lead_hours"] for r in db_rows(config, name)} == {0, 6}
    stamp = run_png.stat().st_mtime_ns
    # Error maps of the verified leads only, beside the scores, indexed with their checksums.
    assert result["error_maps"] == [name]
    error_index = config.paths.verification / name / ERROR_MAPS_INDEX
    drawn = map_index(json.loads(error_index.read_text())["files"])
    assert drawn and all(regions == {"global": [0, 6]} for regions in drawn.values())
    assert set(drawn) == {f"error_{p}" for p in map_index_products(config, name)}
    index_stamp = error_index.stat().st_mtime_ns

    again = verify_forecasts(overrides=overrides)
    assert again["skipped"] == [name] and again["scored"] == []
    assert str(run_png) not in again["scorecards"] and run_png.stat().st_mtime_ns == stamp
    assert again["error_maps"] == [] and error_index.stat().st_mtime_ns == index_stamp

    bad = publish_forecast(config, make_forecast(analysis_dataset(grid="5.625deg", periods=16, seed=3), init=4,
                                                 leads=2))
    ds["done"][12] = 1
    write_time(config, ds, 12)
    with pytest.raises(ValueError, match=f"could not be scored: .*{bad}"):
        verify_forecasts(overrides=overrides)
    # The good run was still re-scored with its new lead and drawn again before the flow failed.
    assert {r["lead_hours"] for r in db_rows(config, name)} == {0, 6, 12}
    assert run_png.stat().st_mtime_ns != stamp
    assert all(regions == {"global": [0, 6, 12]}
               for regions in map_index(json.loads(error_index.read_text())["files"]).values())
