"""ECMWF open real-time data as a source: the IFS analysis (step 0 of each 00/06/12/18 UTC run).

The portal (``https://data.ecmwf.int/forecasts`` or a mirror) lays each run out as
``{YYYYMMDD}/{HH}z/ifs/0p25/oper/{YYYYMMDD}{HH}0000-0h-oper-fc.grib2`` plus a ``.index`` of JSON
lines (one per GRIB message: MARS keys, ``_offset``, ``_length``). The ``ecmwf-opendata`` client
reads the index and downloads only the byte ranges of the fields asked for. Open data names
parameters by their GRIB short names and publishes geopotential *height* ``gh`` (m), so
geopotential is ``gh × g0``. Fields are checked message by message with ecCodes (edition, grid,
date, step, parameter and level must be what was asked; a truncated download is refused), then
regridded to the store's grid by the conservative regridder the ERA5 ingest uses.

A run that is not published yet (HTTP 404) raises :class:`CycleNotAvailable`; every other failure
raises :class:`OpenDataError` (a ``ValueError``) naming the run, the URL and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from core.config import OpenDataConfig
from core.errors import ConfigError, SourceError
from core.grid import Grid
from core.schema import EXPVER_FINAL
from core.variables import get_variable
from ingest.regrid import check_global, regrid

log = logging.getLogger(__name__)

G0 = 9.80665  # standard gravity (m s-2): geopotential = g0 × geopotential height (WMO definition)
RESOLUTIONS = {"0p25": 0.25}  # the portal's resolution names → grid spacing in degrees


@dataclass(frozen=True)
class Param:
    """How one contract variable is published on the portal."""

    param: str
    levtype: str  # "pl" (pressure levels) or "sfc"
    scale: float = 1.0  # contract value = scale × portal value


PARAMS: dict[str, Param] = {
    "geopotential": Param("gh", "pl", G0),
    "temperature": Param("t", "pl"),
    "u_component_of_wind": Param("u", "pl"),
    "v_component_of_wind": Param("v", "pl"),
    "specific_humidity": Param("q", "pl"),
    "vertical_velocity": Param("w", "pl"),
    "2m_temperature": Param("2t", "sfc"),
    "10m_u_component_of_wind": Param("10u", "sfc"),
    "10m_v_component_of_wind": Param("10v", "sfc"),
    "mean_sea_level_pressure": Param("msl", "sfc"),
    "surface_pressure": Param("sp", "sfc"),
    "total_column_water_vapour": Param("tcwv", "sfc"),
}
# Asked for byte ranges of a 5xx or a dropped connection: wait 1 s, then twice as long, at most 30 s.
RETRY_BACKOFF = (1.0, 30.0, 2.0)


class CycleNotAvailable(LookupError):  # noqa: N818 - a state, not an error: the portal has not published it yet
    """The portal has not published this run (yet): HTTP 404 on its index or data file."""


class OpenDataError(SourceError):
    """A run the portal serves but that cannot be used: HTTP error, truncated or unexpected file."""


def cycle_url(root: str, cycle: pd.Timestamp, model: str = "ifs", resol: str = "0p25") -> str:
    """URL of the step-0 GRIB2 file of one run (its ``.index`` is beside it)."""
    c = pd.Timestamp(cycle)
    return (f"{root.rstrip('/')}/{c:%Y%m%d}/{c:%H}z/{model}/{resol}/oper/"
            f"{c:%Y%m%d%H}0000-0h-oper-fc.grib2")


def portal_params(variables: Sequence[str]) -> dict[str, Param]:
    """The portal parameter of each variable; ValueError naming those open data does not offer."""
    missing = []
    for name in variables:
        get_variable(name)
        if name not in PARAMS:
            missing.append(name)
    if missing:
        raise ConfigError(f"ECMWF open data has no analysis of {missing}; it offers {', '.join(PARAMS)}")
    return {name: PARAMS[name] for name in variables}


def _with_timeout(call: Callable[..., Any], seconds: float) -> Callable[..., Any]:
    # The client sends its index requests without a timeout: a stalled portal would hang forever.
    def wrapped(url: str, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = seconds
        return call(url, *args, **kwargs)

    return wrapped


@dataclass
class _Field:
    values: np.ndarray  # (nlat, nlon) float64, latitude 90 → −90, longitude ascending in [0, 360)
    latitude: np.ndarray
    longitude: np.ndarray


def _grid_of(handle: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(latitude, longitude, order) of a regular_ll message: rows north → south, columns by longitude in [0, 360)."""
    import eccodes

    nj, ni = int(eccodes.codes_get(handle, "Nj")), int(eccodes.codes_get(handle, "Ni"))
    lats = eccodes.codes_get_array(handle, "latitudes").reshape(nj, ni)[:, 0]
    lons = np.mod(eccodes.codes_get_array(handle, "longitudes").reshape(nj, ni)[0], 360.0)
    return lats, lons, np.argsort(lons, kind="stable")


