"""Decode ERA5 files exactly as the Copernicus CDS delivers them, into the analysis contract's names.

:func:`open_delivered` returns one delivery on its *native* grid: dims ``time``, ``level`` (int32
hPa, pressure variables only), ``latitude`` (90 → −90), ``longitude`` ([0, 360) ascending); ERA5
long names, float32, vocabulary ``units``/``long_name``; ``expver(time)`` int8 (1 final ERA5,
5 preliminary ERA5T, 0 unknown). Values stay lazy (dask, one chunk per time).

The format is sniffed from the first bytes, never the extension:

GRIB (``GRIB``)
    Checked message by message with ecCodes (a truncated, corrupt or padded file is rejected;
    cfgrib alone would skip bad messages silently), then decoded with cfgrib (``indexpath=""``,
    so nothing is written beside read-only files) one (typeOfLevel, stepType) group at a time, so
    single- and pressure-level messages may share a file. ``expver`` comes from each message's
    ``expver`` key (cfgrib's ``read_keys`` reports only the first message's). Accumulations
    (``tp``: forecast base time × step) are mapped to their validity times. Ensemble files
    (``number`` > 0, e.g. the ERA5 EDA) are reduced to their first member (``number`` 0) with a
    warning: the contract has no member dimension.
NetCDF4/HDF5 (``\\x89HDF``) — the new CDS (2024+)
    dims ``valid_time``, ``pressure_level``, ``latitude``, ``longitude``; scalar ``number``;
    ``expver`` strings ("0001"/"0005") along ``valid_time``.
Classic NetCDF (``CDF``) — the legacy CDS (pre-2024, ``grib_to_netcdf``)
    dims ``time``, ``level`` and, when a request spanned ERA5 and ERA5T, an ``expver`` dimension
    [1, 5] whose slices are NaN where that version has no data: per time the non-NaN version is
    taken and recorded. Without that dimension the version was not recorded (``expver`` 0). The
    header is parsed to check the file is as long as it says (netCDF-C reads a truncated classic
    file as fill values without complaint).
Zip (``PK``)
    The new CDS zips the parts of a request that mixes instantaneous and accumulated variables
    (``data_stream-oper_stepType-instant.nc`` + ``…-accum.nc``); members are merged.

:func:`decode_many` merges several deliveries; where two cover the same variable and time, final
ERA5 wins over ERA5T, which wins over unknown (then the earlier path). Every bad input raises one
``ValueError`` naming the file.
"""

from __future__ import annotations

import atexit
import functools
import logging
import shutil
import struct
import tempfile
import zipfile
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

MAGICS = {b"GRIB": "grib", b"\x89HDF": "netcdf4", b"CDF": "netcdf3", b"PK\x03\x04": "zip"}
_RANK = {EXPVER_FINAL: 0, EXPVER_PRELIMINARY: 1, EXPVER_UNKNOWN: 2}
_ZIP_CACHE: dict[tuple[str, int, int], Path] = {}
_ABSENT = {"expver": "0000", "number": 0}
_GRID_KEYS = ("gridType", "Ni", "Nj", "latitudeOfFirstGridPointInDegrees", "longitudeOfFirstGridPointInDegrees",
              "latitudeOfLastGridPointInDegrees", "longitudeOfLastGridPointInDegrees")


@dataclass
class Delivery:
    """What one delivery holds, read from its coordinates and headers only."""

    path: Path
    latitude: np.ndarray
    longitude: np.ndarray
    expver: dict[np.datetime64, int] = field(default_factory=dict)
    fields: dict[tuple[str, int | None], set[np.datetime64]] = field(default_factory=dict)


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


def combine_expver(codes: Sequence[int]) -> int:
    """One version for a time from several fields: agreeing codes, else preliminary if any, else unknown."""
    distinct = {int(c) for c in codes}
    if len(distinct) == 1:
        return distinct.pop()
    return EXPVER_PRELIMINARY if EXPVER_PRELIMINARY in distinct else EXPVER_UNKNOWN


def _expver_code(value: object, path: Path) -> int:
    try:
        code = int(str(value.decode() if isinstance(value, bytes) else value).strip())
    except ValueError:
        raise SourceError(f"delivered file {str(path)!r}: expver {value!r} is not a number") from None
    return code if code in _RANK else EXPVER_UNKNOWN


# --- GRIB -------------------------------------------------------------------------------------

