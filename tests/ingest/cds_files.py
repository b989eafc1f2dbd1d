"""Test factory: files that look exactly like Copernicus CDS deliveries of ERA5.

Every layout holds the same deterministic values (:func:`cds_field`, a function of seed, variable,
level and time only), so one time written into two files holds the same field in both.

New CDS NetCDF (2024+, :func:`write_cds_netcdf`)
    NetCDF4/HDF5 from the CDS's cfgrib-based converter: dims ``valid_time`` (int64 seconds since
    1970), ``pressure_level`` (float64 hPa, decreasing), ``latitude`` (90 → −90), ``longitude``
    (0 → 360−Δ); scalar coord ``number``; ``expver`` strings ("0001"/"0005") along ``valid_time``;
    float32 variables named by cfgrib's ``cfVarName`` (``z``, ``t2m``…) with the converter's
    ``GRIB_*`` attributes. A request mixing instantaneous and accumulated (``tp``) single-level
    variables arrives, as from the real CDS, as a zip of ``data_stream-oper_stepType-instant.nc``
    and ``data_stream-oper_stepType-accum.nc`` (whatever the file is called).
Legacy CDS NetCDF (pre-2024, ``legacy=True``)
    Classic NetCDF (64-bit offset) from ``grib_to_netcdf``: dims ``longitude``, ``latitude``,
    ``level`` (int32 millibars), ``time`` (int32 hours since 1900-01-01) and, only when the request
    spans ERA5 and ERA5T, an ``expver`` dimension [1, 5] whose slices are NaN where that version has
    no data. Values are int16-packed; unlike ``grib_to_netcdf`` the packing comes from the
    variable's valid range, not the data, so it does not depend on the period in the file.
GRIB1 (:func:`write_cds_grib`)
    As MARS/CDS deliver ERA5: ``class=ea``, ``stream=oper``, ``type=an``, 16-bit simple packing, an
    ``expver`` key per message, and ``tp`` as a forecast accumulation from the 06/18 UTC runs
    (steps 1–12 h). Packing makes GRIB and legacy values differ from :func:`cds_field` by about
    1e-5 of the variable's range; compare across formats with a tolerance.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import eccodes
import numpy as np
import pandas as pd
import xarray as xr

from core.variables import VARIABLES, check_level, get_variable

PARAM_IDS = {"z": 129, "t": 130, "u": 131, "v": 132, "q": 133, "w": 135, "t2m": 167, "u10": 165,
             "v10": 166, "msl": 151, "sp": 134, "tp": 228, "tcwv": 137}
ACCUMULATED = frozenset({"total_precipitation"})
_EPOCH = np.datetime64("1970-01-01T00", "ns")
_HISTORY = ("2025-01-15T10:00 GRIB to CDM+CF via cfgrib-0.9.15.0/ecCodes-2.39.0 with {\"source\": "
            "\"tmp_data.grib\", \"filter_by_keys\": {\"stream\": [\"oper\"], \"stepType\": [\"%s\"]}, "
            "\"encode_cf\": [\"parameter\", \"time\", \"geography\", \"vertical\"]}")


def cds_grid(grid_deg: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Latitudes 90 → −90 and longitudes 0 → 360−Δ of CDS's regular grid at ``grid_deg``."""
    nlat, nlon = 180.0 / grid_deg, 360.0 / grid_deg
    if abs(nlat - round(nlat)) > 1e-9 or abs(nlon - round(nlon)) > 1e-9:
        raise ValueError(f"grid_deg={grid_deg} does not divide 180°")
    return np.linspace(90.0, -90.0, round(nlat) + 1), np.arange(round(nlon)) * grid_deg


def _anomaly(seed: int, variable: str, level: int, hours: float, phi: np.ndarray, lam: np.ndarray) -> np.ndarray:
    # Travelling zonal waves with cos(φ)^m envelopes: smooth on the sphere, |anomaly| ≤ 1.
    rng = np.random.default_rng([seed, list(VARIABLES).index(variable), level])
    m = rng.integers(1, 7, size=3)
    amp, phase = rng.uniform(0.4, 1.0, 3), rng.uniform(0.0, 2 * np.pi, 3)
    speed, tilt = rng.uniform(-1.0, 1.0, 3) * 2 * np.pi / 120.0, rng.uniform(-0.8, 0.8, 3)
    phi, lam = phi[:, None], lam[None, :]
    out = np.zeros((phi.size, lam.size))
    for k in range(3):
        envelope = np.cos(phi) ** m[k] * (1 + tilt[k] * np.sin(phi)) / (1 + abs(tilt[k]))
        out += amp[k] * envelope * np.cos(m[k] * lam - speed[k] * hours + phase[k])
    return out / amp.sum()


