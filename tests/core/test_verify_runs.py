"""Deferred verification of published runs against a real Zarr store, a real SQLite database and real PNGs.

The store is written to disk and changed the way ingest changes it (region writes of fields and
flags): truth arrives for more times, and an ERA5T time is replaced by final ERA5. Expected
numbers come from numpy on the same arrays, never from the code under test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
import xarray as xr

from core.config import Config
from core.fields import to_channels
from core.runs import publish, run_name, staging_dir, write_manifest
from core.schema import EXPVER_FINAL, EXPVER_PRELIMINARY, validate_forecast
from core.scores_db import SCORES, database_url, open_database, replace_run
from core.testing import analysis_dataset
from core.verify_runs import verify_runs
from serve.scorecard import render_scorecard
from tests.core.test_verify_climatology import numpy_climatology
from tests.core.test_verify_metrics import numpy_weights

CH = ["geopotential_500", "u_component_of_wind_500", "v_component_of_wind_500"]
PERIODS = 16  # 2000-01-01T00 … 2000-01-04T18, 6-hourly
ARRIVED = 12  # times 0–11 are done; 12–15 have not arrived
PROVENANCE = {"checkpoint_sha256": "c" * 64, "dataset_version": "testing-0", "code_version": "test"}
PER_LEAD_ROWS = 3 * (5 + 5 + 4)  # channels × (model, persistence: rmse bias acc crps spectral_ratio; climatology: no acc)


def make_config(root: Path, **verify: object) -> Config:
    return Config.model_validate({
        "paths": {"root": str(root)}, "grid": {"preset": "tiny"},
        "train": {"train_start": "2000-01-01", "train_end": "2000-01-02T18", "val_start": "2000-01-03",
                  "val_end": "2000-01-04"},
        "verify": {"climatology_window_days": 1, **verify}})


def make_store(config: Config) -> xr.Dataset:
    ds = analysis_dataset(periods=PERIODS, seed=3)
    ds["done"][ARRIVED:] = 0
    ds["replaced"] = ("time", np.zeros(PERIODS, np.uint8))
    ds.to_zarr(config.paths.analysis_store, zarr_format=3, consolidated=False)
    return ds


def write_time(config: Config, ds: xr.Dataset, i: int) -> None:
    """Write time ``i`` of ``ds`` (fields and flags) into the store in place, as ingest's region writes do."""
    part = ds.isel(time=slice(i, i + 1)).drop_vars(["latitude", "longitude", "level"])
    part.to_zarr(config.paths.analysis_store, region={"time": slice(i, i + 1)}, consolidated=False)


def make_forecast(ds: xr.Dataset, init: int, leads: int, offset: float | list[float] = 1.0) -> xr.Dataset:
    """Truth at the valid times plus ``offset`` after lead 0 (a list: one member per offset)."""
    fields = ds.drop_vars(["done", "expver", "replaced"], errors="ignore").isel(time=slice(init, init + leads))
    fields = fields.reindex(time=pd.date_range(ds.time.values[init], periods=leads, freq="6h"))
    lead = fields["time"].values - fields["time"].values[0]
    fc = fields.rename(time="lead_time").assign_coords(lead_time=lead)
    step = xr.DataArray((np.arange(leads) > 0).astype(float), dims="lead_time")
    offsets = np.atleast_1d(np.asarray(offset, dtype=float))
    shift = xr.DataArray(offsets, dims="member") if isinstance(offset, list) else float(offsets[0])
    for name in fc.data_vars:
        fc[name] = (fc[name] + step * shift).astype(np.float32).assign_attrs(ds[name].attrs)
    fc = fc.expand_dims(init_time=[ds.time.values[init]])
    if isinstance(offset, list):  # the contract's order: init_time, lead_time, member, level, lat, lon
        fc = fc.assign_coords(member=np.arange(offsets.size)).transpose("init_time", "lead_time", "member", ...)
    fc = fc.assign_coords(valid_time=(("init_time", "lead_time"), fc.init_time.values[:, None] + lead[None, :]))
    return validate_forecast(fc)


def publish_forecast(config: Config, fc: xr.Dataset) -> str:
    init = pd.Timestamp(fc["init_time"].values[0])
    name = run_name(init)
    tmp = staging_dir(config.paths.forecasts, name)
    fc.to_zarr(tmp / "forecast.zarr", zarr_format=3, consolidated=False)
    write_manifest(tmp, init, provenance=PROVENANCE)
    publish(tmp, config.paths.forecasts / name)
    return name


def db_rows(config: Config, run: str) -> list[dict]:
    """Rows read back through plain SQLAlchemy from the database file."""
    engine = sa.create_engine(database_url(None, config.paths.verification))
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM scores WHERE run = :run"), {"run": run}).mappings().all()
    engine.dispose()
    return [dict(r) for r in rows]


def cell(rows: list[dict], lead: int, channel: str, system: str, metric: str) -> dict:
    found = [r for r in rows if (r["lead_hours"], r["channel"], r["system"], r["metric"]) == (lead, channel, system, metric)]
    assert len(found) == 1, found
    return found[0]