def _scan_grib(path: Path) -> list[dict]:
    import eccodes

    keys = ("cfVarName", "typeOfLevel", "level", "stepType", "validityDate", "validityTime", "expver",
            "number") + _GRID_KEYS
    messages, end = [], 0
    coords: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def padding_only(start: int, stop: int) -> bool:
        # MARS pads messages with zero bytes (e.g. to a multiple of 8); anything else is damage.
        if stop - start > 1 << 16:
            return False
        raw.seek(start)
        return raw.read(stop - start).strip(b"\0") == b""

    try:
        with open(path, "rb") as f, open(path, "rb") as raw:
            while (handle := eccodes.codes_grib_new_from_file(f, headers_only=True)) is not None:
                try:
                    # Non-ECMWF GRIB lacks the MARS keys: no expver means "unknown", no number means member 0.
                    msg = {k: eccodes.codes_get(handle, k) if eccodes.codes_is_defined(handle, k) else _ABSENT.get(k)
                           for k in keys}
                    offset = int(eccodes.codes_get(handle, "offset"))
                    length = int(eccodes.codes_get(handle, "totalLength"))
                    grid = tuple(msg[k] for k in _GRID_KEYS)
                    if grid not in coords:
                        coords[grid] = (eccodes.codes_get_array(handle, "distinctLatitudes"),
                                        eccodes.codes_get_array(handle, "distinctLongitudes"))
                    msg["grid"], (msg["lat"], msg["lon"]) = grid, coords[grid]
                finally:
                    eccodes.codes_release(handle)
                if offset != end and not padding_only(end, offset):
                    raise ValueError(f"{offset - end} unreadable bytes before message {len(messages) + 1}")
                end = offset + length
                messages.append(msg)
            size = path.stat().st_size
            if messages and end != size and not padding_only(end, size):
                raise ValueError(f"{size - end} trailing bytes after {len(messages)} complete messages")
    except ValueError as exc:
        raise SourceError(f"GRIB file {str(path)!r} is corrupt: {exc}") from exc
    except Exception as exc:  # ecCodes raises its own hierarchy for truncated/garbled messages
        raise SourceError(f"GRIB file {str(path)!r} is corrupt or truncated after {len(messages)} messages "
                          f"({type(exc).__name__}: {exc})") from exc
    if not messages:
        raise SourceError(f"GRIB file {str(path)!r} holds no complete GRIB message")
    return messages


def _grib_known(path: Path, messages: list[dict]) -> list[dict]:
    known = [m for m in messages if m["cfVarName"] in SHORT_NAMES]
    if not known:
        found = sorted({m["cfVarName"] for m in messages})
        raise SourceError(f"GRIB file {str(path)!r} holds no variable spherecast knows (found {found})")
    for m in known:
        on_pressure = m["typeOfLevel"] == "isobaricInhPa"
        if on_pressure != (VARIABLES[SHORT_NAMES[m["cfVarName"]]].level_type == "pressure"):
            raise SourceError(f"GRIB file {str(path)!r}: {m['cfVarName']!r} is on {m['typeOfLevel']!r} levels; "
                              "spherecast reads pressure-level (isobaricInhPa) and single-level ERA5 only")
    grids = {m["grid"] for m in known}
    if len(grids) > 1:
        raise SourceError(f"GRIB file {str(path)!r} mixes {len(grids)} grids; split it by grid")
    if known[0]["gridType"] != "regular_ll":
        raise SourceError(f"GRIB file {str(path)!r} is on a {known[0]['gridType']!r} grid, not regular_ll "
                          "(ask CDS for a regular 'grid')")
    members = sorted({int(m["number"]) for m in known})
    if len(members) > 1:
        log.warning("%s: ensemble of %d members; using member %d only (the contract has no member axis)",
                    path.name, len(members), members[0])
    for m in known:
        m["time"] = np.datetime64(pd.Timestamp(f"{m['validityDate']:08d}T{m['validityTime']:04d}"), "ns")
    return [m for m in known if int(m["number"]) == members[0]]


def _describe_grib(path: Path) -> Delivery:
    messages = _scan_grib(path)
    known = _grib_known(path, messages)
    info = Delivery(path, np.asarray(known[0]["lat"], float), np.asarray(known[0]["lon"], float))
    per_time: dict[np.datetime64, list[int]] = {}
    for m in known:
        var = VARIABLES[SHORT_NAMES[m["cfVarName"]]]
        level = int(m["level"]) if var.level_type == "pressure" else None
        info.fields.setdefault((var.name, level), set()).add(m["time"])
        per_time.setdefault(m["time"], []).append(_expver_code(m["expver"], path))
    info.expver = {t: combine_expver(c) for t, c in per_time.items()}
    return info


