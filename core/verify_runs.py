"""Deferred verification: score every published run on the leads whose truth now exists.

For each run in ``<forecasts>``, the leads whose valid time is a completed analysis time are
scored (model, persistence = the run's initial state, climatology; see
:func:`core.verification.score_lead`) and written to ``<verification>/<run>/scores.json`` and to
the scores table (:mod:`core.scores_db`). A run is re-scored only when its **fingerprint**
changes: the run's files (manifest checksums), the truth it is scored against (per verifiable
lead: valid time, ``expver``, ``replaced`` — so newly arrived leads and ERA5T replaced by final
ERA5 both count), the climatology's cache key and :data:`SCORING_VERSION`. Checking it reads
only flags and two small files, so an up-to-date run costs almost nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from core.climatology import cached_climatology, channel_array, climatology_at, climatology_key, store_channels
from core.config import Config
from core.errors import DataContractError, MissingInputError
from core.location import as_location, exists, zarr_url
from core.metrics import CRPS_METHOD
from core.runs import list_runs, read_manifest
from core.schema import validate_analysis, validate_forecast
from core.scores_db import aggregate, database_url, newest_runs, open_database, replace_run, run_fingerprint
from core.verification import score_lead

log = logging.getLogger(__name__)

SCORING_VERSION = "1"
SCORES_JSON = "scores.json"
AGGREGATE_JSON = "aggregate.json"
SPECTRA_NC = "spectra.nc"


@dataclass
class VerifyReport:
    """What one verification pass did, and the score payloads scorecards are drawn from."""

    verification_dir: Path
    database_url: str
    scored: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    aggregate: dict[str, Any] | None = None


def open_store(path: Path) -> xr.Dataset:
    """Open the analysis store lazily and check its contract."""
    path = as_location(path)
    if not exists(path):
        raise MissingInputError(f"analysis store {path} does not exist; nothing can be verified before ingest")
    return validate_analysis(xr.open_zarr(zarr_url(path), consolidated=False, chunks=None), what=f"analysis store {path}")


def _flags(store: xr.Dataset) -> tuple[pd.DatetimeIndex, np.ndarray, np.ndarray, np.ndarray]:
    times = pd.DatetimeIndex(store["time"].values)
    done = store["done"].values.astype(bool)
    expver = store["expver"].values.astype(int)
    replaced = store["replaced"].values.astype(bool) if "replaced" in store.data_vars else np.zeros(times.size, bool)
    return times, done, expver, replaced


def truth_state(forecast: xr.Dataset, store_flags: tuple[Any, ...]) -> list[dict[str, Any]]:
    """Per verifiable lead: index, hours, valid time, truth ``expver`` and ``replaced`` (leads without truth left out)."""
    times, done, expver, replaced = store_flags
    out = []
    leads = forecast["lead_time"].values
    for k, valid in enumerate(forecast["valid_time"].values[0]):
        i = times.get_indexer([pd.Timestamp(valid)])[0]
        if i < 0 or not done[i]:
            continue
        out.append({"index": k, "lead_hours": int(round(leads[k] / np.timedelta64(1, "h"))),
                    "valid_time": pd.Timestamp(valid).isoformat(), "store_index": int(i),
                    "truth_expver": int(expver[i]), "truth_replaced": bool(replaced[i])})
    return out


def verified_leads(forecast: xr.Dataset, store: xr.Dataset) -> list[tuple[int, int]]:
    """(forecast lead index, analysis time index) of every lead whose truth the store now holds."""
    return [(s["index"], s["store_index"]) for s in truth_state(forecast, _flags(store))]


def fingerprint(manifest: dict[str, Any], state: list[dict[str, Any]], clim_key: str) -> str:
    """Hash of what a run's scores depend on: its files, its truth, the climatology and the scoring code."""
    ident = {"files": manifest["files"], "truth": [(s["lead_hours"], s["valid_time"], s["truth_expver"],
                                                    s["truth_replaced"]) for s in state],
             "climatology": clim_key, "scoring_version": SCORING_VERSION}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True, allow_nan=False))
    os.replace(tmp, path)