def cds_field(variable: str, level: int | None, time: object, lat: np.ndarray, lon: np.ndarray,
              seed: int = 0) -> np.ndarray:
    """The deterministic float32 field (lat × lon) every factory file holds for one variable, level and time."""
    var = get_variable(variable)
    if var.level_type == "pressure":
        if level is None:
            raise ValueError(f"{variable!r} is a pressure-level variable: give a level")
        p = float(check_level(level))
    else:
        p = 1000.0
    phi = np.deg2rad(np.asarray(lat, dtype=float))[:, None]
    lam = np.deg2rad(np.asarray(lon, dtype=float))[None, :]
    hours = float((pd.Timestamp(time).to_datetime64().astype("datetime64[ns]") - _EPOCH) / np.timedelta64(1, "h"))
    a = _anomaly(seed, variable, int(p), hours, phi[:, 0], lam[0])
    s2, c2 = np.sin(phi) ** 2, np.cos(phi) ** 2
    height = 44330.8 * (1 - (p / 1013.25) ** 0.190263)  # standard-atmosphere height of the level, m
    match variable:
        case "geopotential":
            z0 = 9.80665 * height
            f = z0 - (0.06 * z0 + 300) * (s2 - 1 / 3) + (0.02 * z0 + 300) * a
        case "temperature":
            f = max(288.15 - 0.0065 * height, 216.65) + 30 * (c2 - 2 / 3) * min(1.0, p / 300) + 4 * a
        case "u_component_of_wind":
            f = 30 * np.sin(2 * phi) ** 2 * np.exp(-np.log(p / 250) ** 2 / 2) + 5 * c2 + 8 * a
        case "v_component_of_wind":
            f = 6 * a * np.cos(phi)
        case "specific_humidity":
            f = 0.016 * c2**2 * (p / 1000) ** 3 * (1 + 0.3 * a) + 2e-6
        case "vertical_velocity":
            f = 0.3 * a * np.cos(phi) * (p / 1000)
        case "2m_temperature":
            f = 288 + 35 * (c2 - 2 / 3) + 5 * a
        case "10m_u_component_of_wind":
            f = 6 * np.sin(2 * phi) ** 2 - 4 * c2**2 + 4 * a
        case "10m_v_component_of_wind":
            f = 4 * a * np.cos(phi)
        case "mean_sea_level_pressure":
            f = 101325 + 900 * np.cos(4 * phi) + 1500 * a
        case "surface_pressure":
            f = 101325 - 9000 * c2 * (0.5 + 0.5 * np.cos(2 * lam + 1)) + 600 * a
        case "total_precipitation":
            f = 4e-4 * c2 * (0.5 * (1 + a)) ** 2
        case "total_column_water_vapour":
            f = 3 + 50 * c2**2 * (1 + 0.25 * a)
        case _:
            raise ValueError(f"cds_field has no recipe for {variable!r}")
    return np.broadcast_to(f, (phi.size, lam.size)).astype(np.float32)


@cache
def _grib_meta(short_name: str) -> dict[str, str]:
    handle = eccodes.codes_grib_new_from_samples("regular_ll_sfc_grib1")
    try:
        eccodes.codes_set(handle, "paramId", PARAM_IDS[short_name])
        return {k: str(eccodes.codes_get(handle, k)) for k in ("shortName", "name", "units", "cfName")}
    finally:
        eccodes.codes_release(handle)


