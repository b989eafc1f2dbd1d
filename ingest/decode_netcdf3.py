"""The classic NetCDF decoder of CDS deliveries (the legacy CDS, pre-2024, ``grib_to_netcdf``).

netCDF-C reads a truncated classic file as fill values without complaint, so a classic file is first
mapped with SciPy's reader, which lays every variable (record variables included) over the file's
bytes where its header says they are: a file shorter than its header needs cannot be mapped. Only
then is it decoded as any NetCDF delivery (:mod:`ingest.decode_netcdf`). CDF-5 (64-bit data), which
SciPy cannot read and the CDS never delivered, is refused with that reason.
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import xarray as xr
from scipy.io import netcdf_file

from core.errors import SourceError
from ingest.decode_netcdf import open_netcdf

_CDF5 = 5


def check_extent(path: Path) -> None:
    """``SourceError`` unless the file holds every byte its classic header promises."""
    with open(path, "rb") as f:
        head = f.read(4)
    if len(head) == 4 and head[3] == _CDF5:
        raise SourceError(f"NetCDF file {str(path)!r} is CDF-5 (64-bit data), which the CDS does not deliver and "
                          "spherecast cannot check for truncation; convert it to NetCDF4 (nccopy -k nc4)")
    try:
        with warnings.catch_warnings():
            # SciPy warns when closing a map its variables still view; they are dropped with it.
            warnings.simplefilter("ignore", RuntimeWarning)
            with netcdf_file(path, mode="r", mmap=True) as nc:
                nc.variables.clear()
    except (ValueError, TypeError, IndexError, OverflowError, MemoryError, struct.error) as exc:
        raise SourceError(f"NetCDF file {str(path)!r} is truncated or has a corrupt header: it holds "
                          f"{path.stat().st_size} bytes, which do not cover what its header describes "
                          f"({type(exc).__name__}: {exc})") from exc


def open_netcdf3(path: Path) -> xr.Dataset:
    """A classic NetCDF delivery, checked for truncation, lazily in the contract."""
    check_extent(path)
    return open_netcdf(path)
