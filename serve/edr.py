"""OGC API-EDR queries on a published run: parameter parsing, the cached open dataset, point and area answers.

Parameters are the run's variables (``geopotential``, ``2m_temperature``); pressure-level variables
have a ``z`` dimension (hPa). One query names parameters of one kind: all pressure-level or all
single-level (their domains differ by the ``z`` axis). Times are valid times (init + lead).
Every malformed or impossible value raises :class:`~serve.catalog.BadParameter` naming the query
parameter; nothing here builds a path from request text (runs resolve through the catalog).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from core.runs import MANIFEST, RunGone, reading
from core.schema import validate_forecast
from core.variables import VARIABLES
from serve.catalog import BadParameter, Catalog, CatalogError, NotFound
from serve.interp import bilinear_weights, check_points

ZARR = "forecast.zarr"
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_POINT_RE = re.compile(rf"^\s*POINT\s*\(\s*({_NUM})\s+({_NUM})\s*\)\s*$", re.IGNORECASE)
_POLYGON_RE = re.compile(r"^\s*POLYGON\s*\(\s*\((?P<ring>[^()]*)\)\s*\)\s*$", re.IGNORECASE)
_PAIR_RE = re.compile(rf"^\s*({_NUM})\s+({_NUM})\s*$")


@dataclass(frozen=True)
class RunData:
    """A run's forecast opened lazily, with the axes queries select on."""

    run: str
    run_dir: Path
    ds: xr.Dataset
    valid_times: np.ndarray  # datetime64[ns], one per lead
    levels: np.ndarray  # int hPa (empty if the run has no level axis)
    lat: np.ndarray
    lon: np.ndarray
    members: int  # 0: deterministic run, no member dimension

    @property
    def parameters(self) -> list[str]:
        """Names of the run's data variables, in the order of the vocabulary (core.variables)."""
        return [name for name in VARIABLES if name in self.ds.data_vars]

    def describe_times(self) -> str:
        """One line: first … last valid time and the step."""
        first, last = (pd.Timestamp(t).strftime("%Y-%m-%dT%H:%MZ") for t in (self.valid_times[0], self.valid_times[-1]))
        if self.valid_times.size < 2:
            return first
        step = pd.Timedelta(self.valid_times[1] - self.valid_times[0])
        return f"{first} … {last} every {step.total_seconds() / 3600:g} h"


@dataclass
class Answer:
    """Values of a query on its domain: ``values[p]`` has shape (t, [z,] y, x), NaN where there is no value."""

    domain_type: str | None
    times: np.ndarray
    levels: np.ndarray | None  # None: single-level parameters, no z axis
    y: np.ndarray
    x: np.ndarray
    values: dict[str, np.ndarray]

    def count(self) -> int:
        """How many values the answer holds (nulls included)."""
        return sum(int(v.size) for v in self.values.values())


@lru_cache(maxsize=16)
def _open(zarr_path: str, run: str, ino: int, mtime_ns: int, size: int) -> RunData:
    # Keyed on the manifest's identity: a republished run is a new directory (new inode), so a
    # cached handle never serves a replaced run.
    ds = xr.open_zarr(zarr_path, consolidated=False, chunks=None)
    validate_forecast(ds, what=f"run {run} {ZARR}")
    valid = np.asarray(ds["valid_time"].values[0], dtype="datetime64[ns]")
    levels = np.asarray(ds["level"].values, dtype=np.int64) if "level" in ds.coords else np.array([], np.int64)
    return RunData(run=run, run_dir=Path(zarr_path).parent, ds=ds, valid_times=valid, levels=levels,
                   lat=np.asarray(ds["latitude"].values, float), lon=np.asarray(ds["longitude"].values, float),
                   members=int(ds.sizes.get("member", 0)))


