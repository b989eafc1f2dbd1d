"""The contracts between stages, written down once, with ``validate_*`` raising ``ValueError``.

Writers call ``validate_*`` before publishing; readers call it on open. Each error names the
offending artifact and the thing that is wrong.

Analysis store (``<data>/analysis.zarr``, Zarr v3)
    dims ``time`` (regular), ``level`` (hPa, int), ``latitude`` (90 → −90), ``longitude``
    (0 → 360−Δ); data variables in ERA5 long names, float32, CF ``units``/``long_name``;
    pressure variables are ``(time, level, latitude, longitude)``, single-level
    ``(time, latitude, longitude)``; ``done(time)`` uint8 completeness flags (1 = written) and
    ``expver(time)`` int8 provenance (1 final, 5 preliminary/ERA5T, 0 unknown); optional
    ``replaced(time)`` uint8 (1 = the time was first stored as preliminary ERA5T and its values
    were since replaced by final ERA5; authoritative only where ``expver`` is 1, because the
    writer sets it just before ``expver``). A flag, not a write timestamp, so that rebuilding a
    store gives the same bytes. These per-time variables are :data:`FLAG_VARIABLES`; every other
    data variable is a field. Root attrs ``schema_version``, ``grid``, ``source``,
    ``dataset_version``.
Stats (``<data>/stats.nc``)
    dim ``channel``; variables ``mean``, ``std``, ``diff_std``; attrs ``period_start``,
    ``period_end``, ``dataset_version``, ``grid``, ``time_step_hours``.
Checkpoint (``<runs>/<name>/checkpoint.pt``)
    a dict with ``meta`` (see :data:`CHECKPOINT_META_KEYS`) and ``model`` (state_dict).
Forecast run (``<forecasts>/<init:%Y%m%dT%H>/``)
    ``forecast.zarr`` + ``forecast.nc`` with dims ``init_time``(1), ``lead_time`` (timedelta),
    ``level``, ``latitude``, ``longitude`` and coord ``valid_time(init_time, lead_time)``;
    ``maps/<product>/<region>/<lead_h:03d>.png`` and ``animation.gif|mp4`` there (:mod:`serve.layout`);
    ``manifest.json`` (see :func:`validate_manifest`).
    An ensemble run adds dim ``member`` (integers 0 … n−1, 0 the unperturbed control) after
    ``lead_time`` on every data variable, and ``ensemble.zarr`` beside it: the ensemble mean in the
    variable names and ``<variable>_spread``, the standard deviation over members (ddof 0), same
    dims and units (see :func:`validate_ensemble_summary`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from core.errors import DataContractError
from core.grid import Grid, parse_grid_attr
from core.variables import VARIABLES, parse_channel

SCHEMA_VERSION = "1"
EXPVER_UNKNOWN, EXPVER_FINAL, EXPVER_PRELIMINARY = 0, 1, 5
# Per-time bookkeeping variables of the analysis store (not fields); the first two are required.
FLAG_VARIABLES = ("done", "expver", "replaced")
REQUIRED_FLAGS = FLAG_VARIABLES[:2]
ANALYSIS_ATTRS = ("schema_version", "grid", "source", "dataset_version")
STATS_ATTRS = ("period_start", "period_end", "dataset_version", "grid", "time_step_hours")
CHECKPOINT_META_KEYS = (
    "schema_version", "channels", "grid", "stats", "task", "model", "code_version",
    "dataset_version", "weights_sha256", "train_step",
)
MANIFEST_KEYS = ("schema_version", "init_time", "files", "provenance")
SPREAD_SUFFIX = "_spread"  # ensemble.zarr: ``<variable>_spread`` is the std over members beside the mean ``<variable>``


def _fail(what: str, msg: str) -> None:
    raise DataContractError(f"{what}: {msg}")


def _check_grid_coords(ds: xr.Dataset, what: str) -> Grid:
    for dim in ("latitude", "longitude"):
        if dim not in ds.coords:
            _fail(what, f"missing coordinate {dim!r}")
    grid = parse_grid_attr(str(ds.attrs["grid"])) if "grid" in ds.attrs else None
    lat = np.asarray(ds["latitude"].values, dtype=float)
    lon = np.asarray(ds["longitude"].values, dtype=float)
    if lat.size < 3 or abs(lat[0] - 90) > 1e-6 or abs(lat[-1] + 90) > 1e-6 or np.any(np.diff(lat) >= 0):
        _fail(what, "latitude must run from 90 to -90 including both poles")
    if not np.allclose(np.diff(lat), lat[1] - lat[0]):
        _fail(what, "latitude is not equiangular")
    step = 360.0 / lon.size
    if not np.allclose(lon, np.arange(lon.size) * step, atol=1e-6):
        _fail(what, f"longitude must run 0 → 360-{step:g} in steps of {step:g}")
    if grid is not None and grid.shape != (lat.size, lon.size):
        _fail(what, f"grid attribute {ds.attrs['grid']!r} does not match shape {(lat.size, lon.size)}")
    return grid or Grid("custom", lat.size, lon.size)


def _check_data_vars(ds: xr.Dataset, what: str, lead_dims: tuple[str, ...]) -> None:
    data_vars = [v for v in ds.data_vars if v not in FLAG_VARIABLES]
    if not data_vars:
        _fail(what, "holds no data variables")
    for name in data_vars:
        if name not in VARIABLES:
            _fail(what, f"variable {name!r} is not in the vocabulary")
        var = VARIABLES[name]
        da = ds[name]
        level_dims = ("level",) if var.level_type == "pressure" else ()
        expected = lead_dims + level_dims + ("latitude", "longitude")
        dims = tuple(da.dims)
        if dims != expected:
            _fail(what, f"variable {name!r} has dims {da.dims}, expected {expected}")
        if da.dtype != np.float32:
            _fail(what, f"variable {name!r} is {da.dtype}, expected float32")
        if da.attrs.get("units") != var.units:
            _fail(what, f"variable {name!r} has units {da.attrs.get('units')!r}, expected {var.units!r}")
        if "long_name" not in da.attrs:
            _fail(what, f"variable {name!r} has no long_name")


def validate_analysis(ds: xr.Dataset, what: str = "analysis store") -> xr.Dataset:
    """Check an analysis dataset against the contract and return it unchanged."""
    for key in ANALYSIS_ATTRS:
        if key not in ds.attrs:
            _fail(what, f"missing root attribute {key!r}")
    if str(ds.attrs["schema_version"]) != SCHEMA_VERSION:
        _fail(what, f"schema_version {ds.attrs['schema_version']!r} is not {SCHEMA_VERSION!r}")
    if "time" not in ds.dims:
        _fail(what, "missing dimension 'time'")
    times = ds["time"].values
    if not np.issubdtype(times.dtype, np.datetime64):
        _fail(what, f"time has dtype {times.dtype}, expected datetime64")
    if times.size > 1:
        steps = np.diff(times)
        if np.any(steps <= np.timedelta64(0)) or np.any(steps != steps[0]):
            _fail(what, "time axis is not regular and increasing")
    if "level" in ds.dims and not np.issubdtype(ds["level"].dtype, np.integer):
        _fail(what, f"level has dtype {ds['level'].dtype}, expected integer hPa")
    _check_grid_coords(ds, what)
    for flag in FLAG_VARIABLES:
        present = flag in ds.data_vars
        if (flag in REQUIRED_FLAGS and not present) or (present and ds[flag].dims != ("time",)):
            _fail(what, f"missing per-time variable {flag!r}(time)")
    _check_data_vars(ds, what, ("time",))
    return ds


def validate_stats(ds: xr.Dataset, channels: list[str] | None = None, what: str = "stats") -> xr.Dataset:
    """Check normalization statistics (and, if given, that they cover ``channels``)."""
    for key in STATS_ATTRS:
        if key not in ds.attrs:
            _fail(what, f"missing attribute {key!r}")
    for name in ("mean", "std", "diff_std"):
        if name not in ds.data_vars or ds[name].dims != ("channel",):
            _fail(what, f"missing variable {name!r}(channel)")
        values = np.asarray(ds[name].values)
        if not np.all(np.isfinite(values)):
            _fail(what, f"{name!r} has non-finite values")
        if name != "mean" and np.any(values <= 0):
            _fail(what, f"{name!r} must be positive")
    if channels is not None:
        have = [str(c) for c in ds["channel"].values]
        missing = [c for c in channels if c not in have]
        if missing:
            _fail(what, f"no statistics for channels {missing}")
    return ds


def validate_checkpoint_meta(meta: Mapping[str, Any], what: str = "checkpoint") -> Mapping[str, Any]:
    """Check that a checkpoint describes itself fully enough to run alone."""
    missing = [k for k in CHECKPOINT_META_KEYS if k not in meta]
    if missing:
        _fail(what, f"missing metadata {missing}")
    for ch in meta["channels"]:
        parse_channel(ch)
    parse_grid_attr(meta["grid"])
    stats = meta["stats"]
    for key in ("mean", "std", "diff_std"):
        if len(stats.get(key, [])) != len(meta["channels"]):
            _fail(what, f"stats {key!r} has {len(stats.get(key, []))} values for {len(meta['channels'])} channels")
    if meta.get("pole_modes") is not None:  # optional: task.pole_rows="data" (models/poles.py)
        check_pole_modes(meta["pole_modes"], len(meta["channels"]), what)
    return meta


def check_pole_modes(modes: Any, channels: int, what: str = "checkpoint") -> list[list[int]]:
    """``modes`` as two lists (north, south) of ``channels`` pole-row codes in {0, 1, -1}; DataContractError otherwise."""
    rows = [list(r) for r in modes] if isinstance(modes, (list, tuple)) and all(
        isinstance(r, (list, tuple)) for r in modes) else []
    if len(rows) != 2 or any(len(r) != channels or any(v not in (0, 1, -1) for v in r) for r in rows):
        _fail(what, f"pole_modes must be two lists (north, south) of {channels} codes in 0, 1, -1; got {modes!r}")
    return [[int(v) for v in r] for r in rows]


def validate_forecast(ds: xr.Dataset, what: str = "forecast") -> xr.Dataset:
    """Check a forecast dataset (one init time, many leads) against the contract."""
    for dim in ("init_time", "lead_time"):
        if dim not in ds.dims:
            _fail(what, f"missing dimension {dim!r}")
    if ds.sizes["init_time"] != 1:
        _fail(what, f"init_time has {ds.sizes['init_time']} values, expected 1")
    if not np.issubdtype(ds["lead_time"].dtype, np.timedelta64):
        _fail(what, f"lead_time has dtype {ds['lead_time'].dtype}, expected timedelta64")
    if "valid_time" not in ds.coords or ds["valid_time"].dims != ("init_time", "lead_time"):
        _fail(what, "missing coordinate valid_time(init_time, lead_time)")
    expected = ds["init_time"].values[:, None] + ds["lead_time"].values[None, :]
    if not np.array_equal(ds["valid_time"].values, expected):
        _fail(what, "valid_time is not init_time + lead_time")
    _check_grid_coords(ds, what)
    lead_dims: tuple[str, ...] = ("init_time", "lead_time")
    if "member" in ds.dims:
        _check_members(ds, what)
        lead_dims += ("member",)
    _check_data_vars(ds, what, lead_dims)
    return ds


def _check_members(ds: xr.Dataset, what: str) -> None:
    """An ensemble's ``member`` coordinate: integers 0 … n−1 (0 the control), on every data variable."""
    if "member" not in ds.coords:
        _fail(what, "dimension 'member' has no coordinate")
    members = np.asarray(ds["member"].values)
    if not np.issubdtype(members.dtype, np.integer):
        _fail(what, f"member has dtype {members.dtype}, expected integer")
    if not np.array_equal(members, np.arange(members.size)):
        _fail(what, f"member must run 0 … {members.size - 1}, got {members.tolist()[:8]}")


