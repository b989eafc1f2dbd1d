"""The subset's formats, each produced as a stream of byte blocks from a lazy selection.

- ``nc`` and ``grib2``: :mod:`core.forecast_files`' writers (``region=True``) into a private
  temporary directory, then streamed in large blocks; the directory is removed however the stream
  ends (finished, failed, or the client gone).
- ``zarr.zip``: a Zarr v3 store of the subset written in that directory, packed into a zip archive
  (stored, not deflated: the chunks are compressed already), then streamed.
- ``csv``: rows generated lead by lead (and member by member), so memory holds one lead.

Every writer reads the selection lead by lead, so the chunks of leads, variables and levels not
asked for are never read.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from core.forecast_files import write_grib2, write_netcdf

log = logging.getLogger(__name__)

SCRATCH_DIR: Path | None = None
"""Where temporary subset files are written (``None``: the system's temporary directory)."""
MIN_BLOCK = 1 << 20
"""Smallest block a temporary file is streamed in."""


def stream(sub: xr.Dataset, fmt: str, block_size: int) -> Iterator[bytes]:
    """Blocks of ``sub`` in format ``fmt`` (``nc``, ``grib2``, ``csv``, ``zarr.zip``)."""
    if fmt == "csv":
        yield from csv_blocks(sub)
        return
    scratch = Path(tempfile.mkdtemp(prefix="spherecast-subset-", dir=SCRATCH_DIR))
    try:
        path = write_file(sub, fmt, scratch)
        with open(path, "rb") as fh:
            while block := fh.read(max(block_size, MIN_BLOCK)):
                yield block
    finally:
        # Also runs when the client disconnects: the response closes this generator (GeneratorExit).
        shutil.rmtree(scratch, ignore_errors=True)


def write_file(sub: xr.Dataset, fmt: str, directory: Path) -> Path:
    """Write ``sub`` as one file of format ``fmt`` (not ``csv``) in ``directory``; its path."""
    match fmt:
        case "nc":
            return write_netcdf(sub, directory / "subset.nc", region=True)
        case "grib2":
            return write_grib2(sub, directory / "subset.grib2", region=True)
        case "zarr.zip":
            return write_zarr_zip(sub, directory / "subset.zarr.zip")
    raise ValueError(f"format {fmt!r} is not written to a file")


def write_zarr_zip(sub: xr.Dataset, path: Path) -> Path:
    """Write ``sub`` as a Zarr v3 store (one chunk per lead, member and variable) zipped at ``path``."""
    store = path.with_suffix("")  # subset.zarr beside the archive
    ds = sub.copy()
    for var in ds.variables.values():
        var.encoding = {}  # the run's chunk grid does not fit the cut
    per_lead = {d: 1 for d in ("init_time", "lead_time", "member") if d in ds.dims}
    ds = ds.chunk({**per_lead, **{d: -1 for d in ds.dims if d not in per_lead}})
    ds.to_zarr(store, zarr_format=3, consolidated=False, mode="w-")
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for file in sorted(p for p in store.rglob("*") if p.is_file()):
            zf.write(file, file.relative_to(store).as_posix())
    shutil.rmtree(store)
    return path


def csv_columns(sub: xr.Dataset) -> list[tuple[str, str, int | None]]:
    """The value columns: (header, variable, level index or None), ``<variable>_<level>`` for pressure ones."""
    out: list[tuple[str, str, int | None]] = []
    for name in sub.data_vars:
        if "level" in sub[name].dims:
            out.extend((f"{name}_{int(lv)}", str(name), i) for i, lv in enumerate(sub["level"].values))
        else:
            out.append((str(name), str(name), None))
    return out


def csv_blocks(sub: xr.Dataset) -> Iterator[bytes]:
    """CSV text of ``sub``: the header once, then one block of rows per lead (and member)."""
    columns = csv_columns(sub)
    members = [int(m) for m in sub["member"].values] if "member" in sub.dims else [None]
    head = ["init_time", "valid_time", "lead_hours"] + (["member"] if members != [None] else [])
    header = ",".join(head + ["latitude", "longitude"] + [c[0] for c in columns]) + "\n"
    lat, lon = sub["latitude"].values, sub["longitude"].values
    lat_text = np.repeat(_floats(lat), lon.size)
    lon_text = np.tile(_floats(lon), lat.size)
    init = _iso(sub["init_time"].values[0])
    pending = header
    for k in range(sub.sizes["lead_time"]):
        lead = sub["lead_time"].values[k]
        valid = _iso(sub["valid_time"].values[0, k])
        hours = str(int(lead // np.timedelta64(1, "h")))
        for m, member in enumerate(members):
            frame = {"init_time": init, "valid_time": valid, "lead_hours": hours}
            if member is not None:
                frame["member"] = str(member)
            frame.update(latitude=lat_text, longitude=lon_text)
            fields = {}
            for name in dict.fromkeys(c[1] for c in columns):
                da = sub[name].isel(init_time=0, lead_time=k)
                if member is not None:
                    da = da.isel(member=m)
                fields[name] = da.transpose(..., "latitude", "longitude").values  # one lead: read and released
            for header_name, name, level in columns:
                values = fields[name] if level is None else fields[name][level]
                frame[header_name] = _floats(values.astype(np.float32).ravel())
            text = pd.DataFrame(frame).to_csv(header=False, index=False, lineterminator="\n")
            yield (pending + text).encode()
            pending = ""
    if pending:  # no rows at all: still a header
        yield pending.encode()


def _floats(values: np.ndarray) -> np.ndarray:
    # numpy's str of a float32 is the shortest text that reads back as the same float32.
    return np.asarray(values).astype(str)


def _iso(t: np.datetime64) -> str:
    return pd.Timestamp(t).strftime("%Y-%m-%dT%H:%M:%SZ")

