"""The GRIB decoder of CDS deliveries: checked message by message with ecCodes, decoded with cfgrib.

A truncated, corrupt or padded file is rejected (cfgrib alone would skip bad messages silently);
cfgrib then decodes one (typeOfLevel, stepType) group at a time, so single- and pressure-level
messages may share a file. ``expver`` comes from each message (cfgrib's ``read_keys`` reports only
the first message's). Accumulations (``tp``: base time × step) are mapped to their validity times.
Ensemble files (``number`` > 0, the ERA5 EDA) are reduced to member 0 with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from core.errors import SourceError
from core.variables import SHORT_NAMES, VARIABLES
from ingest.delivery import Delivery, combine_expver, expver_code, merge, to_contract

log = logging.getLogger(__name__)

_ABSENT = {"expver": "0000", "number": 0}
_GRID_KEYS = ("gridType", "Ni", "Nj", "latitudeOfFirstGridPointInDegrees", "longitudeOfFirstGridPointInDegrees",
              "latitudeOfLastGridPointInDegrees", "longitudeOfLastGridPointInDegrees")


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


def describe_grib(path: Path) -> Delivery:
    """What a GRIB delivery holds, from its message headers only."""
    messages = _scan_grib(path)
    known = _grib_known(path, messages)
    info = Delivery(path, np.asarray(known[0]["lat"], float), np.asarray(known[0]["lon"], float))
    per_time: dict[np.datetime64, list[int]] = {}
    for m in known:
        var = VARIABLES[SHORT_NAMES[m["cfVarName"]]]
        level = int(m["level"]) if var.level_type == "pressure" else None
        info.fields.setdefault((var.name, level), set()).add(m["time"])
        per_time.setdefault(m["time"], []).append(expver_code(m["expver"], path))
    info.expver = {t: combine_expver(c) for t, c in per_time.items()}
    return info


def open_grib(path: Path) -> xr.Dataset:
    """A GRIB delivery, lazily, in the contract."""
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
            codes.setdefault(m["time"], []).append(expver_code(m["expver"], path))
        ds["expver"] = ("time", np.array([combine_expver(codes[t]) for t in times], dtype=np.int8))
        pieces.append(to_contract(ds, path))
    return merge([(f"{path}[{i}]", p) for i, p in enumerate(pieces)]) if len(pieces) > 1 else pieces[0]


