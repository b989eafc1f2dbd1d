"""Forecast: load a checkpoint, roll it out from one analysis time, write the run's data files.

The output follows the forecast contract (``core.schema.validate_forecast``): dims ``init_time``
(1), ``lead_time`` (timedelta64, lead 0 = the analysis itself), ``level``, ``latitude``,
``longitude``; coord ``valid_time = init_time + lead_time``; ERA5 names and units; float32.
Publication (manifest, rename) is the caller's job with :mod:`core.runs`.

:func:`stream_forecast` is how a run is written: the Zarr store is laid out first (a template written
with ``compute=False``: metadata and coordinates only), then each lead is written into its region as
soon as it is computed, so host memory holds one lead at a time however long the forecast (a 10-day
0.25° run of 73 channels is 12 GB). The download files (CF NetCDF, GRIB2: :mod:`core.forecast_files`)
are then copied from the store lead by lead.
:func:`rollout` returns the whole forecast in memory instead, for small runs and tests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import dask.array
import numpy as np
import pandas as pd
import torch
import xarray as xr

from core.errors import ConfigError, DataContractError, MissingInputError
from core.fields import from_channels, to_channels
from core.forecast_files import write_formats
from core.grid import grid_for_shape, parse_grid_attr
from core.schema import SCHEMA_VERSION, validate_forecast
from models.checkpoint import code_version, load_for_inference
from models.clock import clock_fields
from models.normalization import Normalized, Rollout

log = logging.getLogger(__name__)

COORD_ATTRS = {
    "init_time": {"standard_name": "forecast_reference_time", "long_name": "initial time of the forecast"},
    "lead_time": {"standard_name": "forecast_period", "long_name": "time since the initial time"},
    "valid_time": {"standard_name": "time", "long_name": "time the forecast is valid for"},
    "latitude": {"standard_name": "latitude", "long_name": "latitude", "units": "degrees_north", "axis": "Y"},
    "longitude": {"standard_name": "longitude", "long_name": "longitude", "units": "degrees_east", "axis": "X"},
    "level": {"standard_name": "air_pressure", "long_name": "pressure level", "units": "hPa", "positive": "down",
              "axis": "Z"},
}


def load_forecaster(path: Path | str) -> tuple[Normalized, dict[str, Any]]:
    """The eval-mode model and metadata of a checkpoint (checked; see ``load_for_inference``)."""
    return load_for_inference(path)


def initial_state(analysis: xr.Dataset, channels: list[str], init_time: datetime | str | pd.Timestamp) -> np.ndarray:
    """The analysis at ``init_time`` as ``(channel, lat, lon)`` float32; ``ValueError`` unless it is done."""
    t = pd.Timestamp(init_time)
    times = pd.DatetimeIndex(analysis["time"].values)
    if t not in times:
        raise ConfigError(f"init_time {t} is not an analysis time (store covers {times[0]} .. {times[-1]})")
    snap = analysis.sel(time=t)
    if "done" not in snap or int(snap["done"].values) != 1:
        raise MissingInputError(f"analysis at init_time {t} is not complete (done flag unset)")
    arr = to_channels(snap, channels).values.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise DataContractError(f"analysis at init_time {t} has non-finite values")
    return arr


def initial_stack(analysis: xr.Dataset, channels: list[str], init_time: datetime | str | pd.Timestamp,
                  history: int, step_h: int) -> np.ndarray:
    """The ``history`` analyses up to ``init_time`` (oldest first), channels concatenated: ``(history·C, lat, lon)``."""
    t = pd.Timestamp(init_time)
    out = []
    for k in range(history - 1, -1, -1):
        when = t - pd.Timedelta(hours=k * step_h)
        try:
            out.append(initial_state(analysis, channels, when))
        except ValueError as exc:
            if k == 0:
                raise
            raise MissingInputError(f"the model sees {history} states {step_h} h apart, so init_time {t} needs the "
                                    f"analysis at {when}: {exc}") from None
    return np.concatenate(out)


def _lead_count(meta: Mapping[str, Any], lead_hours: int) -> tuple[int, int]:
    step_h = int(meta["task"]["time_step_hours"])
    if lead_hours < 0 or lead_hours % step_h:
        raise ConfigError(f"lead_hours {lead_hours} is not a non-negative multiple of the model step {step_h} h")
    return step_h, lead_hours // step_h + 1


@torch.no_grad()
def forecast_states(model: Normalized, meta: Mapping[str, Any], analysis: xr.Dataset,
                    init_time: datetime | str | pd.Timestamp, lead_hours: int) -> Iterator[np.ndarray]:
    """Each lead's state ``(channel, lat, lon)`` float32 as it is computed: lead 0 (the analysis), then each step."""
    step_h, leads = _lead_count(meta, lead_hours)
    channels = list(meta["channels"])
    x = torch.from_numpy(initial_stack(analysis, channels, init_time, getattr(model, "history", 1), step_h))[None]
    nlat, nlon = analysis.sizes["latitude"], analysis.sizes["longitude"]
    features = getattr(model, "time_features", [])
    if features:  # the model's clock starts at the initial time and moves on by itself
        x = torch.cat([x, clock_fields([pd.Timestamp(init_time).to_datetime64()], features, nlat, nlon)], dim=1)
    trained = parse_grid_attr(meta["grid"])
    if (nlat, nlon) != trained.shape:
        log.warning("analysis grid %dx%d differs from the training grid %s: running zero-shot", nlat, nlon, meta["grid"])
    if (nlat, nlon) != tuple(model.core.grid_shape):
        model.set_grid(nlat, nlon)
    model.eval()
    x = x.to(next(model.parameters()).device)
    yield model.latest(x)[0].cpu().numpy().astype(np.float32)  # lead 0 is the analysis itself
    for k, state in enumerate(Rollout(model).states(x, leads - 1), start=1):
        out = state[0].cpu().numpy().astype(np.float32)
        if not np.all(np.isfinite(out)):
            raise FloatingPointError(f"forecast from {init_time} became non-finite at lead {k * step_h} h "
                                     f"(of {lead_hours} h)")
        yield out


