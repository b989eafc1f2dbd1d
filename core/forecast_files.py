"""A forecast run's download files: CF-1.8 NetCDF and GRIB2, each written from a (possibly lazy) forecast.

Both writers read the forecast one lead at a time (one Zarr chunk per variable and lead), so a lazily
opened ``forecast.zarr`` of any length is written with host memory holding about one lead. Each file is
written under a temporary name and renamed into place, so a failed write never leaves a partial file
under the final name nor replaces a good one.

NetCDF (``forecast.nc``) conventions: the contract's dims and names (it reopens as a valid forecast:
``init_time, lead_time, [level,] latitude, longitude``, which CF's T, Z, Y, X order check warns about
since ``lead_time`` is no time axis); times as int32 ``hours since 1970-01-01``; ``lead_time`` as int32
hours (``forecast_period``, read back as timedelta with ``decode_timedelta=True``); no ``_FillValue`` on
coordinates; ``standard_name`` on every data variable from ``core.variables``.

GRIB2 (``forecast.grib2``) conventions: one message per (lead, member, variable, level); ``paramId``
from ``core.variables``; pressure channels on ``isobaricInhPa`` levels, single-level ones on the
surface ecCodes defines for their paramId (2t at 2 m, 10u/10v at 10 m, msl at mean sea level, sp and tp
at the surface); ``dataDate``/``dataTime`` = init time, ``step`` = lead in hours; accumulations (tp)
span the ``accumulation_hours`` before the valid time (product template 8, 11 for members); members as
ensemble messages (product template 1, ``perturbationNumber``, ``numberOfForecastsInEnsemble``);
a regular_ll grid 90 → −90, 0 → 360−Δ; CCSDS packing at 16 bits, so a value read back is within
``(max − min) / (2**16 − 1)`` of its field's range of the value written.

Regional files (``region=True``, what download-time subsetting writes): the same conventions on a
lat/lon box cut from the contract grid. Latitudes still run north → south and longitudes west → east
at the grid's steps; longitudes may pass 360 (a box across 0° continues 350 … 370). The GRIB2 grid
is then the box's first/last latitude and longitude; a box across 180° (170 … 190) is written as
such. A box across 0° is refused for GRIB2: the format holds longitudes 0 … 360 only, so it would
be stored wrapped (first 350, last 10), which ecCodes ≥ 2.27 and cfgrib read back with the columns
sorted into the wrong places (ecmwf/ecmwflibs#10).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from core.errors import ConfigError, DataContractError
from core.schema import validate_forecast
from core.variables import VARIABLES

log = logging.getLogger(__name__)

FILE_NAMES = {"netcdf": "forecast.nc", "grib2": "forecast.grib2"}
GRIB_BITS_PER_VALUE = 16
"""Bits per packed GRIB2 value: the error bound is the field's range / (2**bits − 1)."""
_TIME_UNITS = "hours since 1970-01-01 00:00:00"


def write_formats(ds: xr.Dataset, run_dir: Path, formats: Sequence[str]) -> list[Path]:
    """Write ``ds`` into ``run_dir`` in each of ``formats`` (``netcdf``, ``grib2``); the paths written."""
    unknown = [f for f in formats if f not in FILE_NAMES]
    if unknown:
        raise ConfigError(f"unknown forecast file format(s) {unknown}; known: {', '.join(FILE_NAMES)}")
    writers = {"netcdf": write_netcdf, "grib2": write_grib2}
    out = []
    for fmt in dict.fromkeys(formats):  # once each, in the order asked
        path = Path(run_dir) / FILE_NAMES[fmt]
        writers[fmt](ds, path)
        out.append(path)
    return out