def open_run(catalog: Catalog, run: str) -> RunData:
    """The run's forecast, opened once per published version of the run and shared between requests."""
    run_dir = catalog.run_dir(run)
    manifest = catalog.manifest(run)
    if f"{ZARR}/zarr.json" not in manifest["files"]:
        raise NotFound(f"run {run!r} has no {ZARR}, so it cannot answer EDR queries")
    try:
        with reading(run_dir):
            st = (run_dir / MANIFEST).stat()
            return _open(str(run_dir / ZARR), run, st.st_ino, st.st_mtime_ns, st.st_size)
    except RunGone as exc:
        raise NotFound(f"run {run!r} is not a published run") from exc
    except (OSError, ValueError, KeyError) as exc:
        raise CatalogError(f"run {run!r}: {ZARR} cannot be opened: {exc}") from exc


# Parsing ------------------------------------------------------------------------------------------


def parse_point(coords: str) -> tuple[float, float]:
    """``POINT(lon lat)`` → (lon, lat), checked: lon in −180 … 360, lat in −90 … 90."""
    m = _POINT_RE.match(coords)
    if not m:
        raise BadParameter(f"coords {coords[:80]!r} is not a WKT POINT(lon lat)")
    lon, lat = float(m.group(1)), float(m.group(2))
    try:
        check_points(np.array([lat]), np.array([lon]))
    except ValueError as exc:
        raise BadParameter(f"coords: {exc}") from None
    return lon, lat


def parse_polygon(coords: str) -> np.ndarray:
    """``POLYGON((lon lat, …))`` → (n, 2) array of one closed ring (n ≥ 4) in one continuous longitude frame."""
    m = _POLYGON_RE.match(coords)
    if not m:
        raise BadParameter(f"coords {coords[:80]!r} is not a WKT POLYGON((lon lat, …)) with one ring (no holes)")
    pairs = [_PAIR_RE.match(p) for p in m.group("ring").split(",")]
    if not all(pairs):
        raise BadParameter("coords: every POLYGON position must be two numbers 'lon lat' separated by commas")
    ring = np.array([[float(p.group(1)), float(p.group(2))] for p in pairs if p])
    if len(ring) < 4:
        raise BadParameter(f"coords: a POLYGON ring needs at least 4 positions (first = last), got {len(ring)}")
    if not np.array_equal(ring[0], ring[-1]):
        raise BadParameter("coords: the POLYGON ring does not close (its last position must equal its first)")
    try:
        check_points(ring[:, 1], ring[:, 0])
    except ValueError as exc:
        raise BadParameter(f"coords: {exc}") from None
    if ring[:, 0].max() - ring[:, 0].min() >= 360:
        raise BadParameter("coords: the POLYGON spans 360° of longitude or more; give it in one frame "
                           "(e.g. 170 … 190 or −10 … 10 across a seam)")
    return ring


def parse_parameters(text: str | None, data: RunData) -> list[str]:
    """``a,b`` → the run's parameters named, one kind (pressure-level or single-level) at a time."""
    known = data.parameters
    if text is None or not text.strip():
        names = known
    else:
        names = list(dict.fromkeys(n.strip() for n in text.split(",")))
        unknown = [n for n in names if n not in known]
        if unknown:
            raise BadParameter(f"parameter-name {unknown[0]!r} is not a parameter of run {data.run}; "
                               f"known: {', '.join(known)}")
    kinds = {VARIABLES[n].level_type for n in names}
    if len(kinds) > 1 and (text is None or not text.strip()):
        by_kind = {k: ", ".join(n for n in names if VARIABLES[n].level_type == k) for k in ("pressure", "single")}
        raise BadParameter(f"parameter-name is needed: run {data.run} has pressure-level parameters "
                           f"({by_kind['pressure']}) and single-level ones ({by_kind['single']}); name one kind")
    if len(kinds) > 1:
        raise BadParameter("parameter-name mixes pressure-level and single-level parameters "
                           f"({', '.join(names)}); query each kind separately")
    return names