def rollout(model: Normalized, meta: Mapping[str, Any], analysis: xr.Dataset,
            init_time: datetime | str | pd.Timestamp, lead_hours: int) -> xr.Dataset:
    """Forecast from the analysis at ``init_time`` to ``lead_hours`` as a contract dataset held in memory."""
    step_h, _ = _lead_count(meta, lead_hours)
    data = np.stack(list(forecast_states(model, meta, analysis, init_time, lead_hours)))  # (lead, channel, lat, lon)
    return _to_dataset(data, meta, analysis, pd.Timestamp(init_time), step_h)


def stream_forecast(model: Normalized, meta: Mapping[str, Any], analysis: xr.Dataset,
                    init_time: datetime | str | pd.Timestamp, lead_hours: int, run_dir: Path,
                    on_lead: Callable[[int], None] | None = None,
                    formats: Sequence[str] = ("netcdf", "grib2"),
                    timings: dict[str, float] | None = None) -> xr.Dataset:
    """Roll out into ``run_dir``'s ``forecast.zarr`` lead by lead, then write the files in ``formats`` from it.

    Returns the store opened lazily. ``on_lead(k)`` is called once lead ``k`` is in the store (and
    before lead ``k + 1`` is computed). ``formats`` are those of :func:`core.forecast_files.write_formats`.
    ``timings`` (if given) gains the seconds spent computing (``rollout``) and writing (``write``).
    """
    clock = timings if timings is not None else {}
    step_h, leads = _lead_count(meta, lead_hours)
    channels = list(meta["channels"])
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    zarr_path = run_dir / "forecast.zarr"
    shape = (leads, len(channels), analysis.sizes["latitude"], analysis.sizes["longitude"])
    # Lazy zeros never computed: compute=False writes only the metadata and the coordinates.
    empty = dask.array.zeros(shape, chunks=(1, *shape[1:]), dtype=np.float32)
    template = _to_dataset(empty, meta, analysis, pd.Timestamp(init_time), step_h)
    template.to_zarr(zarr_path, mode="w", zarr_format=3, consolidated=False, encoding=_zarr_encoding(template),
                     compute=False)
    for k, state in enumerate(timed(forecast_states(model, meta, analysis, init_time, lead_hours), clock)):
        started = time.perf_counter()
        arr = xr.DataArray(state[None, None], dims=("init_time", "lead_time", "channel", "latitude", "longitude"),
                           coords={"channel": channels})
        part = from_channels(arr, channels)
        part.drop_vars(list(part.coords)).to_zarr(zarr_path, region={"lead_time": slice(k, k + 1)},
                                                  consolidated=False)
        clock["write"] = clock.get("write", 0.0) + time.perf_counter() - started
        if on_lead is not None:
            on_lead(k)
    started = time.perf_counter()
    forecast = validate_forecast(xr.open_zarr(zarr_path, consolidated=False), what=f"forecast store {zarr_path}")
    write_formats(forecast, run_dir, formats)
    clock["write"] = clock.get("write", 0.0) + time.perf_counter() - started
    return forecast