def _plan(times: Sequence[object], variables: Sequence[str], levels: Sequence[int],
          expver: Sequence[int] | None) -> tuple[pd.DatetimeIndex, list[str], list[int], np.ndarray]:
    stamps = pd.DatetimeIndex([pd.Timestamp(t) for t in times])
    if len(stamps) == 0 or not variables:
        raise ValueError("a CDS request needs at least one time and one variable")
    kinds = {get_variable(v).level_type for v in variables}
    if len(kinds) > 1:
        raise ValueError("CDS delivers single-level and pressure-level variables from two datasets "
                         f"(reanalysis-era5-single-levels / -pressure-levels); got {list(variables)}")
    lv = sorted({check_level(x) for x in levels}, reverse=True) if "pressure" in kinds else []
    if "pressure" in kinds and not lv:
        raise ValueError("pressure-level variables need at least one level")
    codes = np.ones(len(stamps), dtype=np.int64) if expver is None else np.asarray(list(expver), dtype=np.int64)
    if codes.shape != (len(stamps),) or not set(codes.tolist()) <= {1, 5}:
        raise ValueError(f"expver must give 1 or 5 for each of the {len(stamps)} times, got {expver!r}")
    return stamps, [str(v) for v in variables], lv, codes


def _short(variable: str) -> str:
    return VARIABLES[variable].short_name


def _cube(variable: str, stamps: pd.DatetimeIndex, levels: list[int], lat: np.ndarray, lon: np.ndarray,
          seed: int) -> np.ndarray:
    if get_variable(variable).level_type == "pressure":
        return np.stack([np.stack([cds_field(variable, lv, t, lat, lon, seed) for lv in levels]) for t in stamps])
    return np.stack([cds_field(variable, None, t, lat, lon, seed) for t in stamps])


def _new_netcdf(path: Path, stamps: pd.DatetimeIndex, variables: list[str], levels: list[int],
                grid_deg: float, codes: np.ndarray, seed: int, step_type: str) -> None:
    lat, lon = cds_grid(grid_deg)
    coords: dict[str, tuple] = {
        "number": ((), np.int64(0), {"long_name": "ensemble member numerical id", "units": "1",
                                      "standard_name": "realization"}),
        "valid_time": ("valid_time", stamps.values.astype("datetime64[ns]"),
                       {"long_name": "time", "standard_name": "time"}),
        "latitude": ("latitude", lat, {"units": "degrees_north", "standard_name": "latitude", "long_name": "latitude",
                                       "stored_direction": "decreasing"}),
        "longitude": ("longitude", lon, {"units": "degrees_east", "standard_name": "longitude",
                                         "long_name": "longitude"}),
        "expver": ("valid_time", np.array([f"{c:04d}" for c in codes], dtype=object), {}),
    }
    dims: tuple[str, ...] = ("valid_time", "latitude", "longitude")
    if levels:
        coords["pressure_level"] = ("pressure_level", np.asarray(levels, dtype=np.float64),
                                    {"long_name": "pressure", "units": "hPa", "positive": "down",
                                     "stored_direction": "decreasing", "standard_name": "air_pressure"})
        dims = ("valid_time", "pressure_level", "latitude", "longitude")
    data_vars, encoding = {}, {"valid_time": {"units": "seconds since 1970-01-01", "calendar": "proleptic_gregorian",
                                              "dtype": "int64"}}
    for name in variables:
        short = _short(name)
        meta = _grib_meta(short)
        attrs = {
            "GRIB_paramId": PARAM_IDS[short], "GRIB_dataType": "fc" if name in ACCUMULATED else "an",
            "GRIB_numberOfPoints": lat.size * lon.size, "GRIB_typeOfLevel": "isobaricInhPa" if levels else "surface",
            "GRIB_stepUnits": 1, "GRIB_stepType": step_type, "GRIB_gridType": "regular_ll", "GRIB_uvRelativeToGrid": 0,
            "GRIB_NV": 0, "GRIB_Nx": lon.size, "GRIB_Ny": lat.size, "GRIB_cfName": meta["cfName"],
            "GRIB_cfVarName": short, "GRIB_gridDefinitionDescription": "Latitude/Longitude Grid",
            "GRIB_iDirectionIncrementInDegrees": grid_deg, "GRIB_iScansNegatively": 0,
            "GRIB_jDirectionIncrementInDegrees": grid_deg, "GRIB_jPointsAreConsecutive": 0, "GRIB_jScansPositively": 0,
            "GRIB_latitudeOfFirstGridPointInDegrees": 90.0, "GRIB_latitudeOfLastGridPointInDegrees": -90.0,
            "GRIB_longitudeOfFirstGridPointInDegrees": 0.0, "GRIB_longitudeOfLastGridPointInDegrees": float(lon[-1]),
            "GRIB_missingValue": 3.4028234663852886e38, "GRIB_name": meta["name"], "GRIB_shortName": meta["shortName"],
            "GRIB_totalNumber": 0, "GRIB_units": meta["units"], "long_name": meta["name"], "units": meta["units"],
            "standard_name": meta["cfName"],
        }
        data_vars[short] = (dims, _cube(name, stamps, levels, lat, lon, seed), attrs)
        encoding[short] = {"zlib": True, "complevel": 1, "_FillValue": np.float32(np.nan),
                           "chunksizes": (1,) * (len(dims) - 2) + (lat.size, lon.size)}
    ds = xr.Dataset(data_vars, coords=coords, attrs={
        "GRIB_centre": "ecmf", "GRIB_centreDescription": "European Centre for Medium-Range Weather Forecasts",
        "GRIB_subCentre": 0, "Conventions": "CF-1.7",
        "institution": "European Centre for Medium-Range Weather Forecasts", "history": _HISTORY % step_type})
    ds.to_netcdf(path, format="NETCDF4", engine="netcdf4", encoding=encoding)