def parse_z(text: str | None, data: RunData, pressure: bool) -> np.ndarray | None:
    """``z`` as ``500``, ``500,850`` or ``250/700`` (levels within) → indices into the run's levels."""
    if not pressure:
        if text is not None:
            raise BadParameter("z is given but the parameters asked for are single-level (they have no z)")
        return None
    levels = data.levels
    if text is None:
        return np.arange(levels.size)
    known = ", ".join(str(v) for v in levels)
    try:
        bounds = [float(v) for v in text.split("/")] if "/" in text else None
        wanted = [] if bounds else [float(v) for v in text.split(",")]
    except ValueError:
        raise BadParameter(f"z {text[:40]!r} is not a level, a list 'a,b' or an interval 'a/b' (hPa)") from None
    if not np.all(np.isfinite(bounds or wanted)):
        raise BadParameter(f"z {text[:40]!r} must be finite pressure levels (hPa)")
    if bounds is not None:
        if len(bounds) != 2:
            raise BadParameter(f"z {text[:40]!r} is not an interval 'a/b' (hPa)")
        lo, hi = min(bounds), max(bounds)
        idx = np.flatnonzero((levels >= lo) & (levels <= hi))
        if idx.size == 0:
            raise BadParameter(f"z interval {text[:40]!r} holds no level of run {data.run}; levels: {known}")
        return idx
    idx = []
    for v in wanted:
        hit = np.flatnonzero(levels == v)
        if hit.size == 0:
            raise BadParameter(f"z {v:g} is not a level of run {data.run}; levels: {known}")
        idx.append(int(hit[0]))
    return np.array(list(dict.fromkeys(idx)))


def _instant(text: str, what: str) -> np.datetime64:
    try:
        ts = pd.Timestamp(text.strip())
    except (ValueError, TypeError):
        raise BadParameter(f"datetime {what} {text[:40]!r} is not an ISO 8601 time") from None
    if ts is pd.NaT:
        raise BadParameter(f"datetime {what} {text[:40]!r} is not an ISO 8601 time")
    if ts.tzinfo is not None:
        ts = ts.tz_convert("UTC").tz_localize(None)
    return ts.to_datetime64().astype("datetime64[ns]")


def parse_datetime(text: str | None, data: RunData) -> np.ndarray:
    """``datetime`` (an instant, ``a/b``, ``../b``, ``a/..`` or absent) → indices of the run's valid times."""
    times = data.valid_times
    if text is None or not text.strip():
        return np.arange(times.size)
    if "/" in text:
        parts = text.split("/")
        if len(parts) != 2:
            raise BadParameter(f"datetime {text[:60]!r} is not an instant or an interval 'start/end'")
        lo = times[0] if parts[0].strip() in ("..", "") else _instant(parts[0], "start")
        hi = times[-1] if parts[1].strip() in ("..", "") else _instant(parts[1], "end")
        idx = np.flatnonzero((times >= lo) & (times <= hi))
        if idx.size == 0:
            raise BadParameter(f"datetime {text[:60]!r} is outside the run, valid times are {data.describe_times()}")
        return idx
    idx = np.flatnonzero(times == _instant(text, "instant"))
    if idx.size == 0:
        raise BadParameter(f"datetime {text[:60]!r} is not a valid time of the run, valid times are "
                           f"{data.describe_times()}")
    return idx


def parse_member(member: int | None, data: RunData) -> int | None:
    """Index of the ``member`` asked for (default 0, the control); a deterministic run has member 0 only."""
    count = max(data.members, 1)
    if member is not None and not 0 <= member < count:
        raise NotFound(f"member {member} is not a member of run {data.run} (members: 0 … {count - 1})")
    if data.members == 0:
        return None  # no member dimension to select on
    return member or 0


# Reading ------------------------------------------------------------------------------------------


def _block(data: RunData, name: str, t: np.ndarray, z: np.ndarray | None, member: int | None,
           rows: np.ndarray | slice, cols: np.ndarray) -> np.ndarray:
    """Values of one parameter as (t, [z,] rows, cols), reading only those chunks' cells."""
    sel: dict[str, object] = {"init_time": 0, "lead_time": t, "latitude": rows, "longitude": cols}
    if member is not None:
        sel["member"] = member
    if z is not None:
        sel["level"] = z
    return np.asarray(data.ds[name].variable.isel(sel).values)