def timed(states: Iterator[Any], clock: dict[str, float]) -> Iterator[Any]:
    """``states`` unchanged, with the seconds spent producing them added to ``clock["rollout"]``."""
    while True:
        started = time.perf_counter()
        try:
            item = next(states)
        except StopIteration:
            return
        finally:
            clock["rollout"] = clock.get("rollout", 0.0) + time.perf_counter() - started
        yield item


def _to_dataset(data: np.ndarray | dask.array.Array, meta: Mapping[str, Any], analysis: xr.Dataset,
                init: pd.Timestamp, step_h: int) -> xr.Dataset:
    leads = (np.arange(data.shape[0]) * step_h).astype("timedelta64[h]").astype("timedelta64[ns]")
    init_ns = np.asarray([init.to_datetime64()], dtype="datetime64[ns]")
    arr = xr.DataArray(data[None], dims=("init_time", "lead_time", "channel", "latitude", "longitude"),
                       coords={"init_time": init_ns, "lead_time": leads, "channel": list(meta["channels"]),
                               "latitude": analysis["latitude"].values, "longitude": analysis["longitude"].values})
    ds = from_channels(arr, list(meta["channels"]))
    ds = ds.assign_coords(valid_time=(("init_time", "lead_time"), init_ns[:, None] + leads[None, :]))
    for name, attrs in COORD_ATTRS.items():
        if name in ds.coords:
            ds[name].attrs = dict(attrs)
    nlat, nlon = ds.sizes["latitude"], ds.sizes["longitude"]
    grid = analysis.attrs.get("grid") or grid_for_shape(nlat, nlon).describe()
    ds.attrs = {
        "Conventions": "CF-1.8",
        "title": "spherecast SFNO forecast",
        "schema_version": SCHEMA_VERSION,
        "source": "spherecast SFNO",
        "grid": str(grid),
        "init_time": init.isoformat(),
        "time_step_hours": step_h,
        "checkpoint_weights_sha256": str(meta["weights_sha256"]),
        "checkpoint_train_step": int(meta["train_step"]),
        "model_grid": str(meta["grid"]),
        "model_code_version": str(meta["code_version"]),
        "dataset_version": str(meta["dataset_version"]),
        "analysis_dataset_version": str(analysis.attrs.get("dataset_version", "unknown")),
        "code_version": code_version(),
        "history": f"{pd.Timestamp.now(tz='UTC').isoformat()} spherecast models.forecast.rollout",
    }
    return validate_forecast(ds)


def _zarr_encoding(ds: xr.Dataset) -> dict[str, dict[str, Any]]:
    """One chunk per (init, lead): a reader of one lead reads one chunk per variable."""
    return {str(name): {"chunks": tuple(1 if d in ("init_time", "lead_time") else ds.sizes[d] for d in da.dims)}
            for name, da in ds.data_vars.items()}


def write_forecast(ds: xr.Dataset, run_dir: Path, formats: Sequence[str] = ("netcdf", "grib2")) -> list[Path]:
    """Write an in-memory forecast as ``forecast.zarr`` (v3, one chunk per lead) and the files in ``formats``."""
    validate_forecast(ds)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    zarr_path = run_dir / "forecast.zarr"
    ds.to_zarr(zarr_path, mode="w", zarr_format=3, consolidated=False, encoding=_zarr_encoding(ds))
    return [zarr_path, *write_formats(ds, run_dir, formats)]