def decode_cycle(path: Path, cycle: pd.Timestamp, wanted: set[tuple[str, int | None]],
                 spacing: float) -> dict[tuple[str, int | None], _Field]:
    """Every wanted (param, level) of one downloaded run, checked message by message with ecCodes."""
    import eccodes

    where = f"open-data file {path.name} of run {cycle:%Y-%m-%dT%H}"
    fields: dict[tuple[str, int | None], _Field] = {}
    grids: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    n = 0
    try:
        with open(path, "rb") as f:
            while (handle := eccodes.codes_grib_new_from_file(f)) is not None:
                n += 1
                try:
                    fields_key, field = _decode_message(handle, cycle, spacing, grids, f"{where}, message {n}")
                finally:
                    eccodes.codes_release(handle)
                if fields_key not in wanted:
                    raise OpenDataError(f"{where}, message {n}: holds {fields_key[0]!r}"
                                        f"{'' if fields_key[1] is None else f' at {fields_key[1]} hPa'}, "
                                        "which was not asked for: the portal's index does not match its file")
                if fields_key in fields:
                    raise OpenDataError(f"{where}: {fields_key} appears twice")
                fields[fields_key] = field
    except OpenDataError:
        raise
    except Exception as exc:  # ecCodes raises its own hierarchy for truncated or garbled messages
        raise OpenDataError(f"{where} is truncated or corrupt after {len(fields)} complete messages "
                            f"({type(exc).__name__}: {exc})") from exc
    missing = sorted(wanted - set(fields), key=str)
    if missing:
        raise OpenDataError(f"{where}: the portal did not deliver {missing} (param, hPa); "
                            "its index lacks them or the run is incomplete")
    return fields


def _decode_message(handle: int, cycle: pd.Timestamp, spacing: float, grids: dict,
                    where: str) -> tuple[tuple[str, int | None], _Field]:
    import eccodes

    def get(key: str) -> Any:
        return eccodes.codes_get(handle, key) if eccodes.codes_is_defined(handle, key) else None

    if get("edition") != 2:
        raise OpenDataError(f"{where} is GRIB edition {get('edition')}, not the GRIB2 asked for")
    if get("gridType") != "regular_ll":
        raise OpenDataError(f"{where} is on a {get('gridType')!r} grid, not the regular_ll grid asked for")
    di, dj = float(get("iDirectionIncrementInDegrees")), float(get("jDirectionIncrementInDegrees"))
    if abs(di - spacing) > 1e-6 or abs(dj - spacing) > 1e-6:
        raise OpenDataError(f"{where} has a grid spacing of {di:g}°×{dj:g}°, not the {spacing:g}° asked for")
    valid = pd.Timestamp(f"{int(get('dataDate')):08d}T{int(get('dataTime')):04d}")
    if valid != cycle or str(get("stepRange")) != "0":
        raise OpenDataError(f"{where} is run {valid:%Y-%m-%dT%H} step {get('stepRange')}, "
                            f"not run {cycle:%Y-%m-%dT%H} step 0")
    grid_key = tuple(get(k) for k in ("Ni", "Nj", "latitudeOfFirstGridPointInDegrees",
                                      "longitudeOfFirstGridPointInDegrees", "iScansNegatively", "jScansPositively"))
    if grid_key not in grids:
        lats, lons, order = _grid_of(handle)
        try:
            check_global(lats, lons, where)
        except ValueError as exc:
            raise OpenDataError(str(exc)) from None
        grids[grid_key] = (lats, lons, order)
    lats, lons, order = grids[grid_key]
    values = eccodes.codes_get_values(handle).reshape(lats.size, lons.size)
    if int(get("numberOfMissing") or 0):
        raise OpenDataError(f"{where}: {get('shortName')!r} has {get('numberOfMissing')} missing values")
    north_first = np.argsort(-lats, kind="stable")
    level = int(get("level")) if get("typeOfLevel") == "isobaricInhPa" else None
    field = _Field(values[north_first][:, order], lats[north_first], lons[order])
    return (str(get("shortName")), level), field


