"""The NetCDF decoder of CDS deliveries (NetCDF4/HDF5 from the new CDS, and classic files once checked).

New CDS (2024+): dims ``valid_time``, ``pressure_level``, ``latitude``, ``longitude``; scalar
``number``; ``expver`` strings ("0001"/"0005") along ``valid_time``. Legacy CDS (``grib_to_netcdf``):
dims ``time``, ``level`` and, when a request spanned ERA5 and ERA5T, an ``expver`` dimension [1, 5]
whose slices are NaN where that version has no data: per time the non-NaN version is taken and
recorded. Without either, the version was not recorded (``expver`` 0). Opened lazily with netCDF4.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from core.errors import SourceError
from core.schema import EXPVER_UNKNOWN
from core.variables import COORD_RENAMES
from ingest.delivery import expver_code, to_contract

log = logging.getLogger(__name__)


def open_netcdf(path: Path) -> xr.Dataset:
    """A NetCDF delivery, lazily (one dask chunk per time), in the contract."""
    try:
        ds = xr.open_dataset(path, engine="netcdf4", decode_timedelta=False)
    except Exception as exc:  # netCDF4/HDF5 raise OSError, RuntimeError… for damaged files
        raise SourceError(f"NetCDF file {str(path)!r} cannot be opened ({type(exc).__name__}: {exc})") from exc
    ds = ds.rename({k: v for k, v in COORD_RENAMES.items() if k in ds.variables and v not in ds.variables})
    if "time" not in ds.dims:
        if "time" not in ds.coords:
            raise SourceError(f"NetCDF file {str(path)!r} has no time dimension (valid_time or time)")
        ds = ds.expand_dims("time")
    if "number" in ds.dims:
        log.warning("%s: ensemble of %d members; using the first only", path.name, ds.sizes["number"])
        ds = ds.isel(number=0)
    ds = ds.chunk({"time": 1})
    if "expver" in ds.dims:
        ds = _combine_legacy_expver(ds, path)
    elif "expver" in ds.variables:
        values = np.atleast_1d(ds["expver"].values)
        codes = [expver_code(v, path) for v in np.broadcast_to(values, (ds.sizes["time"],))]
        ds = ds.drop_vars("expver").assign(expver=("time", np.array(codes, dtype=np.int8)))
    else:
        ds["expver"] = ("time", np.full(ds.sizes["time"], EXPVER_UNKNOWN, dtype=np.int8))
    return to_contract(ds, path)


def _combine_legacy_expver(ds: xr.Dataset, path: Path) -> xr.Dataset:
    versions = [expver_code(v, path) for v in ds["expver"].values]
    names = [v for v in ds.data_vars if "expver" in ds[v].dims]
    # One grid point per time and version tells which version holds that time's fields.
    probe = ds[names[0]].isel({d: 0 for d in ds[names[0]].dims if d not in ("time", "expver")})
    has = probe.transpose("time", "expver").notnull().values
    empty = np.flatnonzero(~has.any(axis=1))
    if empty.size:
        raise SourceError(f"NetCDF file {str(path)!r}: time {pd.Timestamp(ds['time'].values[empty[0]])} has no "
                          "data under any expver")
    pick = has.argmax(axis=1)
    out = ds.drop_vars("expver").isel(expver=0)
    for name in names:
        for k in range(1, ds.sizes["expver"]):
            out[name] = ds[name].isel(expver=k).where(xr.DataArray(pick == k, dims="time"), out[name])
    out["expver"] = ("time", np.array([versions[i] for i in pick], dtype=np.int8))
    return out