def _open_grib(path: Path) -> xr.Dataset:
    known = _grib_known(path, _scan_grib(path))
    groups: dict[tuple[str, str], list[dict]] = {}
    for m in known:
        groups.setdefault((m["typeOfLevel"], m["stepType"]), []).append(m)
    member = int(known[0]["number"])
    pieces = []
    for (level_type, step_type), msgs in groups.items():
        try:
            ds = xr.open_dataset(path, engine="cfgrib", backend_kwargs={
                "indexpath": "", "filter_by_keys": {"typeOfLevel": level_type, "stepType": step_type}})
        except Exception as exc:  # cfgrib's DatasetBuildError and friends
            raise SourceError(f"GRIB file {str(path)!r}: cfgrib cannot decode its {level_type}/{step_type} "
                              f"messages ({type(exc).__name__}: {exc})") from exc
        ds = ds[[v for v in ds.data_vars if v in SHORT_NAMES]]
        if "number" in ds.dims:
            ds = ds.sel(number=member)
        for dim in ("time", "step"):
            if dim not in ds.dims:
                ds = ds.expand_dims(dim)
        ds = ds.chunk({"time": 1, "step": 1})
        # Analyses have step 0; accumulations are (forecast base time, step): pick the pair of each message.
        valid = ds["time"].values[:, None] + ds["step"].values[None, :]
        times = np.array(sorted({m["time"] for m in msgs}), dtype="datetime64[ns]")
        ii, jj = [], []
        for t in times:
            hits = np.argwhere(valid == t)
            if not hits.size:
                raise SourceError(f"GRIB file {str(path)!r}: cfgrib finds no field valid at {pd.Timestamp(t)} "
                                  f"among its {level_type}/{step_type} messages")
            ii.append(hits[0][0])
            jj.append(hits[0][1])
        ds = ds.drop_vars(["valid_time"], errors="ignore").isel(
            time=xr.DataArray(ii, dims="vt"), step=xr.DataArray(jj, dims="vt"))
        ds = ds.drop_vars(["time", "step"]).rename({"vt": "time"}).assign_coords(time=times)
        codes = {}
        for m in msgs:
            codes.setdefault(m["time"], []).append(_expver_code(m["expver"], path))
        ds["expver"] = ("time", np.array([combine_expver(codes[t]) for t in times], dtype=np.int8))
        pieces.append(_contract(ds, path))
    return _merge([(f"{path}[{i}]", p) for i, p in enumerate(pieces)]) if len(pieces) > 1 else pieces[0]


# --- NetCDF -----------------------------------------------------------------------------------

