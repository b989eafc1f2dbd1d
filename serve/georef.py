"""Where a map region's pixels are on the globe: the axes box in the PNG and a lon/lat lookup lattice.

The viewer turns the pointer into longitude and latitude without any cartography of its own: for each
region it reads the map's axes box as fractions of the image (left, top, right, bottom, from the
top-left corner) and a coarse lattice of lon/lat at evenly spaced points across that box, then
interpolates bilinearly between the four surrounding nodes in 3-D unit vectors (so the dateline and
the poles of the polar maps interpolate correctly). Nodes off the globe (Robinson's corners) are
``None``. The axes come from :func:`serve.render.map_axes`, the very set-up the renderer draws with,
so the lookup cannot drift from the PNGs; everything is a fraction, so it holds at every dpi.

:func:`lonlat_at` is the reference of the viewer's interpolation (``serve/static/readout.js``).
"""

from __future__ import annotations

import math
from typing import Any

import cartopy.crs as ccrs
import numpy as np
from matplotlib.figure import Figure

from serve.regions import Region
from serve.render import map_axes

LATTICE_COLUMNS = 97
"""Lattice nodes across the axes box (96 cells); rows follow the box's aspect ratio (about 55 on the global map)."""
DECIMALS = 4
"""Degrees are rounded to 1e-4 (about 11 m): far below a map pixel, and it keeps the JSON small."""
POLE_LAT = 89.999
"""A lattice node this close to a pole is on it (its longitude says where along a pole line, not a direction)."""
_PLATE_CARREE = ccrs.PlateCarree()
_LAYOUT_DPI = 100  # any dpi gives the same fractions; this one only sizes the throwaway figure


def _on_globe(crs: ccrs.Projection, x: np.ndarray, y: np.ndarray, lon: np.ndarray, lat: np.ndarray,
              scale: float) -> np.ndarray:
    """Points whose inverse projection is finite and projects back where it started (Robinson's corners do not)."""
    valid = np.isfinite(lon) & np.isfinite(lat) & (np.abs(lat) <= 90.0)
    if isinstance(crs, ccrs.PlateCarree):
        return valid
    back = crs.transform_points(_PLATE_CARREE, np.where(valid, lon, 0.0), np.where(valid, lat, 0.0))
    return valid & (np.hypot(back[:, 0] - x, back[:, 1] - y) < 1e-6 * scale)


def axes_layout(region: Region) -> tuple[tuple[float, float, float, float], Any]:
    """The region's axes box as image fractions (left, top, right, bottom) and the axes themselves."""
    fig = Figure(figsize=region.figsize, dpi=_LAYOUT_DPI)
    ax = map_axes(fig, region)
    pos = ax.get_position()  # figure fractions from the bottom-left, after apply_aspect
    return (float(pos.x0), float(1.0 - pos.y1), float(pos.x1), float(1.0 - pos.y0)), ax


def georef(region: Region, columns: int = LATTICE_COLUMNS) -> dict[str, Any]:
    """The region's pixel → lon/lat description the viewer reads (box, lattice; JSON-ready)."""
    box, ax = axes_layout(region)
    left, top, right, bottom = box
    aspect = (bottom - top) * region.figsize[1] / ((right - left) * region.figsize[0])
    rows = max(2, int(round((columns - 1) * aspect)) + 1)
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    u = np.linspace(0.0, 1.0, columns)
    v = np.linspace(0.0, 1.0, rows)  # from the top of the box down
    gx, gy = np.meshgrid(x0 + u * (x1 - x0), y1 - v * (y1 - y0))
    crs = ax.projection
    pts = _PLATE_CARREE.transform_points(crs, gx.ravel(), gy.ravel())
    scale = max(abs(x1 - x0), abs(y1 - y0))
    ok = _on_globe(crs, gx.ravel(), gy.ravel(), pts[:, 0], pts[:, 1], scale)
    lon = np.round(pts[:, 0], DECIMALS)
    lat = np.round(pts[:, 1], DECIMALS)
    return {
        "region": region.name,
        "projection": region.projection,
        "extent": list(region.extent) if region.extent is not None else None,
        "box": [round(f, 6) for f in box],
        "columns": columns,
        "rows": rows,
        # Row-major from the box's top-left node; null where the node is off the globe.
        "lon": [float(a) if k else None for a, k in zip(lon, ok, strict=True)],
        "lat": [float(a) if k else None for a, k in zip(lat, ok, strict=True)],
    }


def _unit(lon: float, lat: float) -> np.ndarray:
    lo, la = math.radians(lon), math.radians(lat)
    return np.array([math.cos(la) * math.cos(lo), math.cos(la) * math.sin(lo), math.sin(la)])


def lonlat_at(ref: dict[str, Any], fx: float, fy: float) -> tuple[float, float] | None:
    """Lon/lat at image fractions (fx, fy) from a :func:`georef` answer; None outside the map or off the globe."""
    left, top, right, bottom = ref["box"]
    u, v = (fx - left) / (right - left), (fy - top) / (bottom - top)
    if not (0.0 <= u <= 1.0 and 0.0 <= v <= 1.0):
        return None
    cols, rows = ref["columns"], ref["rows"]
    gi, gj = u * (cols - 1), v * (rows - 1)
    i0, j0 = min(int(gi), cols - 2), min(int(gj), rows - 2)
    wi, wj = gi - i0, gj - j0
    nearest = (j0 + (wj >= 0.5)) * cols + i0 + (wi >= 0.5)
    if ref["lon"][nearest] is None:
        return None
    corners = []
    for dj, di, w in ((0, 0, (1 - wi) * (1 - wj)), (0, 1, wi * (1 - wj)), (1, 0, (1 - wi) * wj), (1, 1, wi * wj)):
        k = (j0 + dj) * cols + i0 + di
        if ref["lon"][k] is not None and w > 0:
            corners.append((ref["lon"][k], ref["lat"][k], w))
    weight = sum(w for _, _, w in corners)
    if any(abs(la) >= POLE_LAT for _, la, _ in corners):
        # A pole drawn as a line (Robinson, PlateCarree): its nodes' longitudes are meaningful and a unit
        # vector would lose them, so a cell that spans little longitude interpolates in lon/lat.
        base = next((lo for lo, la, _ in corners if abs(la) < POLE_LAT), corners[0][0])
        lons = [base + (lo - base + 180.0) % 360.0 - 180.0 for lo, _, _ in corners]
        if max(lons) - min(lons) < 90.0:
            lon = sum(lo * w for lo, (_, _, w) in zip(lons, corners, strict=True)) / weight
            lat = sum(la * w for _, la, w in corners) / weight
            return (lon + 180.0) % 360.0 - 180.0, lat
    total = sum(w * _unit(lo, la) for lo, la, w in corners)
    x, y, z = total / np.linalg.norm(total)
    return math.degrees(math.atan2(y, x)), math.degrees(math.asin(max(-1.0, min(1.0, z))))
