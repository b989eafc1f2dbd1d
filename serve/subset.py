"""Download-time subsetting: parse a request, cut a published run's ``forecast.zarr`` lazily, size the answer.

Conventions (also in ``docs/subset.md``):

- ``bbox=W,S,E,N`` in degrees; latitudes within ±90, longitudes within −180 … 360. Points on the
  box's edges are included (to 1e-6°). ``S > N`` is refused; ``W > E`` (after taking both modulo
  360) is a box across 0°/360° or the dateline, walked eastward from ``W``.
- The answer's longitudes are the run's own (0 … 360−Δ), increasing eastward; when the box's grid
  points cross 0° the ones east of it continue past 360: ``170,-10,-170,10`` answers 170 … 190 and
  ``-10,-10,10,10`` answers 350 … 370 (on a 1° grid). So a box written in −180 … 180 or in 0 … 360
  gives the same answer. A box 360° wide or more is the whole globe on the run's own axis.
- Variables come in the vocabulary's order (:data:`core.variables.VARIABLES`); levels (hPa), leads
  (hours) and members in the run's order; whatever order they are asked in. Single-level
  variables ignore ``levels``.

Nothing here reads data values: :func:`select` builds a lazy (dask) selection whose chunks are read
only when a writer in :mod:`serve.subset_formats` pulls them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import xarray as xr

from core.forecast_files import check_grib_grid
from core.variables import VARIABLES
from serve.catalog import BadParameter

EPS = 1e-6
"""Tolerance, in degrees, for a grid point to count as on the box's edge."""
FORMATS: dict[str, tuple[str, str]] = {
    "nc": ("application/x-netcdf", "nc"),
    "grib2": ("application/x-grib2", "grib2"),
    "csv": ("text/csv; charset=utf-8", "csv"),
    "zarr.zip": ("application/zip", "zarr.zip"),
}
"""Offered formats: media type and file extension."""
PARAMETERS = ("bbox", "variables", "levels", "leads", "members", "format")
CSV_BYTES_PER_ROW = 64
"""Estimated text of a CSV row's coordinate columns (two ISO times, lead, member, latitude, longitude)."""
CSV_BYTES_PER_VALUE = 14
"""Estimated text of one float32 value in a CSV row (up to 9 significant digits, sign, exponent, comma)."""


@dataclass(frozen=True)
class BBox:
    """A lat/lon box in degrees as asked: west, south, east, north."""

    west: float
    south: float
    east: float
    north: float


@dataclass(frozen=True)
class SubsetQuery:
    """A parsed subset request; ``None`` means everything the run has."""

    bbox: BBox | None = None
    variables: tuple[str, ...] | None = None
    levels: tuple[int, ...] | None = None
    leads: tuple[int, ...] | None = None
    members: tuple[int, ...] | None = None
    format: str = "nc"


def parse_query(params: Mapping[str, Sequence[str]]) -> SubsetQuery:
    """Parse the query string (each name → its values) into a :class:`SubsetQuery`, or raise ``BadParameter``."""
    unknown = [name for name in params if name not in PARAMETERS]
    if unknown:
        raise BadParameter(f"query parameter {unknown[0]!r} is not known; known: {', '.join(PARAMETERS)}")
    single: dict[str, str] = {}
    for name, values in params.items():
        if len(values) != 1:
            raise BadParameter(f"query parameter {name!r} is given {len(values)} times; give it once "
                               "(lists are comma-separated)")
        single[name] = values[0]
    fmt = single.get("format", "nc")
    if fmt not in FORMATS:
        raise BadParameter(f"parameter 'format' {fmt!r} is not offered; offered: {', '.join(FORMATS)}")
    return SubsetQuery(
        bbox=parse_bbox(single["bbox"]) if "bbox" in single else None,
        variables=_names(single["variables"], "variables") if "variables" in single else None,
        levels=_ints(single["levels"], "levels") if "levels" in single else None,
        leads=_ints(single["leads"], "leads") if "leads" in single else None,
        members=_ints(single["members"], "members") if "members" in single else None,
        format=fmt,
    )


