"""What every decoder of a CDS delivery shares: the delivery summary, expver codes, the contract and merging.

Each format's decoder (:mod:`ingest.decode_grib`, :mod:`ingest.decode_netcdf`,
:mod:`ingest.decode_netcdf3`, :mod:`ingest.decode_zip`) turns its file into a dataset and hands it to
:func:`to_contract`; :mod:`ingest.delivered` picks the decoder by the file's first bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from core.errors import SourceError
from core.schema import EXPVER_FINAL, EXPVER_PRELIMINARY, EXPVER_UNKNOWN
from core.variables import COORD_RENAMES, SHORT_NAMES, VARIABLES

log = logging.getLogger(__name__)

RANK = {EXPVER_FINAL: 0, EXPVER_PRELIMINARY: 1, EXPVER_UNKNOWN: 2}
"""Which version wins where two deliveries hold the same field: final ERA5, then ERA5T, then unknown."""


@dataclass
class Delivery:
    """What one delivery holds, read from its coordinates and headers only."""

    path: Path
    latitude: np.ndarray
    longitude: np.ndarray
    expver: dict[np.datetime64, int] = field(default_factory=dict)
    fields: dict[tuple[str, int | None], set[np.datetime64]] = field(default_factory=dict)


def combine_expver(codes: Sequence[int]) -> int:
    """One version for a time from several fields: agreeing codes, else preliminary if any, else unknown."""
    distinct = {int(c) for c in codes}
    if len(distinct) == 1:
        return distinct.pop()
    return EXPVER_PRELIMINARY if EXPVER_PRELIMINARY in distinct else EXPVER_UNKNOWN


def expver_code(value: object, path: Path) -> int:
    """The expver code (1 final, 5 preliminary, 0 unknown) of a key or coordinate value."""
    try:
        code = int(str(value.decode() if isinstance(value, bytes) else value).strip())
    except ValueError:
        raise SourceError(f"delivered file {str(path)!r}: expver {value!r} is not a number") from None
    return code if code in RANK else EXPVER_UNKNOWN


def units_match(have: str, want: str) -> bool:
    """Whether two ECMWF-style unit strings agree, ignoring ``**``/``^`` and spacing."""

    def norm(u: str) -> str:
        return " ".join(u.replace("**", "").replace("^", "").split())
    return norm(have) == norm(want)


def to_contract(ds: xr.Dataset, path: Path) -> xr.Dataset:
    """A decoded delivery in the contract's names, units, dims, order and dtypes; ``SourceError`` naming the file."""
    ds = ds.rename({k: v for k, v in COORD_RENAMES.items() if k in ds.variables and v not in ds.variables})
    for dim in ("latitude", "longitude"):
        if dim not in ds.dims:
            raise SourceError(f"delivered file {str(path)!r} has no {dim} dimension")
    lon = np.mod(ds["longitude"].values.astype(float), 360.0)
    if np.unique(lon).size != lon.size:
        raise SourceError(f"delivered file {str(path)!r} repeats longitudes (e.g. both -180 and 180)")
    ds = ds.assign_coords(longitude=lon, latitude=ds["latitude"].values.astype(float))
    if np.any(np.diff(lon) <= 0):
        ds = ds.isel(longitude=np.argsort(lon, kind="stable"))
    if np.any(np.diff(ds["latitude"].values) >= 0):
        ds = ds.isel(latitude=np.argsort(-ds["latitude"].values, kind="stable"))
    if "level" in ds.coords:
        scale = 100.0 if ds["level"].attrs.get("units") == "Pa" else 1.0
        hpa = np.atleast_1d(ds["level"].values).astype(float) / scale
        if not np.allclose(hpa, np.round(hpa)):
            raise SourceError(f"delivered file {str(path)!r}: pressure levels {hpa.tolist()} are not whole hPa")
        ds = ds.assign_coords(level=(ds["level"].dims, hpa.astype(np.int32).reshape(ds["level"].shape)))
    out, skipped = {}, []
    for name in [v for v in ds.data_vars if v != "expver"]:
        long = SHORT_NAMES.get(str(name)) or (str(name) if name in VARIABLES else None)
        if long is None:
            skipped.append(str(name))
            continue
        var, da = VARIABLES[long], ds[name]
        units = da.attrs.get("units")
        if units is not None and not units_match(str(units), var.units):
            raise SourceError(f"delivered file {str(path)!r}: variable {name!r} ({long}) has units {units!r}, "
                              f"expected {var.units!r}")
        dims: tuple[str, ...] = ("time", "latitude", "longitude")
        if var.level_type == "pressure":
            if "level" not in da.dims:
                if "level" not in da.coords:
                    raise SourceError(f"delivered file {str(path)!r}: {name!r} ({long}) has no pressure level")
                da = da.expand_dims("level")
            dims = ("time", "level", "latitude", "longitude")
        extra = sorted(set(map(str, da.dims)) - set(dims))
        if extra:
            raise SourceError(f"delivered file {str(path)!r}: variable {name!r} has unexpected dimensions {extra}")
        da = da.transpose(*dims).reset_coords(drop=True).astype(np.float32)
        da.attrs = {"units": var.units, "long_name": var.long_name}
        out[long] = da
    if not out:
        raise SourceError(f"delivered file {str(path)!r} holds no variable spherecast knows "
                          f"(found {sorted(map(str, ds.data_vars))})")
    if skipped:
        log.info("%s: ignoring variables outside the vocabulary: %s", path.name, skipped)
    res = xr.Dataset(out)
    res["expver"] = ds["expver"].reset_coords(drop=True).astype(np.int8)
    times = res["time"].values
    if np.unique(times).size != times.size:
        raise SourceError(f"delivered file {str(path)!r} holds time {pd.Timestamp(times[0])} more than once")
    res = res.assign_coords(time=times.astype("datetime64[ns]")).sortby("time")
    res.attrs = {"delivered_file": str(path)}
    return res