def _write_netcdf(path: Path, ds: xr.Dataset) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    ds.to_netcdf(tmp)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _persistence(fc: xr.Dataset, channels: list[str], store: xr.Dataset) -> xr.DataArray | None:
    """The run's initial state: lead 0 of the forecast (members averaged), else the analysis at init."""
    zero = np.flatnonzero(fc["lead_time"].values == np.timedelta64(0))
    if zero.size:
        init = channel_array(fc, channels, init_time=0, lead_time=int(zero[0]))
        return init.mean("member") if "member" in init.dims else init
    t = pd.Timestamp(fc["init_time"].values[0])
    times, done = pd.DatetimeIndex(store["time"].values), store["done"].values.astype(bool)
    i = times.get_indexer([t])[0]
    return channel_array(store, channels, time=int(i)) if i >= 0 and done[i] else None


def score_run(name: str, fc: xr.Dataset, store: xr.Dataset, state: list[dict[str, Any]], clim: xr.Dataset,
              fp: str) -> tuple[dict[str, Any], list[dict[str, Any]], xr.Dataset]:
    """Score the verifiable leads of one run one lead at a time; return the JSON payload, table rows and spectra.

    Spectra go to their own NetCDF (``source`` truth/model/persistence/climatology × lead × channel ×
    wavenumber): at 0.25° they are far too many numbers for the JSON.
    """
    have = set(store_channels(store))
    channels = [c for c in store_channels(fc) if c in have]
    if not channels:
        raise DataContractError(f"run {name}: none of its channels {store_channels(fc)} is in the analysis store")
    init = pd.Timestamp(fc["init_time"].values[0])
    persistence = _persistence(fc, channels, store)
    scored_at = pd.Timestamp.now(tz="UTC").tz_localize(None).floor("s")
    version = str(store.attrs["dataset_version"])
    leads, rows, spec_parts = [], [], []
    for s in state:
        fck = channel_array(fc, channels, init_time=0, lead_time=s["index"])
        truth = channel_array(store, channels, time=s["store_index"])
        clim_k = climatology_at(clim, pd.Timestamp(s["valid_time"]), channels)
        metrics, spectra = score_lead(fck, truth, clim_k, persistence)
        table = {sys_: {m: {c: _finite(v) for c, v in zip(channels, da.values.tolist(), strict=True)}
                        for m, da in ms.items()} for sys_, ms in metrics.items()}
        spec_parts.append(xr.concat([spectra[k].expand_dims(source=[k]) for k in spectra], dim="source"))
        leads.append({**{k: s[k] for k in ("lead_hours", "valid_time", "truth_expver", "truth_replaced")},
                      "scores": table})
        for sys_, ms in table.items():
            for metric, by_ch in ms.items():
                for ch, value in by_ch.items():
                    rows.append({"run": name, "init_time": init.to_pydatetime(), "lead_hours": s["lead_hours"],
                                 "valid_time": pd.Timestamp(s["valid_time"]).to_pydatetime(), "channel": ch,
                                 "system": sys_, "metric": metric, "value": value,
                                 "truth_expver": s["truth_expver"], "truth_replaced": s["truth_replaced"],
                                 "dataset_version": version, "fingerprint": fp,
                                 "scored_at": scored_at.to_pydatetime()})
    all_leads = [int(round(v / np.timedelta64(1, "h"))) for v in fc["lead_time"].values]
    done_leads = {s["lead_hours"] for s in state}
    payload = {"run": name, "init_time": init.isoformat(), "scored_at": scored_at.isoformat(), "fingerprint": fp,
               "dataset_version": version, "channels": channels, "crps_method": CRPS_METHOD,
               "members": int(fc.sizes["member"]) if "member" in fc.dims else None,
               "climatology": {k: clim.attrs.get(k) for k in ("key", "period_start", "period_end", "window_days")},
               "leads": leads, "pending_leads": [h for h in all_leads if h not in done_leads],
               "spectra_file": SPECTRA_NC}
    spectra_ds = xr.concat(spec_parts, dim="lead_hours", join="outer").assign_coords(
        lead_hours=[s["lead_hours"] for s in state]).astype(np.float32).to_dataset(name="power")
    spectra_ds["power"].attrs = {"long_name": "zonal power spectrum, area-weighted mean over latitude",
                                 "units": "field units squared"}
    return payload, rows, spectra_ds