def parse_bbox(text: str) -> BBox:
    """``W,S,E,N`` in degrees (latitudes ±90, longitudes −180 … 360, S ≤ N) into a :class:`BBox`."""
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(parts) != 4 or len(values) != 4:
        raise BadParameter(f"parameter 'bbox' {text!r} is not 4 comma-separated numbers W,S,E,N")
    if not all(math.isfinite(v) for v in values):
        raise BadParameter(f"parameter 'bbox' {text!r} holds a value that is not a finite number")
    west, south, east, north = values
    for name, v in (("south", south), ("north", north)):
        if not -90 <= v <= 90:
            raise BadParameter(f"parameter 'bbox' {name} latitude {v:g} is outside -90 … 90")
    for name, v in (("west", west), ("east", east)):
        if not -180 <= v <= 360:
            raise BadParameter(f"parameter 'bbox' {name} longitude {v:g} is outside -180 … 360")
    if south > north:
        raise BadParameter(f"parameter 'bbox' is reversed: south {south:g} is north of north {north:g} (order W,S,E,N)")
    return BBox(west, south, east, north)


def _items(text: str, name: str) -> list[str]:
    items = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in items):
        raise BadParameter(f"parameter {name!r} {text!r} has an empty item; give comma-separated values")
    return list(dict.fromkeys(items))


def _names(text: str, name: str) -> tuple[str, ...]:
    return tuple(_items(text, name))


def _ints(text: str, name: str) -> tuple[int, ...]:
    out = []
    for item in _items(text, name):
        try:
            out.append(int(item))
        except ValueError:
            raise BadParameter(f"parameter {name!r} item {item!r} is not a whole number") from None
    return tuple(out)


def _positions(asked: tuple[int, ...] | tuple[str, ...], have: list, name: str, unit: str = "") -> list[int]:
    missing = [a for a in asked if a not in have]
    if missing:
        known = ", ".join(f"{h}{unit}" for h in have)
        raise BadParameter(f"parameter {name!r} asks for {missing[0]}{unit}, which this run does not have; "
                           f"known: {known}")
    return sorted(have.index(a) for a in asked)


def latitude_slice(lat: np.ndarray, south: float, north: float) -> slice:
    """Rows of a north→south latitude axis within ``[south, north]`` (edges included), as a slice."""
    rows = np.flatnonzero((lat >= south - EPS) & (lat <= north + EPS))
    return slice(int(rows[0]), int(rows[-1]) + 1) if rows.size else slice(0, 0)


def longitude_runs(lon: np.ndarray, west: float, east: float) -> list[tuple[slice, float]]:
    """Columns of a 0 … 360−Δ axis in the box from ``west`` eastward to ``east``: (slice, offset to add) runs.

    One run when the box's columns lie within 0 … 360−Δ, two when they cross 0° (the second run's
    longitudes get +360 so the answer's axis keeps increasing); ``[]`` when no column is inside.
    """
    if east - west >= 360 - EPS:
        return [(slice(0, lon.size), 0.0)]
    w, span = west % 360.0, (east - west) % 360.0
    if span > 360 - EPS:  # east is west plus a rounding error: a single meridian
        span = 0.0
    offset = (lon - w) % 360.0
    offset = np.where(offset > 360 - EPS, offset - 360, offset)  # a column a hair west of w is on the edge
    inside = np.flatnonzero(offset <= span + EPS)
    if inside.size == 0:
        return []
    after = inside[lon[inside] >= w - EPS]  # from w up to 360
    wrapped = inside[lon[inside] < w - EPS]  # past 360, i.e. from 0 eastward
    runs = []
    if after.size:
        runs.append((slice(int(after[0]), int(after[-1]) + 1), 0.0))
    if wrapped.size:
        # Past 360 only when points west of 0° come first; alone, the points keep the run's longitudes.
        runs.append((slice(int(wrapped[0]), int(wrapped[-1]) + 1), 360.0 if after.size else 0.0))
    return runs


