"""Map PNGs of a forecast run: one per channel and lead time, ``maps/<channel>/<lead_h:03d>.png``.

Global PlateCarree maps (cartopy) of each field as cells (``pcolormesh``) with coastlines and a
colorbar in the vocabulary's units. The colour scale of a channel is fixed across the leads of a
run so an animation does not flicker; diverging variables are symmetric around zero.

Speed: one figure per channel is built once and reused for every lead by swapping the mesh's
data and the title, which keeps a 33×64 run with 3 channels × 21 leads to a few seconds.
Figures are plain :class:`matplotlib.figure.Figure` objects on an Agg canvas, never pyplot, so
no global backend or figure registry is touched and nothing leaks between calls.
"""

from __future__ import annotations

import io
import logging
import os
import re
from pathlib import Path

import cartopy.crs as ccrs
import cartopy.feature as cfeature
import numpy as np
import pandas as pd
import xarray as xr
from cartopy.mpl.geoaxes import GeoAxes
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from core.fields import to_channels
from core.variables import VARIABLES, Variable, parse_channel
from serve.cartopy_offline import offline_natural_earth
from serve.layout import MAPS_DIR, map_relpath

log = logging.getLogger(__name__)

FIGSIZE = (8.0, 4.6)
COASTLINE_RESOLUTION = "110m"
_PNG_METADATA = {"Software": None}  # byte-identical PNGs across matplotlib versions and reruns


def forecast_channels(forecast: xr.Dataset) -> list[str]:
    """Channels (``geopotential_500``, ``2m_temperature``) held by a forecast dataset."""
    channels: list[str] = []
    for name in forecast.data_vars:
        var = VARIABLES.get(str(name))
        if var is None:
            continue
        if var.level_type == "pressure":
            channels.extend(f"{name}_{int(lv)}" for lv in forecast["level"].values)
        else:
            channels.append(str(name))
    return channels


def lead_hours(forecast: xr.Dataset) -> list[int]:
    """Lead times of a forecast in whole hours; ``ValueError`` if one is not a whole hour."""
    hours = forecast["lead_time"].values / np.timedelta64(1, "h")
    if not np.allclose(hours, np.round(hours)):
        raise ValueError(f"forecast lead_time {hours.tolist()} h are not whole hours (map names need them)")
    return [int(h) for h in np.round(hours)]


def color_limits(values: np.ndarray | xr.DataArray, variable: Variable) -> tuple[float, float]:
    """Colour scale (vmin, vmax) covering all finite ``values``; symmetric about 0 if diverging."""
    data = np.asarray(values, dtype=float)
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return (-1.0, 1.0) if variable.diverging else (0.0, 1.0)
    lo, hi = float(finite.min()), float(finite.max())
    if variable.diverging:
        bound = max(abs(lo), abs(hi)) or 1.0
        return -bound, bound
    if hi - lo <= 1e-12 * max(abs(lo), abs(hi), 1.0):
        # A constant field still needs a non-degenerate norm to draw at all.
        pad = max(abs(lo) * 1e-3, 1e-6)
        return lo - pad, hi + pad
    return lo, hi


def pretty_units(units: str) -> str:
    """CF-style ``m**2 s**-2`` as mathtext superscripts for a colorbar label."""
    return re.sub(r"\*\*(-?\d+)", r"$^{\1}$", units)


def channel_label(channel: str) -> str:
    """Human name of a channel: ``Geopotential 500 hPa``, ``2 metre temperature``."""
    name, level = parse_channel(channel)
    return VARIABLES[name].long_name + (f" {level} hPa" if level is not None else "")


def map_title(channel: str, init: pd.Timestamp, lead_h: int, valid: pd.Timestamp, prefix: str = "") -> str:
    """Title of one map: ``<long name> <level> hPa — init <init> +<lead>h (valid <valid>)``."""
    fmt = "%Y-%m-%d %HUTC"
    return f"{prefix}{channel_label(channel)} — init {init.strftime(fmt)} +{lead_h}h (valid {valid.strftime(fmt)})"