def validate_ensemble_summary(ds: xr.Dataset, what: str = "ensemble summary") -> xr.Dataset:
    """Check an ensemble's ``ensemble.zarr``: each variable (the mean) with its ``<variable>_spread`` (std over members)."""
    if "member" in ds.dims:
        _fail(what, "holds a 'member' dimension; the members belong in forecast.zarr")
    spreads = [str(n) for n in ds.data_vars if str(n).endswith(SPREAD_SUFFIX)]
    means = [str(n) for n in ds.data_vars if str(n) not in spreads]
    for name in spreads:
        mean = name[: -len(SPREAD_SUFFIX)]
        if mean not in ds.data_vars:
            _fail(what, f"{name!r} has no ensemble mean {mean!r} beside it")
        if ds[name].dims != ds[mean].dims or ds[name].dtype != np.float32 \
                or ds[name].attrs.get("units") != ds[mean].attrs.get("units"):
            _fail(what, f"{name!r} must have the dims, float32 dtype and units of {mean!r}")
    lacking = [m for m in means if f"{m}{SPREAD_SUFFIX}" not in ds.data_vars]
    if lacking:
        _fail(what, f"no spread for {lacking}")
    validate_forecast(ds[means], what)
    return ds


def validate_manifest(manifest: Mapping[str, Any], what: str = "manifest") -> Mapping[str, Any]:
    """Check a forecast run's manifest: files with sizes and sha256, and provenance."""
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        _fail(what, f"missing keys {missing}")
    pd.Timestamp(manifest["init_time"])
    for rel, entry in manifest["files"].items():
        if rel.startswith("/") or ".." in rel.split("/"):
            _fail(what, f"file path {rel!r} escapes the run directory")
        if not {"size", "sha256"} <= set(entry):
            _fail(what, f"file {rel!r} lacks size or sha256")
    for key in ("checkpoint_sha256", "dataset_version", "code_version"):
        if key not in manifest["provenance"]:
            _fail(what, f"provenance lacks {key!r}")
    return manifest