def np_rmse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    w = numpy_weights(np.linspace(90, -90, a.shape[-2]))
    return np.sqrt((((a - b) ** 2).mean(-1) * w).sum(-1))


def test_only_existing_truth_is_scored_and_the_rest_once_it_arrives(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    ds = make_store(config)
    name = publish_forecast(config, make_forecast(ds, init=9, leads=5))  # valid times 9…13
    report = verify_runs(config)
    assert report.scored == [name] and not report.failed
    payload = report.runs[name]
    assert [lead["lead_hours"] for lead in payload["leads"]] == [0, 6, 12]
    assert payload["pending_leads"] == [18, 24]
    rows = db_rows(config, name)
    assert len(rows) == 3 * PER_LEAD_ROWS and {r["lead_hours"] for r in rows} == {0, 6, 12}
    truth = to_channels(ds, CH).values.astype(np.float64)
    for lead, t in ((6, 10), (12, 11)):
        model = cell(rows, lead, "u_component_of_wind_500", "model", "rmse")
        assert model["value"] == pytest.approx(1.0, rel=1e-5)  # the forecast is the truth + 1 everywhere
        assert cell(rows, lead, "u_component_of_wind_500", "model", "bias")["value"] == pytest.approx(1.0, rel=1e-5)
        np.testing.assert_allclose([cell(rows, lead, c, "persistence", "rmse")["value"] for c in CH],
                                   np_rmse(truth[9], truth[t]), rtol=1e-5)
        # Climatology: a numpy doy × hour mean of the training times (0–7) at the valid time's day and hour.
        clim = numpy_climatology(ds, pd.Timestamp("2000-01-01"), pd.Timestamp("2000-01-02T18"), 1)
        valid = pd.Timestamp(ds.time.values[t])
        hour = [0, 6, 12, 18].index(valid.hour)
        np.testing.assert_allclose([cell(rows, lead, c, "climatology", "rmse")["value"] for c in CH],
                                   np_rmse(clim[valid.day_of_year - 1, hour], truth[t]), rtol=1e-5)
    assert {r["truth_expver"] for r in rows} == {EXPVER_FINAL}
    # Spectra (own file): the truth's power sums to its area-mean square (Parseval); the model's is the truth+1's.
    spectra = xr.open_dataset(config.paths.verification / name / "spectra.nc").load()
    assert spectra["power"].dims == ("lead_hours", "source", "channel", "wavenumber")
    assert spectra["lead_hours"].values.tolist() == [0, 6, 12] and spectra.sizes["wavenumber"] == 17
    w = numpy_weights(ds.latitude.values)
    power = spectra["power"].sel(lead_hours=6, channel=CH)
    np.testing.assert_allclose(power.sel(source="truth").sum("wavenumber").values,
                               ((truth[10] ** 2).mean(-1) * w).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(power.sel(source="model").sum("wavenumber").values,
                               (((truth[10] + 1) ** 2).mean(-1) * w).sum(-1), rtol=1e-5)
    scored_at = rows[0]["scored_at"]

    # Nothing changed: skipped, rows untouched.
    again = verify_runs(config)
    assert again.skipped == [name] and again.scored == []
    assert db_rows(config, name)[0]["scored_at"] == scored_at

    # Truth for time 12 arrives: the run is re-scored with one more lead, and nothing else is lost.
    ds["done"][12] = 1
    write_time(config, ds, 12)
    later = verify_runs(config)
    assert later.scored == [name]
    assert [lead["lead_hours"] for lead in later.runs[name]["leads"]] == [0, 6, 12, 18]
    assert later.runs[name]["pending_leads"] == [24]
    rows = db_rows(config, name)
    assert len(rows) == 4 * PER_LEAD_ROWS
    assert cell(rows, 18, "geopotential_500", "model", "rmse")["value"] == pytest.approx(1.0, rel=1e-4)


def test_era5t_replaced_by_final_era5_triggers_a_rescore(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    ds = make_store(config)
    final = ds.copy(deep=True)
    ds["expver"][10] = EXPVER_PRELIMINARY
    for name in ("geopotential", "u_component_of_wind", "v_component_of_wind"):
        ds[name][10] = ds[name][10] + 3.0  # the preliminary values differ from the final ones
    write_time(config, ds, 10)
    name = publish_forecast(config, make_forecast(final, init=9, leads=3))
    first = verify_runs(config)
    assert first.scored == [name]
    before = cell(db_rows(config, name), 6, "u_component_of_wind_500", "model", "rmse")
    assert before["truth_expver"] == EXPVER_PRELIMINARY and not before["truth_replaced"]
    assert before["value"] == pytest.approx(np.sqrt(2.0**2), rel=1e-5)  # forecast final+1, truth final+3
    assert verify_runs(config).skipped == [name]

    final["replaced"][10] = 1
    write_time(config, final, 10)
    second = verify_runs(config)
    assert second.scored == [name]
    rows = db_rows(config, name)
    after = cell(rows, 6, "u_component_of_wind_500", "model", "rmse")
    assert after["truth_expver"] == EXPVER_FINAL and after["truth_replaced"]
    assert after["value"] == pytest.approx(1.0, rel=1e-5) and after["value"] != before["value"]
    assert len(rows) == 3 * PER_LEAD_ROWS and all(r["fingerprint"] == after["fingerprint"] for r in rows)


def test_ensemble_runs_get_the_fair_crps_and_their_spread(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    ds = make_store(config)
    offsets = [-1.0, 0.5, 2.0]
    name = publish_forecast(config, make_forecast(ds, init=8, leads=2, offset=offsets))
    report = verify_runs(config)
    assert report.scored == [name] and report.runs[name]["members"] == 3
    assert report.runs[name]["crps_method"] == "fair"
    rows = db_rows(config, name)
    e = np.asarray(offsets)  # member errors are the offsets everywhere
    fair = np.abs(e).mean() - np.abs(e[:, None] - e[None, :]).sum() / (2 * 3 * 2)
    assert cell(rows, 6, "geopotential_500", "model", "crps")["value"] == pytest.approx(fair, rel=1e-4)
    assert cell(rows, 6, "geopotential_500", "model", "rmse")["value"] == pytest.approx(abs(e.mean()), rel=1e-3)
    assert cell(rows, 6, "geopotential_500", "model", "spread")["value"] == pytest.approx(e.std(ddof=1), rel=1e-4)
    truth = to_channels(ds, CH).values.astype(np.float64)
    w = numpy_weights(np.linspace(90, -90, truth.shape[-2]))
    mae = ((np.abs(truth[8] - truth[9]).mean(-1)) * w).sum(-1)
    np.testing.assert_allclose([cell(rows, 6, c, "persistence", "crps")["value"] for c in CH], mae, rtol=1e-5)


def test_aggregate_and_scorecards_and_a_bad_run_does_not_stop_the_others(tmp_path: Path) -> None:
    config = make_config(tmp_path, aggregate_runs=2)
    ds = make_store(config)
    names = [publish_forecast(config, make_forecast(ds, init=i, leads=3, offset=float(i))) for i in (6, 7, 8)]
    coarse = analysis_dataset(grid="5.625deg", periods=16, seed=3)
    bad = publish_forecast(config, make_forecast(coarse, init=5, leads=2))
    report = verify_runs(config)
    assert report.scored == sorted(names) and list(report.failed) == [bad]
    assert "grid" in report.failed[bad]
    agg = report.aggregate
    assert agg is not None and agg["runs"] == sorted(names)[-2:]
    mean = [r for r in agg["rows"] if (r["lead_hours"], r["channel"], r["system"], r["metric"])
            == (6, "u_component_of_wind_500", "model", "rmse")]
    assert mean[0]["value"] == pytest.approx((7.0 + 8.0) / 2, rel=1e-4) and mean[0]["runs"] == 2
    for payload, png in ((report.runs[names[0]], tmp_path / "run.png"), (agg, tmp_path / "agg.png")):
        render_scorecard(payload, png)
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width >= 400 and height >= 300
    with pytest.raises(ValueError, match="no model RMSE"):
        render_scorecard({"rows": [], "runs": []}, tmp_path / "empty.png")


def test_replacing_rows_is_one_transaction_and_bad_inputs_are_refused(tmp_path: Path) -> None:
    engine = open_database(f"sqlite:///{tmp_path / 's.sqlite'}")
    row = {"run": "20000101T00", "init_time": pd.Timestamp("2000-01-01").to_pydatetime(), "lead_hours": 6,
           "valid_time": pd.Timestamp("2000-01-01T06").to_pydatetime(), "channel": "geopotential_500",
           "system": "model", "metric": "rmse", "value": 1.5, "truth_expver": 1, "truth_replaced": False,
           "dataset_version": "v", "fingerprint": "f", "scored_at": pd.Timestamp("2026-01-01").to_pydatetime()}
    assert replace_run(engine, "20000101T00", [row, {**row, "metric": "bias", "value": float("nan")}]) == 2
    with pytest.raises(sa.exc.IntegrityError):  # a duplicate cell fails the insert after the delete ran …
        replace_run(engine, "20000101T00", [row, row])
    with engine.connect() as conn:  # … and the transaction left the old rows in place
        values = conn.execute(sa.select(SCORES.c.metric, SCORES.c.value).order_by(SCORES.c.metric)).all()
    assert [tuple(v) for v in values] == [("bias", None), ("rmse", 1.5)]
    with pytest.raises(ValueError, match="system 'ifs'"):
        replace_run(engine, "20000101T00", [{**row, "system": "ifs"}])
    with pytest.raises(ValueError, match="other runs"):
        replace_run(engine, "20000101T06", [row])
    with pytest.raises(ValueError, match="not an SQLAlchemy URL"):
        database_url("not a url", tmp_path)
    with pytest.raises(ValueError, match="analysis store .* does not exist"):
        verify_runs(make_config(tmp_path / "empty"))