def _cell_edges(lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell edges on a −180…180 x axis and the column order that fills it with no seam.

    Columns are rolled so the map spans −180…180 and padded with one wrapped column on each
    side; the axes' extent clips the overhang, so there is never a gap at the date line or 0°.
    """
    nlon = lon.size
    step = 360.0 / nlon
    centres = np.where(lon >= 180.0, lon - 360.0, lon)
    order = np.argsort(centres, kind="stable")
    order = np.concatenate([order[-1:], order, order[:1]])
    first = np.sort(centres)[0]
    x_edges = first - 1.5 * step + step * np.arange(nlon + 3)
    mids = (lat[:-1] + lat[1:]) / 2
    y_edges = np.concatenate([[np.clip(lat[0] + (lat[0] - mids[0]), -90, 90)], mids,
                              [np.clip(lat[-1] - (mids[-1] - lat[-1]), -90, 90)]])
    return x_edges, y_edges, order


class _MapCanvas:
    """One reusable figure for a channel: mesh, coastlines, colorbar; lead times swap the data."""

    def __init__(self, lat: np.ndarray, lon: np.ndarray, variable: Variable,
                 limits: tuple[float, float], dpi: int) -> None:
        self.dpi = dpi
        self.fig = Figure(figsize=FIGSIZE, dpi=dpi)
        FigureCanvasAgg(self.fig)
        ax: GeoAxes = self.fig.add_axes((0.02, 0.2, 0.96, 0.73), projection=ccrs.PlateCarree())
        self.x_edges, self.y_edges, self.order = _cell_edges(lat, lon)
        blank = np.ma.masked_all((lat.size, self.order.size))
        # Plain matplotlib pcolormesh: the edges are already in the axes' own PlateCarree degrees,
        # and cartopy's wrapper would re-project and split the deliberately overhanging columns.
        self.mesh = Axes.pcolormesh(ax, self.x_edges, self.y_edges, blank, cmap=variable.cmap,
                                    norm=Normalize(*limits), shading="flat")
        ax.add_feature(cfeature.NaturalEarthFeature("physical", "coastline", COASTLINE_RESOLUTION),
                       facecolor="none", edgecolor="black", linewidth=0.6)
        ax.set_extent((-180, 180, -90, 90), crs=ccrs.PlateCarree())
        cax = self.fig.add_axes((0.2, 0.12, 0.6, 0.03))
        self.fig.colorbar(self.mesh, cax=cax, orientation="horizontal").set_label(pretty_units(variable.units))
        self.title = ax.set_title("", fontsize=9)
        self.ax = ax

    def update(self, values: np.ndarray, title: str) -> None:
        """Show a new (lat, lon) field under a new title."""
        self.mesh.set_array(np.ma.masked_invalid(np.asarray(values)[:, self.order]))
        self.title.set_text(title)

    def save(self, path: Path) -> None:
        """Write the current state as PNG, atomically (tmp file + rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.fig.savefig(tmp, format="png", dpi=self.dpi, metadata=_PNG_METADATA)
        os.replace(tmp, path)

    def png_bytes(self) -> bytes:
        """The current state as PNG bytes."""
        buf = io.BytesIO()
        self.fig.savefig(buf, format="png", dpi=self.dpi, metadata=_PNG_METADATA)
        return buf.getvalue()

    def close(self) -> None:
        """Drop the figure's artists so its memory is released promptly."""
        self.fig.clear()


def _reduce_members(forecast: xr.Dataset) -> tuple[xr.Dataset, str]:
    if "member" in forecast.dims:
        return forecast.mean("member", keep_attrs=True), "Ensemble mean "
    return forecast, ""


def render_run_maps(forecast: xr.Dataset, out_dir: Path, dpi: int = 80,
                    natural_earth_dir: Path | None = None) -> list[Path]:
    """Render every channel × lead of a forecast run to ``out_dir/maps/<channel>/<lead:03d>.png``."""
    forecast, prefix = _reduce_members(forecast)
    if forecast.sizes.get("init_time") != 1:
        raise ValueError(f"forecast has init_time of size {forecast.sizes.get('init_time')}, expected 1")
    channels = forecast_channels(forecast)
    if not channels:
        raise ValueError("forecast holds no variables from the vocabulary to map")
    leads = lead_hours(forecast)
    init = pd.Timestamp(forecast["init_time"].values[0])
    valid = [pd.Timestamp(v) for v in forecast["valid_time"].values[0]]
    stack = to_channels(forecast, channels).isel(init_time=0).transpose("channel", "lead_time", "latitude", "longitude")
    lat = np.asarray(forecast["latitude"].values, dtype=float)
    lon = np.asarray(forecast["longitude"].values, dtype=float)
    written: list[Path] = []
    with offline_natural_earth(natural_earth_dir):
        for c, channel in enumerate(channels):
            # One channel in memory at a time: at 0.25° a run's full stack is gigabytes.
            data = np.asarray(stack.isel(channel=c).values)
            variable = VARIABLES[parse_channel(channel)[0]]
            canvas = _MapCanvas(lat, lon, variable, color_limits(data, variable), dpi)
            try:
                for i, lead in enumerate(leads):
                    canvas.update(data[i], map_title(channel, init, lead, valid[i], prefix))
                    path = out_dir / map_relpath(channel, lead)
                    canvas.save(path)
                    written.append(path)
            finally:
                canvas.close()
    log.info("rendered %d maps (%d channels × %d leads) into %s", len(written), len(channels), len(leads),
             out_dir / MAPS_DIR)
    return written


def _field_channel(field: xr.DataArray) -> str:
    name = str(field.name)
    if name in VARIABLES and VARIABLES[name].level_type == "pressure":
        if "level" not in field.coords or field["level"].size != 1:
            raise ValueError(f"field {name!r} needs a single 'level' coordinate to be mapped")
        return f"{name}_{int(field['level'].values)}"
    parse_channel(name)
    return name


def render_map_png(field: xr.DataArray, channel: str | None = None, title: str | None = None, dpi: int = 80,
                   limits: tuple[float, float] | None = None, natural_earth_dir: Path | None = None) -> bytes:
    """Render one (latitude, longitude) field as map PNG bytes, styled like the run maps."""
    channel = channel or _field_channel(field)
    variable = VARIABLES[parse_channel(channel)[0]]
    field = field.squeeze(drop=False)
    if set(field.dims) != {"latitude", "longitude"}:
        raise ValueError(f"render_map_png needs a (latitude, longitude) field, got dims {field.dims}")
    field = field.transpose("latitude", "longitude")
    if title is None:
        title = channel_label(channel)
        if {"init_time", "lead_time", "valid_time"} <= set(field.coords):
            lead_h = int(round(field["lead_time"].values / np.timedelta64(1, "h")))
            title = map_title(channel, pd.Timestamp(field["init_time"].values), lead_h,
                              pd.Timestamp(field["valid_time"].values))
    values = np.asarray(field.values)
    with offline_natural_earth(natural_earth_dir):
        canvas = _MapCanvas(np.asarray(field["latitude"].values, dtype=float),
                            np.asarray(field["longitude"].values, dtype=float),
                            variable, limits or color_limits(values, variable), dpi)
        try:
            canvas.update(values, title)
            return canvas.png_bytes()
        finally:
            canvas.close()