def select(ds: xr.Dataset, query: SubsetQuery) -> xr.Dataset:
    """The lazy subset of a run's forecast for ``query``; ``BadParameter`` names a value the run lacks."""
    # Vocabulary order, as the GRIB2 writer uses: the store's own listing order is the filesystem's.
    names = sorted((str(n) for n in ds.data_vars), key=lambda n: (list(VARIABLES).index(n) if n in VARIABLES
                                                                 else len(VARIABLES), n))
    if query.variables is not None:
        names = [names[i] for i in _positions(query.variables, names, "variables")]
    sub = ds[names]
    if query.levels is not None:
        if "level" not in ds.dims:
            raise BadParameter("parameter 'levels' is given but this run has no pressure levels")
        levels = [int(v) for v in ds["level"].values]
        sub = sub.isel(level=_positions(query.levels, levels, "levels", " hPa")) if "level" in sub.dims else sub
    if query.leads is not None:
        hours = [int(h) for h in ds["lead_time"].values // np.timedelta64(1, "h")]
        sub = sub.isel(lead_time=_positions(query.leads, hours, "leads", " h"))
    if query.members is not None:
        if "member" not in ds.dims:
            raise BadParameter("parameter 'members' is given but this run is not an ensemble (it has no members)")
        sub = sub.isel(member=_positions(query.members, [int(m) for m in ds["member"].values], "members"))
    return _cut_box(sub, query.bbox) if query.bbox is not None else _describe(sub, ds)


def _cut_box(sub: xr.Dataset, bbox: BBox) -> xr.Dataset:
    lat = np.asarray(sub["latitude"].values, dtype=float)
    lon = np.asarray(sub["longitude"].values, dtype=float)
    rows = latitude_slice(lat, bbox.south, bbox.north)
    runs = longitude_runs(lon, bbox.west, bbox.east)
    if rows.stop <= rows.start or not runs:
        dlat, dlon = abs(lat[1] - lat[0]), lon[1] - lon[0]
        raise BadParameter(f"parameter 'bbox' {bbox.west:g},{bbox.south:g},{bbox.east:g},{bbox.north:g} selects "
                           f"no grid point: this run's grid spacing is {dlat:g}° in latitude and {dlon:g}° in "
                           "longitude; widen the box to hold at least one point")
    pieces = []
    for cols, shift in runs:
        piece = sub.isel(latitude=rows, longitude=cols)
        if shift:
            piece = piece.assign_coords(longitude=piece["longitude"] + shift)
        pieces.append(piece)
    cut = pieces[0] if len(pieces) == 1 else xr.concat(pieces, dim="longitude", data_vars="all",
                                                       coords="minimal", compat="override", join="outer")
    cut["longitude"].attrs = dict(sub["longitude"].attrs)
    return _describe(cut, sub)


def _describe(cut: xr.Dataset, source: xr.Dataset) -> xr.Dataset:
    # The cut is no contract grid any more: say which grid it came from and where it lies (ACDD names).
    lat, lon = cut["latitude"].values, cut["longitude"].values
    src_lat, src_lon = source["latitude"].values, source["longitude"].values
    attrs = {k: v for k, v in source.attrs.items() if k != "grid"}
    if "grid" in source.attrs:
        attrs["source_grid"] = source.attrs["grid"]
    attrs.update(geospatial_lat_min=float(lat.min()), geospatial_lat_max=float(lat.max()),
                 geospatial_lon_min=float(lon.min()), geospatial_lon_max=float(lon.max()),
                 geospatial_lat_resolution=float(abs(src_lat[1] - src_lat[0])),
                 geospatial_lon_resolution=float(src_lon[1] - src_lon[0]))
    cut.attrs = attrs
    return cut


def check_format(sub: xr.Dataset, fmt: str) -> None:
    """Raise ``BadParameter`` if format ``fmt`` cannot hold ``sub`` (GRIB2 and a box across 0°)."""
    if fmt == "grib2":
        try:
            check_grib_grid(sub)
        except ValueError as exc:
            raise BadParameter(f"parameter 'format' grib2 cannot hold this bbox ({exc}); ask for nc, zarr.zip or "
                               "csv, or for two boxes either side of 0°") from None


def estimate_bytes(sub: xr.Dataset, fmt: str) -> int:
    """Uncompressed size of the answer: values × itemsize, or for CSV rows × (coordinates + values as text)."""
    if fmt == "csv":
        rows = math.prod(sub.sizes[d] for d in ("lead_time", "member", "latitude", "longitude") if d in sub.sizes)
        columns = sum(sub.sizes.get("level", 1) if "level" in sub[n].dims else 1 for n in sub.data_vars)
        return rows * (CSV_BYTES_PER_ROW + CSV_BYTES_PER_VALUE * columns)
    return sum(int(sub[n].size) * sub[n].dtype.itemsize for n in sub.data_vars)