def _legacy_netcdf(path: Path, stamps: pd.DatetimeIndex, variables: list[str], levels: list[int],
                   grid_deg: float, codes: np.ndarray, seed: int) -> None:
    lat, lon = cds_grid(grid_deg)
    mixed = len(set(codes.tolist())) > 1
    coords: dict[str, tuple] = {
        "longitude": ("longitude", lon.astype(np.float32), {"units": "degrees_east", "long_name": "longitude"}),
        "latitude": ("latitude", lat.astype(np.float32), {"units": "degrees_north", "long_name": "latitude"}),
        "time": ("time", stamps.values.astype("datetime64[ns]"), {"long_name": "time"}),
    }
    if levels:
        coords["level"] = ("level", np.asarray(levels, dtype=np.int32),
                           {"units": "millibars", "long_name": "pressure_level"})
    if mixed:
        coords["expver"] = ("expver", np.array([1, 5], dtype=np.int32), {"long_name": "expver"})
    data_vars, encoding = {}, {"time": {"units": "hours since 1900-01-01 00:00:00.0", "calendar": "gregorian",
                                        "dtype": "int32"}}
    for name in variables:
        short, var = _short(name), get_variable(name)
        cube = _cube(name, stamps, levels, lat, lon, seed).astype(np.float64)
        dims = ("time",) + (("level",) if levels else ()) + ("latitude", "longitude")
        if mixed:  # one slice per expver, NaN where that version has no data (CDS's legacy layout)
            cube = np.stack([np.where((codes == e).reshape((-1,) + (1,) * (cube.ndim - 1)), cube, np.nan)
                             for e in (1, 5)], axis=1)
            dims = dims[:1] + ("expver",) + dims[1:]
        attrs = {"units": var.units, "long_name": _grib_meta(short)["name"]}
        data_vars[short] = (dims, cube, attrs)
        lo, hi = var.valid_range
        encoding[short] = {"dtype": "int16", "scale_factor": (hi - lo) / 65532.0, "add_offset": (hi + lo) / 2.0,
                           "_FillValue": np.int16(-32767), "missing_value": np.int16(-32767)}
    history = ("2023-05-10 12:00:00 GMT by grib_to_netcdf-2.25.1: /opt/ecmwf/mars-client/bin/grib_to_netcdf.bin -S "
               "param -o /cache/data5/adaptor.mars.internal-1683720000.nc /cache/tmp/adaptor.mars.internal.grib")
    ds = xr.Dataset(data_vars, coords=coords, attrs={"Conventions": "CF-1.6", "history": history})
    ds.to_netcdf(path, format="NETCDF3_64BIT", engine="netcdf4", encoding=encoding, unlimited_dims=["time"])