def grid_text(ds: xr.Dataset) -> str:
    """The grid of a dataset in words, for errors."""
    lat, lon = ds["latitude"].values, ds["longitude"].values
    return f"{lat.size}x{lon.size}, latitude {lat[0]:g}…{lat[-1]:g}, longitude {lon[0]:g}…{lon[-1]:g}"


def merge(pieces: list[tuple[str, xr.Dataset]]) -> xr.Dataset:
    """Named deliveries on one grid merged: per field and time final ERA5 over ERA5T over unknown, then order."""
    first_name, first = pieces[0]
    for name, ds in pieces[1:]:
        same = (ds.sizes["latitude"] == first.sizes["latitude"] and ds.sizes["longitude"] == first.sizes["longitude"]
                and np.allclose(ds["latitude"], first["latitude"]) and np.allclose(ds["longitude"], first["longitude"]))
        if not same:
            raise SourceError(f"{first_name!r} and {name!r} are on different grids "
                              f"({grid_text(first)} vs {grid_text(ds)})")
    parts = []
    for order, (_, ds) in enumerate(pieces):
        codes = ds["expver"].values
        for code in np.unique(codes):
            parts.append((RANK[int(code)], order, int(code), ds.isel(time=np.flatnonzero(codes == code))))
    parts.sort(key=lambda p: p[:2])
    data: dict[str, xr.DataArray] = {}
    provenance: dict[str, xr.DataArray] = {}
    for _, _, code, part in parts:
        for name in [v for v in part.data_vars if v != "expver"]:
            mark = xr.DataArray(np.full(part.sizes["time"], float(code)), dims="time", coords={"time": part["time"]})
            if name in data:  # earlier (better-ranked) parts keep their values where both have some
                data[name] = data[name].combine_first(part[name])
                provenance[name] = provenance[name].combine_first(mark)
            else:
                data[name], provenance[name] = part[name], mark
    out = xr.Dataset(data)
    marks = np.stack([provenance[n].reindex(time=out["time"]).values for n in data])
    out["expver"] = ("time", np.array([combine_expver(col[~np.isnan(col)].astype(int)) for col in marks.T],
                                      dtype=np.int8))
    for name in data:
        out[name].attrs = {"units": VARIABLES[name].units, "long_name": VARIABLES[name].long_name}
    out.attrs = {"delivered_files": [n for n, _ in pieces]}
    return out