def write_netcdf(ds: xr.Dataset, path: Path, *, region: bool = False) -> Path:
    """Write ``ds`` as CF-1.8 NetCDF-4 at ``path`` (zlib, one chunk per lead), copied lead by lead if lazy."""
    _validate(ds, region)
    _check_whole_hours(ds)
    ds = ds.copy()
    for var in ds.variables.values():
        var.encoding = {}  # the store's Zarr encodings (compressors, chunk grid) mean nothing to netCDF4
    for var in ds.variables.values():
        if var.attrs.get("axis") not in (None, "X", "Y", "Z", "T"):  # CF-1.8 knows no other axis (e.g. "E")
            var.attrs = {k: v for k, v in var.attrs.items() if k != "axis"}
    for name in ds.data_vars:
        if name in VARIABLES and VARIABLES[name].standard_name:
            ds[name].attrs["standard_name"] = VARIABLES[name].standard_name
    # Lead as plain int32 hours: encoded by xarray, a timedelta would carry a non-CF ``dtype`` attribute.
    hours = (ds["lead_time"].values // np.timedelta64(1, "h")).astype(np.int32)
    attrs = {k: v for k, v in ds["lead_time"].attrs.items() if k != "dtype"}
    ds = ds.assign_coords(lead_time=("lead_time", hours, {**attrs, "units": "hours"}))
    enc: dict[str, dict[str, Any]] = {
        str(n): {"zlib": True, "complevel": 4,
                 "chunksizes": tuple(1 if d in ("member", "init_time", "lead_time") else ds.sizes[d]
                                     for d in ds[n].dims)}
        for n in ds.data_vars}
    # int32 hours: CF-1.8 has no int64 (NetCDF classic types), and every forecast time is a whole hour.
    enc["init_time"] = {"units": _TIME_UNITS, "calendar": "proleptic_gregorian", "dtype": "int32", "_FillValue": None}
    enc["valid_time"] = dict(enc["init_time"])
    for name in ds.coords:
        enc.setdefault(str(name), {})["_FillValue"] = None  # CF: coordinates hold no missing values
    tmp = _tmp_path(path)
    # Each chunk is written once and never read back: without this, HDF5 keeps up to 64 MiB of chunks per
    # variable (~1 GB for a 0.25° run), so memory would grow with the leads instead of staying flat.
    import netCDF4

    cache = netCDF4.get_chunk_cache()
    netCDF4.set_chunk_cache(0, cache[1], cache[2])
    try:
        ds.to_netcdf(tmp, engine="netcdf4", encoding=enc)
        os.replace(tmp, path)
    finally:
        netCDF4.set_chunk_cache(*cache)
        tmp.unlink(missing_ok=True)
    return path


def write_grib2(ds: xr.Dataset, path: Path, *, region: bool = False) -> Path:
    """Write ``ds`` as GRIB2 at ``path`` with ecCodes, one message per lead, member, variable and level."""
    import eccodes

    _validate(ds, region)
    check_grib_grid(ds)
    _check_whole_hours(ds)
    names = [n for n in VARIABLES if n in ds.data_vars]  # vocabulary order: the same file however ds was opened
    missing = [n for n in names if not VARIABLES[n].param_id]
    if missing:
        raise ConfigError(f"variables {missing} have no GRIB paramId in core.variables")
    members = [int(m) for m in ds["member"].values] if "member" in ds.dims else None
    if members is not None and (min(members) < 0 or max(members) > 255):
        raise ConfigError(f"GRIB2 perturbationNumber is one byte: members {members} do not fit 0..255")
    base = eccodes.codes_grib_new_from_samples("GRIB2")
    tmp = _tmp_path(path)
    try:
        _set_grid(base, ds)
        init = pd.Timestamp(ds["init_time"].values[0])
        eccodes.codes_set(base, "dataDate", int(init.strftime("%Y%m%d")))
        eccodes.codes_set(base, "dataTime", int(init.strftime("%H%M")))
        eccodes.codes_set(base, "stepUnits", "h")
        leads = (ds["lead_time"].values // np.timedelta64(1, "h")).astype(int)
        with open(tmp, "wb") as out:
            for k, lead in enumerate(leads):
                for m, number in enumerate(members if members is not None else [None]):
                    for name in names:
                        var = VARIABLES[name]
                        da = ds[name].isel(init_time=0, lead_time=k)
                        if number is not None:
                            da = da.isel(member=m)
                        # One variable at one lead: a single Zarr chunk, read and released per message.
                        values = da.transpose(..., "latitude", "longitude").values
                        for level, field in _levels(da, values):
                            _write_message(out, base, var.param_id, level, int(lead), var.accumulation_hours,
                                           number, len(members or []), field)
        os.replace(tmp, path)
    finally:
        eccodes.codes_release(base)
        tmp.unlink(missing_ok=True)
    return path


def _levels(da: xr.DataArray, values: np.ndarray) -> Iterator[tuple[int | None, np.ndarray]]:
    if "level" not in da.dims:
        yield None, values
        return
    for i, level in enumerate(da["level"].values):
        yield int(level), values[i]


def check_grib_grid(ds: xr.Dataset) -> None:
    """Raise ``ValueError`` naming the problem if GRIB2 cannot hold the lat/lon grid of ``ds`` exactly."""
    lat, lon = ds["latitude"].values, ds["longitude"].values
    dlat, dlon = _step(ds, "latitude"), _step(ds, "longitude")
    for what, step in (("latitude", dlat), ("longitude", dlon)):
        # GRIB2 stores angles in micro-degrees: a step it cannot hold would misplace every point.
        if abs(step * 1e6 - round(step * 1e6)) > 1e-6:
            raise ConfigError(f"GRIB2 cannot hold a {what} step of {step!r}° (it stores micro-degrees); "
                              f"grid {lat.size}x{lon.size} needs NetCDF")
    if lon[0] < 0 or lon[-1] >= 360:
        raise ConfigError(f"GRIB2 cannot hold longitudes {lon[0]:g} … {lon[-1]:g} readably: its longitudes run "
                          "0 … 360, and a grid crossing 0° is read back misordered by ecCodes and cfgrib")


def _step(ds: xr.Dataset, dim: str) -> float:
    # From the coordinate (both ends over the count, so rounding does not accumulate); a single row or
    # column keeps the step of the grid it was cut from, which subsetting records as an ACDD attribute.
    values = np.asarray(ds[dim].values, dtype=float)
    if values.size >= 2:
        return abs(float(values[-1] - values[0])) / (values.size - 1)
    return float(ds.attrs.get(f"geospatial_{dim[:3]}_resolution", 1.0))


def _set_grid(handle: Any, ds: xr.Dataset) -> None:
    import eccodes

    lat, lon = ds["latitude"].values, ds["longitude"].values
    for key, value in (("Ni", lon.size), ("Nj", lat.size),
                       ("latitudeOfFirstGridPointInDegrees", float(lat[0])),
                       ("longitudeOfFirstGridPointInDegrees", float(lon[0])),
                       ("latitudeOfLastGridPointInDegrees", float(lat[-1])),
                       ("longitudeOfLastGridPointInDegrees", float(lon[-1])),
                       ("iDirectionIncrementInDegrees", _step(ds, "longitude")),
                       ("jDirectionIncrementInDegrees", _step(ds, "latitude")),
                       ("iScansNegatively", 0), ("jScansPositively", 0)):
        eccodes.codes_set(handle, key, value)


def _write_message(out: Any, base: Any, param_id: int, level: int | None, lead: int, accumulation: int,
                   number: int | None, n_members: int, field: np.ndarray) -> None:
    import eccodes

    if not np.all(np.isfinite(field)):
        raise DataContractError(f"paramId {param_id} level {level} at lead {lead} h has non-finite values; "
                                "GRIB2 is written from complete forecasts only")
    handle = eccodes.codes_clone(base)
    try:
        # The product template comes first: setting paramId picks the surface and statistics it implies.
        template = (11 if accumulation else 1) if number is not None else (8 if accumulation else 0)
        eccodes.codes_set(handle, "productDefinitionTemplateNumber", template)
        eccodes.codes_set(handle, "paramId", param_id)
        if level is not None:
            eccodes.codes_set(handle, "typeOfLevel", "isobaricInhPa")
            eccodes.codes_set(handle, "level", level)
        if number is not None:
            eccodes.codes_set(handle, "typeOfEnsembleForecast", 0 if number == 0 else 3)  # control, perturbed
            eccodes.codes_set(handle, "perturbationNumber", number)
            eccodes.codes_set(handle, "numberOfForecastsInEnsemble", n_members)
        if accumulation:
            eccodes.codes_set(handle, "stepRange", f"{max(lead - accumulation, 0)}-{lead}")
        else:
            eccodes.codes_set(handle, "step", lead)
        eccodes.codes_set(handle, "packingType", "grid_ccsds")
        eccodes.codes_set(handle, "bitsPerValue", GRIB_BITS_PER_VALUE)
        eccodes.codes_set_values(handle, np.ascontiguousarray(field, dtype=np.float64).ravel())
        eccodes.codes_write(handle, out)
    finally:
        eccodes.codes_release(handle)


def _validate(ds: xr.Dataset, region: bool) -> None:
    if not region:
        validate_forecast(ds)
        return
    validate_region(ds)


def validate_region(ds: xr.Dataset, what: str = "forecast subset") -> xr.Dataset:
    """Check a forecast cut to a lat/lon box: the contract, except the grid is any regular box of it."""
    lat = np.asarray(ds["latitude"].values, dtype=float) if "latitude" in ds.coords else np.empty(0)
    lon = np.asarray(ds["longitude"].values, dtype=float) if "longitude" in ds.coords else np.empty(0)
    if lat.size == 0 or lon.size == 0:
        raise DataContractError(f"{what}: needs at least one latitude and one longitude")
    if np.any(np.abs(lat) > 90) or not _regular(lat, decreasing=True):
        raise DataContractError(f"{what}: latitude must run north to south in equal steps within ±90")
    if not _regular(lon, decreasing=False):
        raise DataContractError(f"{what}: longitude must run west to east in equal steps")
    # The rest of the contract (dims, times, names, units) is the global one's: check it on a global stand-in.
    stand_in = ds.isel(latitude=[0] * 3, longitude=[0] * 4).assign_coords(
        latitude=[90.0, 0.0, -90.0], longitude=[0.0, 90.0, 180.0, 270.0])
    stand_in.attrs = {k: v for k, v in ds.attrs.items() if k != "grid"}
    validate_forecast(stand_in, what)
    return ds


def _regular(values: np.ndarray, decreasing: bool) -> bool:
    steps = np.diff(values)
    if steps.size == 0:
        return True
    return bool(np.all(steps < 0) if decreasing else np.all(steps > 0)) and bool(np.allclose(steps, steps[0]))


def _check_whole_hours(ds: xr.Dataset) -> None:
    hour = np.timedelta64(1, "h")
    init = ds["init_time"].values.astype("datetime64[ns]")
    if np.any(ds["lead_time"].values % hour) or np.any((init - init.astype("datetime64[h]")) % hour):
        raise ConfigError("forecast files encode times in whole hours; init_time "
                          f"{pd.Timestamp(init[0])} or a lead_time is not a whole hour")


def _tmp_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")