class OpenDataSource:
    """ECMWF open data: the IFS analysis of each 6-hourly run, on the store's grid."""

    name = "ecmwf-opendata-ifs"
    newest_first = True  # the newest run matters most to a forecast waiting for it

    def __init__(self, grid: Grid, settings: OpenDataConfig | None = None, workdir: Path | None = None,
                 spacing: float | None = None) -> None:
        self.grid = grid
        self.settings = settings or OpenDataConfig()
        self.workdir = workdir
        # The portal's grid spacing; only a test portal serving a coarser grid passes another one.
        self.spacing = spacing if spacing is not None else RESOLUTIONS[self.settings.resol]

    def dataset_version(self) -> str:
        """Hash of what determines the stored values: model, resolution, grid, regridding and conversions."""
        blob = json.dumps({"source": self.name, "model": self.settings.model, "resol": self.settings.resol,
                           "grid": self.grid.describe(), "regrid": "conservative-v1", "g0": G0, "v": 1},
                          sort_keys=True)
        return f"opendata-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    def check_request(self, variables: Sequence[str], levels: Sequence[int]) -> None:
        """Refuse variables the portal does not publish, before anything is fetched or created."""
        params = portal_params(variables)
        if any(p.levtype == "pl" for p in params.values()) and not levels:
            raise ConfigError("pressure-level variables asked for without task.levels")

    def _client(self) -> Any:
        from ecmwf.opendata import Client

        s = self.settings
        client = Client(source=s.url.rstrip("/"), model=s.model, resol=s.resol, maximum_retries=max(1, s.retries),
                        retry_after=RETRY_BACKOFF, use_server_retry_after=True)
        client.session.get = _with_timeout(client.session.get, s.timeout)
        client.session.head = _with_timeout(client.session.head, s.timeout)
        return client

    def _retrieve(self, client: Any, request: dict, target: Path, cycle: pd.Timestamp) -> None:
        import requests

        url = cycle_url(self.settings.url, cycle, self.settings.model, self.settings.resol)
        try:
            result = client.retrieve(request, target=str(target))
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else None
            where = exc.response.url if exc.response is not None else url
            if code == 404:
                raise CycleNotAvailable(f"run {cycle:%Y-%m-%dT%H} is not on the portal yet ({where}: 404)") from None
            raise OpenDataError(f"run {cycle:%Y-%m-%dT%H}: {where} answered HTTP {code} "
                                f"after {self.settings.retries} attempts") from None
        except requests.RequestException as exc:
            raise OpenDataError(f"run {cycle:%Y-%m-%dT%H}: cannot reach {url} after {self.settings.retries} "
                                f"attempts ({type(exc).__name__}: {exc})") from None
        except ValueError as exc:  # "Cannot find index entries matching …"
            raise OpenDataError(f"run {cycle:%Y-%m-%dT%H}: the index of {url} has none of the fields asked "
                                f"for {request.get('param')} ({exc})") from None
        except (AssertionError, RuntimeError, StopIteration, OSError) as exc:
            # multiurl checks a download's size and its multipart framing with assertions.
            raise OpenDataError(f"run {cycle:%Y-%m-%dT%H}: the download from {url} is truncated or "
                                f"damaged ({type(exc).__name__}: {exc})") from None
        expected = sum(int(length) for _, parts in result.urls for _, length in parts)
        got = target.stat().st_size if target.exists() else 0
        if got != expected:
            raise OpenDataError(f"run {cycle:%Y-%m-%dT%H}: downloaded {got} bytes from {url}, "
                                f"its index promises {expected}: the file is truncated")

    def fetch_cycle(self, cycle: pd.Timestamp, variables: Sequence[str], levels: Sequence[int]) -> xr.Dataset:
        """Download, check, convert and regrid one run's analysis (one time)."""
        cycle = pd.Timestamp(cycle)
        if cycle != cycle.floor("6h"):
            raise ConfigError(f"{cycle} is not a 00/06/12/18 UTC run")
        params = portal_params(variables)
        base = {"date": f"{cycle:%Y%m%d}", "time": cycle.hour, "step": 0, "stream": "oper", "type": "fc"}
        pl = sorted({p.param for p in params.values() if p.levtype == "pl"})
        sfc = sorted({p.param for p in params.values() if p.levtype == "sfc"})
        wanted = {(p, int(lv)) for p in pl for lv in levels} | {(p, None) for p in sfc}
        if self.workdir is not None:
            self.workdir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"opendata-{cycle:%Y%m%d%H}-", dir=self.workdir))
        try:
            client = self._client()
            fields: dict = {}
            for kind, names, extra in (("pl", pl, {"levelist": [int(lv) for lv in levels]}), ("sfc", sfc, {})):
                if not names:
                    continue
                target = tmp / f"{kind}.grib2"
                self._retrieve(client, {**base, "param": names, "levtype": kind, **extra}, target, cycle)
                part = {k for k in wanted if k[0] in names}
                fields.update(decode_cycle(target, cycle, part, self.spacing))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self._to_contract(cycle, params, fields, [int(lv) for lv in levels])

    def _to_contract(self, cycle: pd.Timestamp, params: dict[str, Param], fields: dict,
                     levels: list[int]) -> xr.Dataset:
        first = next(iter(fields.values()))
        coords = {"latitude": first.latitude, "longitude": first.longitude}
        data_vars = {}
        for name, p in params.items():
            var = get_variable(name)
            if p.levtype == "pl":
                stack = np.stack([fields[(p.param, lv)].values for lv in levels])[None] * p.scale
                native = xr.Dataset({name: (("time", "level", "latitude", "longitude"), stack)}, coords=coords)
            else:
                native = xr.Dataset({name: (("time", "latitude", "longitude"),
                                            fields[(p.param, None)].values[None] * p.scale)}, coords=coords)
            # One variable at a time: at 0.25° a float64 copy of every level of every variable is gigabytes.
            out = regrid(native, self.grid)[name].values.astype(np.float32)
            data_vars[name] = (native[name].dims, out, {"units": var.units, "long_name": var.long_name})
        ds = xr.Dataset(data_vars, coords={"time": np.array([cycle], dtype="datetime64[ns]"),
                                           "level": np.asarray(levels, dtype=np.int32),
                                           "latitude": self.grid.latitudes, "longitude": self.grid.longitudes})
        ds["expver"] = ("time", np.full(1, EXPVER_FINAL, dtype=np.int8))
        return ds

    def fetch(self, times: Sequence[pd.Timestamp], variables: Sequence[str], levels: Sequence[int]) -> xr.Dataset:
        """The analysis at each run time in ``times`` (CycleNotAvailable if one is not published)."""
        return xr.concat([self.fetch_cycle(t, variables, levels) for t in times], dim="time")