def verify_runs(config: Config) -> VerifyReport:
    """Score every published run whose scores are out of date against the truth that now exists."""
    out_dir = config.paths.verification
    report = VerifyReport(out_dir, database_url(config.verify.database_url, out_dir))
    store = open_store(config.paths.analysis_store)
    engine = open_database(report.database_url)
    start, end = pd.Timestamp(config.train.train_start), pd.Timestamp(config.train.train_end)
    window = config.verify.climatology_window_days
    flags = _flags(store)
    clim_key = climatology_key(store, start, end, window)
    clim: xr.Dataset | None = None
    for name in list_runs(config.paths.forecasts):
        run_dir = config.paths.forecasts / name
        try:
            manifest = read_manifest(run_dir)
            with xr.open_zarr(run_dir / "forecast.zarr", consolidated=False, chunks=None) as fc:
                validate_forecast(fc, what=f"forecast of run {name}")
                state = truth_state(fc, flags)
                if not state:
                    report.pending.append(name)
                    continue
                fp = fingerprint(manifest, state, clim_key)
                previous = _read_json(out_dir / name / SCORES_JSON)
                if previous and previous.get("fingerprint") == fp and run_fingerprint(engine, name) == fp:
                    report.skipped.append(name)
                    report.runs[name] = previous
                    continue
                if clim is None:
                    clim = cached_climatology(store, start, end, window, out_dir)
                payload, rows, spectra = score_run(name, fc, store, state, clim, fp)
            # The database first: if it fails, the JSON still carries the old fingerprint and the run is retried.
            replace_run(engine, name, rows)
            _write_netcdf(out_dir / name / SPECTRA_NC, spectra)
            _write_json(out_dir / name / SCORES_JSON, payload)
            report.scored.append(name)
            report.runs[name] = payload
            log.info("scored run %s: %d leads, %d rows", name, len(state), len(rows))
        except (ValueError, OSError, KeyError) as exc:
            report.failed[name] = f"{type(exc).__name__}: {exc}"
            log.error("run %s could not be scored: %s", name, exc)
    report.aggregate = write_aggregate(engine, out_dir, config.verify.aggregate_runs)
    engine.dispose()
    return report


def write_aggregate(engine: Any, out_dir: Path, limit: int) -> dict[str, Any] | None:
    """Average the newest ``limit`` scored runs per lead, channel, system and metric into ``aggregate.json``."""
    runs = newest_runs(engine, limit)
    if not runs:
        return None
    rows = aggregate(engine, runs)
    payload = {"runs": runs, "rows": [{**r, "value": _finite(r["value"]) if r["value"] is not None else None}
                                      for r in rows]}
    _write_json(out_dir / AGGREGATE_JSON, payload)
    return payload


def scorecard_grid(payload: dict[str, Any], metric: str = "rmse") -> tuple[list[str], list[int], dict[str, np.ndarray]]:
    """``(channels, lead_hours, {system: array(channel, lead)})`` of one metric from a run or aggregate payload."""
    if "leads" in payload:
        channels = list(payload["channels"])
        hours = [int(lead["lead_hours"]) for lead in payload["leads"]]
        cells = {(lead["lead_hours"], ch, sys_): v for lead in payload["leads"]
                 for sys_, ms in lead["scores"].items() for ch, v in ms.get(metric, {}).items()}
    else:
        rows = [r for r in payload["rows"] if r["metric"] == metric]
        channels = list(dict.fromkeys(r["channel"] for r in rows))
        hours = sorted({int(r["lead_hours"]) for r in rows})
        cells = {(r["lead_hours"], r["channel"], r["system"]): r["value"] for r in rows}
    systems = sorted({k[2] for k in cells})
    grids = {s: np.array([[np.nan if cells.get((h, c, s)) is None else cells[(h, c, s)] for h in hours]
                          for c in channels], dtype=float) for s in systems}
    return channels, hours, grids
