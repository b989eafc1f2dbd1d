"""Decode ERA5 files exactly as the Copernicus CDS delivers them, into the analysis contract's names.

:func:`open_delivered` returns one delivery on its *native* grid: dims ``time``, ``level`` (int32
hPa, pressure variables only), ``latitude`` (90 → −90), ``longitude`` ([0, 360) ascending); ERA5
long names, float32, vocabulary ``units``/``long_name``; ``expver(time)`` int8 (1 final ERA5,
5 preliminary ERA5T, 0 unknown). Values stay lazy (dask, one chunk per time).

The format is sniffed from the first bytes, never the extension, and each has its decoder module (as
xarray keeps one backend per format):

GRIB (``GRIB``, :mod:`ingest.decode_grib`)
    Checked message by message with ecCodes (a truncated, corrupt or padded file is rejected;
    cfgrib alone would skip bad messages silently), then decoded with cfgrib (``indexpath=""``,
    so nothing is written beside read-only files) one (typeOfLevel, stepType) group at a time, so
    single- and pressure-level messages may share a file. ``expver`` comes from each message's
    ``expver`` key (cfgrib's ``read_keys`` reports only the first message's). Accumulations
    (``tp``: forecast base time × step) are mapped to their validity times. Ensemble files
    (``number`` > 0, e.g. the ERA5 EDA) are reduced to their first member (``number`` 0) with a
    warning: the contract has no member dimension.
NetCDF4/HDF5 (``\\x89HDF``, :mod:`ingest.decode_netcdf`) — the new CDS (2024+)
    dims ``valid_time``, ``pressure_level``, ``latitude``, ``longitude``; scalar ``number``;
    ``expver`` strings ("0001"/"0005") along ``valid_time``.
Classic NetCDF (``CDF``, :mod:`ingest.decode_netcdf3`) — the legacy CDS (pre-2024, ``grib_to_netcdf``)
    dims ``time``, ``level`` and, when a request spanned ERA5 and ERA5T, an ``expver`` dimension
    [1, 5] whose slices are NaN where that version has no data: per time the non-NaN version is
    taken and recorded. Without that dimension the version was not recorded (``expver`` 0). The
    header is parsed to check the file is as long as it says (netCDF-C reads a truncated classic
    file as fill values without complaint).
Zip (``PK``, :mod:`ingest.decode_zip`)
    The new CDS zips the parts of a request that mixes instantaneous and accumulated variables
    (``data_stream-oper_stepType-instant.nc`` + ``…-accum.nc``); members are merged.

:func:`decode_many` merges several deliveries; where two cover the same variable and time, final
ERA5 wins over ERA5T, which wins over unknown (then the earlier path). Every bad input raises one
``ValueError`` naming the file.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import xarray as xr

from core.errors import SourceError
from ingest.decode_grib import describe_grib, open_grib
from ingest.decode_netcdf import open_netcdf
from ingest.decode_netcdf3 import open_netcdf3
from ingest.decode_zip import open_zip
from ingest.delivery import Delivery, combine_expver, merge, units_match

__all__ = ["Delivery", "combine_expver", "decode_many", "describe_delivered", "open_delivered", "sniff_format",
           "units_match"]

MAGICS = {b"GRIB": "grib", b"\x89HDF": "netcdf4", b"CDF": "netcdf3", b"PK\x03\x04": "zip"}


def sniff_format(path: Path) -> str:
    """``grib``, ``netcdf4``, ``netcdf3`` or ``zip`` from the file's first bytes, else ``ValueError``."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise SourceError(f"cannot read delivered file {str(path)!r}: {exc}") from exc
    for magic, kind in MAGICS.items():
        if head.startswith(magic):
            return kind
    what = "is empty" if not head else f"starts with {head[:4]!r}"
    raise SourceError(f"delivered file {str(path)!r} {what}: not GRIB, NetCDF or a CDS zip")


@functools.lru_cache(maxsize=16)
def _open_cached(name: str, size: int, mtime_ns: int) -> xr.Dataset:
    # Keyed by size and mtime so a rewritten file is decoded afresh; failures are not cached.
    path = Path(name)
    match sniff_format(path):
        case "grib":
            return open_grib(path)
        case "zip":
            return open_zip(path, open_delivered)
        case "netcdf3":
            return open_netcdf3(path)
        case _:
            return open_netcdf(path)


def open_delivered(path: Path) -> xr.Dataset:
    """Open one CDS delivery (GRIB, NetCDF4, legacy NetCDF or zip) lazily in contract names on its native grid."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise SourceError(f"cannot read delivered file {str(path)!r}: {exc}") from exc
    # Re-decoding a GRIB means rescanning every message; slabs of one file are fetched many times.
    return _open_cached(str(path), stat.st_size, stat.st_mtime_ns).copy(deep=False)


def describe_delivered(path: Path) -> Delivery:
    """What a delivery holds (grid, variables × levels × times, expver), cheaply: headers for GRIB."""
    path = Path(path)
    if sniff_format(path) == "grib":
        return describe_grib(path)
    ds = open_delivered(path)
    times = ds["time"].values
    info = Delivery(path, ds["latitude"].values, ds["longitude"].values,
                    expver={t: int(c) for t, c in zip(times, ds["expver"].values, strict=True)})
    for name in [v for v in ds.data_vars if v != "expver"]:
        levels = [int(lv) for lv in ds["level"].values] if "level" in ds[name].dims else [None]
        for level in levels:
            info.fields[(str(name), level)] = set(times)
    return info


def decode_many(paths: Sequence[Path], *, variables: Sequence[str] | None = None) -> xr.Dataset:
    """Open several deliveries and merge them into one dataset (optionally only ``variables``)."""
    if not paths:
        raise ValueError("decode_many needs at least one file")
    pieces = []
    for path in paths:
        ds = open_delivered(Path(path))
        if variables is not None:
            keep = [v for v in variables if v in ds.data_vars]
            if not keep:
                continue
            ds = ds[keep + ["expver"]]
        pieces.append((str(path), ds))
    if not pieces:
        raise SourceError(f"none of {len(paths)} files holds any of {list(variables or [])}")
    if len(pieces) == 1:
        return pieces[0][1]
    return merge(pieces)