def _check_classic_length(path: Path) -> None:
    # Walk the classic / 64-bit-offset / CDF-5 header to the data offsets and compare with the size.
    with open(path, "rb") as f:
        data = f.read(1 << 22)
    version, pos = data[3], 4
    sizes = {1: 1, 2: 1, 3: 2, 4: 4, 5: 4, 6: 8, 7: 1, 8: 2, 9: 4, 10: 8, 11: 8}

    def take(fmt: str) -> int:
        nonlocal pos
        (value,) = struct.unpack_from(">" + fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    def count() -> int:
        return take("Q" if version == 5 else "I")

    def skip_name() -> None:
        nonlocal pos
        length = count()  # read before the += below, which would otherwise use the stale pos
        pos += (length + 3) // 4 * 4

    def skip_attrs() -> None:
        nonlocal pos
        take("I")
        for _ in range(count()):
            skip_name()
            nc_type = take("I")
            length = count() * sizes[nc_type]
            pos += (length + 3) // 4 * 4

    numrecs = count()
    take("I")
    dims = []
    for _ in range(count()):
        skip_name()
        dims.append(count())
    skip_attrs()
    take("I")
    expected, records = 0, []
    for _ in range(count()):
        skip_name()
        dim_ids = [count() for _ in range(count())]
        skip_attrs()
        nc_type, vsize = take("I"), count()
        begin = take("Q") if version in (2, 5) else take("I")
        if dim_ids and dims[dim_ids[0]] == 0:
            records.append((begin, vsize, int(np.prod([dims[d] for d in dim_ids[1:]])) * sizes[nc_type]))
        else:
            expected = max(expected, begin + vsize)
    if records and numrecs not in (0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF):
        # A lone record variable is stored unpadded; several are padded to 4 bytes each.
        record_size = records[0][2] if len(records) == 1 else sum(r[1] for r in records)
        expected = max(expected, min(r[0] for r in records) + numrecs * record_size)
    if path.stat().st_size + 3 < expected:  # the last variable's padding to 4 bytes may be absent
        raise SourceError(f"NetCDF file {str(path)!r} is truncated: {path.stat().st_size} bytes, "
                          f"its header needs {expected}")


def _open_netcdf(path: Path, kind: str) -> xr.Dataset:
    if kind == "netcdf3":
        try:
            _check_classic_length(path)
        except (struct.error, KeyError, IndexError) as exc:
            raise SourceError(f"NetCDF file {str(path)!r} has a corrupt header ({exc})") from exc
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
        codes = [_expver_code(v, path) for v in np.broadcast_to(values, (ds.sizes["time"],))]
        ds = ds.drop_vars("expver").assign(expver=("time", np.array(codes, dtype=np.int8)))
    else:
        ds["expver"] = ("time", np.full(ds.sizes["time"], EXPVER_UNKNOWN, dtype=np.int8))
    return _contract(ds, path)


def _combine_legacy_expver(ds: xr.Dataset, path: Path) -> xr.Dataset:
    versions = [_expver_code(v, path) for v in ds["expver"].values]
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


# --- normalisation and merging ----------------------------------------------------------------

def units_match(have: str, want: str) -> bool:
    """Whether two ECMWF-style unit strings agree, ignoring ``**``/``^`` and spacing."""

    def norm(u: str) -> str:
        return " ".join(u.replace("**", "").replace("^", "").split())
    return norm(have) == norm(want)


def _contract(ds: xr.Dataset, path: Path) -> xr.Dataset:
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


def _grid_text(ds: xr.Dataset) -> str:
    lat, lon = ds["latitude"].values, ds["longitude"].values
    return f"{lat.size}x{lon.size}, latitude {lat[0]:g}…{lat[-1]:g}, longitude {lon[0]:g}…{lon[-1]:g}"


def _merge(pieces: list[tuple[str, xr.Dataset]]) -> xr.Dataset:
    first_name, first = pieces[0]
    for name, ds in pieces[1:]:
        same = (ds.sizes["latitude"] == first.sizes["latitude"] and ds.sizes["longitude"] == first.sizes["longitude"]
                and np.allclose(ds["latitude"], first["latitude"]) and np.allclose(ds["longitude"], first["longitude"]))
        if not same:
            raise SourceError(f"{first_name!r} and {name!r} are on different grids "
                              f"({_grid_text(first)} vs {_grid_text(ds)})")
    parts = []
    for order, (_, ds) in enumerate(pieces):
        codes = ds["expver"].values
        for code in np.unique(codes):
            parts.append((_RANK[int(code)], order, int(code), ds.isel(time=np.flatnonzero(codes == code))))
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


def _open_zip(path: Path) -> xr.Dataset:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _ZIP_CACHE:
        target = Path(tempfile.mkdtemp(prefix="spherecast-cds-zip-"))
        atexit.register(shutil.rmtree, target, True)
        try:
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if not n.endswith("/")]
                archive.extractall(target)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise SourceError(f"CDS zip {str(path)!r} is corrupt ({type(exc).__name__}: {exc})") from exc
        if not names:
            raise SourceError(f"CDS zip {str(path)!r} is empty")
        _ZIP_CACHE[key] = target
    members = sorted(p for p in _ZIP_CACHE[key].rglob("*") if p.is_file())
    pieces = []
    for member in members:
        try:
            pieces.append((f"{path}!{member.name}", open_delivered(member)))
        except ValueError as exc:
            raise SourceError(f"CDS zip {str(path)!r}, member {member.name!r}: {exc}") from exc
    return _merge(pieces) if len(pieces) > 1 else pieces[0][1]


@functools.lru_cache(maxsize=16)
def _open_cached(name: str, size: int, mtime_ns: int) -> xr.Dataset:
    # Keyed by size and mtime so a rewritten file is decoded afresh; failures are not cached.
    path = Path(name)
    match sniff_format(path):
        case "grib":
            return _open_grib(path)
        case "zip":
            return _open_zip(path)
        case kind:
            return _open_netcdf(path, kind)


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
        return _describe_grib(path)
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
    return _merge(pieces)