def position(data: RunData, lon: float, lat: float, names: list[str], t: np.ndarray,
             z: np.ndarray | None, member: int | None) -> Answer:
    """Bilinear values at one point: each parameter read on the 2×2 neighbourhood only."""
    wts = bilinear_weights(np.array([lat]), np.array([lon]), data.lat.size, data.lon.size)
    rows, cols = np.unique(wts.ilat), np.unique(wts.ilon)
    # Positions of the four corners inside the (rows, cols) block read below.
    r = np.searchsorted(rows, wts.ilat[0])
    c = np.searchsorted(cols, wts.ilon[0])
    values = {}
    with reading(data.run_dir):
        for name in names:
            block = _block(data, name, t, z, member, rows, cols)
            v = np.einsum("...k,k->...", block[..., r, c].astype(np.float64), wts.w[0])
            values[name] = v[..., None, None]
    n_t, n_z = t.size, (0 if z is None else z.size)
    domain = "PointSeries" if n_z <= 1 else ("VerticalProfile" if n_t == 1 else None)
    return Answer(domain_type=domain, times=data.valid_times[t], levels=None if z is None else data.levels[z],
                  y=np.array([lat]), x=np.array([lon]), values=values)


def inside(ring: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Even–odd test of points (x, y) against a closed ring, vectorised over points, looping over edges."""
    result = np.zeros(x.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(ring[:-1], ring[1:], strict=True):
        if y1 == y2:
            continue  # a horizontal edge never crosses a horizontal ray
        crosses = (y1 > y) != (y2 > y)
        x_at = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        result ^= crosses & (x < x_at)
    return result


def area_domain(data: RunData, ring: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, columns (grid indices) of the polygon's bounding grid box and the inside mask (rows × cols).

    Columns are listed in the polygon's own longitude frame: a polygon over −10 … 10 gets the
    columns stored at 350 … 360−Δ (reported as −10 … −Δ) then 0 … 10.
    """
    west, east = ring[:, 0].min(), ring[:, 0].max()
    south, north = ring[:, 1].min(), ring[:, 1].max()
    rows = np.flatnonzero((data.lat >= south) & (data.lat <= north))
    frame = west + np.mod(data.lon - west, 360.0)  # each column's longitude in [west, west + 360)
    cols = np.flatnonzero(frame <= east)
    cols = cols[np.argsort(frame[cols], kind="stable")]
    xx, yy = np.meshgrid(frame[cols], data.lat[rows])
    return rows, cols, inside(ring, xx, yy)


def area_count(data: RunData, rows: np.ndarray, cols: np.ndarray, names: list[str], t: np.ndarray,
               z: np.ndarray | None) -> int:
    """Values an area answer would hold: bounding grid points × parameters × times × levels."""
    return int(rows.size * cols.size * len(names) * t.size * (1 if z is None else z.size))


def area(data: RunData, ring: np.ndarray, rows: np.ndarray, cols: np.ndarray, mask: np.ndarray,
         names: list[str], t: np.ndarray, z: np.ndarray | None, member: int | None) -> Answer:
    """Grid values on the polygon's bounding grid box, NaN outside the polygon."""
    west = ring[:, 0].min()
    values = {}
    with reading(data.run_dir):
        for name in names:
            if rows.size and cols.size:
                block = _block(data, name, t, z, member, slice(int(rows[0]), int(rows[-1]) + 1), cols)
            else:
                block = np.empty((t.size,) + (() if z is None else (z.size,)) + (rows.size, cols.size), np.float32)
            values[name] = np.where(mask, block, np.nan)
    return Answer(domain_type="Grid", times=data.valid_times[t], levels=None if z is None else data.levels[z],
                  y=data.lat[rows], x=west + np.mod(data.lon[cols] - west, 360.0), values=values)