def write_cds_netcdf(path: str | Path, times: Sequence[object], variables: Sequence[str], levels: Sequence[int],
                     grid_deg: float = 1.0, expver: Sequence[int] | None = None, seed: int = 0,
                     legacy: bool = False) -> Path:
    """Write one CDS NetCDF delivery (new 2024+ layout, or the legacy one) and return its path."""
    path = Path(path)
    stamps, names, lv, codes = _plan(times, variables, levels, expver)
    if legacy:
        _legacy_netcdf(path, stamps, names, lv, grid_deg, codes, seed)
        return path
    instant = [v for v in names if v not in ACCUMULATED]
    accum = [v for v in names if v in ACCUMULATED]
    if instant and accum:  # the CDS splits by stepType and zips the parts
        with zipfile.ZipFile(path, "w") as archive:
            for step_type, group in (("instant", instant), ("accum", accum)):
                part = path.with_name(f".{path.name}.{step_type}.nc")
                _new_netcdf(part, stamps, group, lv, grid_deg, codes, seed, step_type)
                archive.write(part, f"data_stream-oper_stepType-{step_type}.nc")
                part.unlink()
        return path
    _new_netcdf(path, stamps, names, lv, grid_deg, codes, seed, "accum" if accum else "instant")
    return path


def _set_time(handle: int, variable: str, valid: pd.Timestamp) -> None:
    if variable not in ACCUMULATED:
        eccodes.codes_set(handle, "dataDate", int(valid.strftime("%Y%m%d")))
        eccodes.codes_set(handle, "dataTime", int(valid.strftime("%H%M")))
        return
    # ERA5 accumulations come from the 06 and 18 UTC forecasts, hourly steps 1–12 h.
    day, hour = valid.normalize(), valid.hour
    base = day + pd.Timedelta(hours=6) if 7 <= hour <= 18 else day + pd.Timedelta(hours=18 if hour > 18 else -6)
    step = int((valid - base) / pd.Timedelta(hours=1))
    eccodes.codes_set(handle, "type", "fc")
    eccodes.codes_set(handle, "dataDate", int(base.strftime("%Y%m%d")))
    eccodes.codes_set(handle, "dataTime", int(base.strftime("%H%M")))
    eccodes.codes_set(handle, "stepType", "accum")
    eccodes.codes_set(handle, "startStep", step - 1)
    eccodes.codes_set(handle, "endStep", step)


def write_cds_grib(path: str | Path, times: Sequence[object], variables: Sequence[str], levels: Sequence[int],
                   grid_deg: float = 1.0, expver: Sequence[int] | None = None, seed: int = 0) -> Path:
    """Write one CDS GRIB1 delivery (messages ordered time, level, parameter, like MARS) and return its path."""
    path = Path(path)
    stamps, names, lv, codes = _plan(times, variables, levels, expver)
    lat, lon = cds_grid(grid_deg)
    sample = eccodes.codes_grib_new_from_samples("regular_ll_sfc_grib1")
    try:
        with open(path, "wb") as out:
            for t, code in zip(stamps, codes, strict=True):
                for level in lv or [None]:
                    for name in names:
                        handle = eccodes.codes_clone(sample)
                        try:
                            for key, value in (("Ni", lon.size), ("Nj", lat.size),
                                               ("latitudeOfFirstGridPointInDegrees", 90.0),
                                               ("longitudeOfFirstGridPointInDegrees", 0.0),
                                               ("latitudeOfLastGridPointInDegrees", -90.0),
                                               ("longitudeOfLastGridPointInDegrees", float(lon[-1])),
                                               ("iDirectionIncrementInDegrees", grid_deg),
                                               ("jDirectionIncrementInDegrees", grid_deg), ("jScansPositively", 0),
                                               ("localDefinitionNumber", 1), ("class", "ea"), ("stream", "oper"),
                                               ("type", "an"), ("expver", f"{code:04d}"), ("table2Version", 128),
                                               ("paramId", PARAM_IDS[_short(name)]), ("bitsPerValue", 16)):
                                eccodes.codes_set(handle, key, value)
                            if level is None:
                                eccodes.codes_set(handle, "typeOfLevel", "surface")
                                eccodes.codes_set(handle, "level", 0)
                            else:
                                eccodes.codes_set(handle, "typeOfLevel", "isobaricInhPa")
                                eccodes.codes_set(handle, "level", level)
                            _set_time(handle, name, t)
                            field = cds_field(name, level, t, lat, lon, seed)
                            eccodes.codes_set_values(handle, field.astype(np.float64).ravel())
                            eccodes.codes_write(handle, out)
                        finally:
                            eccodes.codes_release(handle)
    finally:
        eccodes.codes_release(sample)
    return path
