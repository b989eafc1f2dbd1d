"""The fast map renderer: one figure per (product, region), reused for every frame.

Built once per (product, region): the figure, the projected axes, the pixel grid (every output pixel's
source cells and bilinear weights, :mod:`serve.render_grid`), coastlines, borders and graticule
(projected once into plain line collections), the colorbar and the attribution. A frame then only
gathers the fields onto the pixels, swaps the image data, redraws the contours (on the same pixel
grid, in the axes' own coordinates) and the barbs, sets the title, and encodes the canvas as PNG.
The last frame's prepared data stays on :attr:`MapRenderer.frame` so tests check values, not pixels.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import cartopy.crs as ccrs
import cartopy.feature as cfeature
import cmocean  # noqa: F401  (registers the cmo.* colormaps)
import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.colors import BoundaryNorm
from matplotlib.figure import Figure
from PIL import Image
from shapely.geometry import LineString

from serve.products import Product
from serve.regions import Region
from serve.render_grid import PixelGrid, pixel_grid, vector_rotation

BARBS_ACROSS = 22
"""Barbs per map width; rows follow the aspect ratio, so every frame has the same fixed set."""
MS_TO_KNOTS = 1.943844
CONTOUR_STRIDE = 2
"""Contours are traced on every 2nd pixel: lines stay smooth at a quarter of the cost."""
PNG_COMPRESSION = 3
"""zlib level of the PNGs: maps are flat colour, so level 3 is within a few % of 6 at half the time."""
_AX_RECT = (0.02, 0.2, 0.96, 0.73)  # before apply_aspect; serve/georef.py tells the viewer the box that results
_CBAR_RECT = (0.2, 0.12, 0.6, 0.03)
_PLATE_CARREE = ccrs.PlateCarree()


@dataclass
class FrameData:
    """What one frame hands to matplotlib, in display units (for tests and the bench)."""

    shade: np.ndarray
    levels: tuple[float, ...]
    units: str
    contour: np.ndarray | None
    contour_levels: tuple[float, ...]
    barb_u: np.ndarray | None
    barb_v: np.ndarray | None
    title: str


def _vertices(geometries: Iterable[Any]) -> list[np.ndarray]:
    """Vertex arrays (lon, lat) of line and polygon-outline geometries."""
    out: list[np.ndarray] = []
    for geom in geometries:
        for part in getattr(geom, "geoms", [geom]):
            ring = part if isinstance(part, LineString) else getattr(part, "exterior", None)
            if ring is not None and len(ring.coords) > 1:
                out.append(np.asarray(ring.coords)[:, :2])
    return out


def project_lines(lines: list[np.ndarray], crs: ccrs.Projection, extent: tuple[float, float, float, float] | None,
                  limits: tuple[float, float, float, float]) -> list[np.ndarray]:
    """Lon/lat polylines in the map's coordinates, vectorised (cartopy's geometry projection is ~100× slower).

    Lines wholly outside a regional box (with a margin) are dropped; a line is cut where it leaves
    the globe or jumps across the map (a wrap), and the axes clip what overhangs.
    """
    if not lines:
        return []
    if extent is not None:
        lo0, lo1, la0, la1 = extent
        margin = 15.0
        wide = lo1 - lo0 >= 300

        def near(v: np.ndarray) -> bool:
            if v[:, 1].max() < la0 - margin or v[:, 1].min() > la1 + margin:
                return False
            if wide:
                return True
            centre = (lo0 + lo1) / 2
            rel = (v[:, 0] - centre + 180.0) % 360.0 - 180.0
            return bool(np.any(np.abs(rel) <= (lo1 - lo0) / 2 + margin))

        lines = [v for v in lines if near(v)]
        if not lines:
            return []
    sizes = np.array([len(v) for v in lines])
    allv = np.concatenate(lines)
    xy = crs.transform_points(_PLATE_CARREE, allv[:, 0], allv[:, 1])[:, :2]
    jump = 0.25 * max(limits[1] - limits[0], limits[3] - limits[2])
    out: list[np.ndarray] = []
    for part in np.split(xy, np.cumsum(sizes)[:-1]):
        ok = np.all(np.isfinite(part), axis=1)
        step = np.hypot(*np.diff(part, axis=0).T)
        cut = np.flatnonzero(~ok[1:] | ~ok[:-1] | ~(step < jump)) + 1
        for piece in np.split(part, cut):
            piece = piece[np.all(np.isfinite(piece), axis=1)]
            if len(piece) > 1:
                out.append(piece)
    return out


def _graticule() -> list[np.ndarray]:
    """Meridians every 30° and parallels every 15° as lon/lat polylines."""
    lat = np.linspace(-90, 90, 181)
    lon = np.linspace(-180, 180, 361)
    meridians = [np.column_stack([np.full_like(lat, m), lat]) for m in np.arange(-180, 180, 30)]
    parallels = [np.column_stack([lon, np.full_like(lon, p)]) for p in np.arange(-75, 90, 15)]
    return meridians + parallels


def _layer(category: str, name: str, scale: str) -> list[np.ndarray]:
    # cartopy caches the geometries it reads per process; callers hold offline_natural_earth.
    return _vertices(cfeature.NaturalEarthFeature(category, name, scale).geometries())


_PIXEL_GRIDS: dict[tuple, PixelGrid] = {}
PIXEL_GRID_CACHE = 8
"""Pixel grids kept per process: one per region of a batch, shared by all its products."""


def cached_pixel_grid(region: Region, xlim: tuple[float, float], ylim: tuple[float, float], nx: int, ny: int,
                      lat: np.ndarray, lon: np.ndarray) -> PixelGrid:
    """The pixel grid of a region's axes, computed once per process and shared by every product drawn there."""
    key = (region.projection, repr(sorted(region.projection_kwargs.items())), tuple(xlim), tuple(ylim), nx, ny,
           np.asarray(lat, dtype=float).tobytes(), np.asarray(lon, dtype=float).tobytes())
    grid = _PIXEL_GRIDS.get(key)
    if grid is None:
        grid = pixel_grid(region.crs(), xlim, ylim, nx, ny, lat, lon)
        while len(_PIXEL_GRIDS) >= PIXEL_GRID_CACHE:
            _PIXEL_GRIDS.pop(next(iter(_PIXEL_GRIDS)))
        _PIXEL_GRIDS[key] = grid
    return grid


def map_axes(fig: Figure, region: Region, crs: ccrs.Projection | None = None) -> Any:
    """The region's map axes on ``fig``, placed, extended and aspect-fixed as every map PNG has them.

    The one place the map's position in the image is decided: the renderer draws into these axes and
    :mod:`serve.georef` reads pixel → lon/lat from them, so the viewer's lookup cannot drift from the PNGs.
    """
    ax = fig.add_axes(_AX_RECT, projection=crs if crs is not None else region.crs())
    if region.extent is None:
        ax.set_global()
    else:
        ax.set_extent(region.extent, crs=_PLATE_CARREE)
    ax.apply_aspect()
    # The map frame stays (the geo spine); tick machinery of the map axes is never needed.
    ax.xaxis.set_visible(False)
    ax.yaxis.set_visible(False)
    return ax


class MapRenderer:
    """A reusable map of one product over one region; :meth:`render` draws one frame to PNG bytes."""

    def __init__(self, product: Product, region: Region, lat: np.ndarray, lon: np.ndarray, dpi: int,
                 earth: bool = True, attribution: str = "", borders: bool = True) -> None:
        self.product, self.region, self.dpi = product, region, dpi
        self.crs = region.crs()
        self.fig = Figure(figsize=region.figsize, dpi=dpi)
        self.canvas = FigureCanvasAgg(self.fig)
        ax = map_axes(self.fig, region, self.crs)
        self.ax = ax
        bbox = ax.get_window_extent()
        nx, ny = max(int(round(bbox.width)), 8), max(int(round(bbox.height)), 8)
        xlim, ylim = ax.get_xlim(), ax.get_ylim()
        self.grid = cached_pixel_grid(region, xlim, ylim, nx, ny, lat, lon)
        self.extent = (xlim[0], xlim[1], ylim[0], ylim[1])
        cmap = colormaps[product.cmap]
        extend = "max" if product.levels[0] == 0 else "both"
        self.norm = BoundaryNorm(product.levels, cmap.N, extend=extend)
        blank = np.full(self.grid.shape, np.nan, dtype=np.float32)
        # Plain matplotlib imshow in the axes' own coordinates: the pixels are already projected.
        self.image = Axes.imshow(ax, blank, cmap=cmap, norm=self.norm, origin="lower", extent=self.extent,
                                 interpolation="nearest", resample=False, transform=ax.transData, zorder=1)
        self.image.set_clip_path(ax.patch)
        ax.set_xlim(xlim)
        ax.set_ylim(ylim)
        self.coastlines: LineCollection | None = None
        self.borders: LineCollection | None = None
        if earth:
            coast = (_layer("physical", "coastline", region.coastlines))
            self.coastlines = self._static(self._project(coast), "coastlines", 0.6, "black")
            if borders:
                lines = (_layer("cultural", "admin_0_boundary_lines_land", self.region.coastlines))
                self.borders = self._static(self._project(lines), "borders", 0.4, "#333333")
        self._graticule_lines = self._static(self._project(_graticule()), "graticule", 0.3, "#808080", alpha=0.6)
        cax = self.fig.add_axes(_CBAR_RECT)
        label = product.convert.units + (" (barbs: kt)" if product.barbs else "")
        self.fig.colorbar(self.image, cax=cax, orientation="horizontal", extend=extend,
                          spacing="uniform").set_label(label, fontsize=8)
        cax.tick_params(labelsize=7)
        self.colorbar_ax = cax
        self.title = self.fig.text(0.5, 0.99, "", ha="center", va="top", fontsize=8)
        self.fig.text(0.995, 0.006, attribution, ha="right", va="bottom", fontsize=5.5, color="#444444")
        self._contours: object | None = None
        self._barbs: object | None = None
        self._barb_setup()
        self.frame: FrameData | None = None
        # Blitting: everything that never changes (colorbar, frame background, attribution) is drawn once
        # and kept as pixels; each frame restores them and draws only the changing and the overlying artists.
        self._overlay = [c for c in (self.coastlines, self.borders, self._graticule_lines) if c is not None]
        for artist in (self.image, self.title, *self._overlay, ax.spines["geo"]):
            artist.set_animated(True)
        self.canvas.draw()
        self._background = self.canvas.copy_from_bbox(self.fig.bbox)

    def _project(self, lines: list[np.ndarray]) -> list[np.ndarray]:
        return project_lines(lines, self.crs, self.region.extent, self.extent)

    def _static(self, lines: list[np.ndarray], gid: str, width: float, color: str, alpha: float = 1.0) -> LineCollection:
        collection = LineCollection(lines, linewidths=width, colors=color, alpha=alpha, zorder=3, gid=gid)
        self.ax.add_collection(collection, autolim=False)
        return collection

    def _barb_setup(self) -> None:
        """Fixed barb positions on the pixel grid (on the globe) and their east→map rotation."""
        if self.product.barbs is None:
            return
        ny, nx = self.grid.shape
        across = BARBS_ACROSS
        down = max(2, int(round(across * ny / nx)))
        cols = ((np.arange(across) + 0.5) * nx / across).astype(int)
        rows = ((np.arange(down) + 0.5) * ny / down).astype(int)
        rr, cc = np.meshgrid(rows, cols, indexing="ij")
        keep = self.grid.valid[rr, cc]
        self.barb_rows, self.barb_cols = rr[keep], cc[keep]
        lon, lat = self.grid.lon[rr[keep], cc[keep]], self.grid.lat[rr[keep], cc[keep]]
        self.barb_cos, self.barb_sin = vector_rotation(self.crs, lon, lat)
        self.barb_south = lat < 0

    def prepare(self, fields: dict[str, np.ndarray], title: str) -> FrameData:
        """Gather and convert one frame's fields onto the pixels (display units); nothing is drawn."""
        p = self.product
        if p.speed:
            u, v = (self.grid.gather(fields[c]) for c in p.shade)
            shade = p.convert(np.hypot(u, v))
        else:
            u = v = None
            shade = p.convert(self.grid.gather(fields[p.shade[0]]))
        contour = None
        if p.contour:
            raw = fields[p.contour]
            contour = p.contour_convert(self.grid.gather(raw)) if p.contour_convert else self.grid.gather(raw)
        bu = bv = None
        if p.barbs is not None:
            if u is None or p.barbs != p.shade:
                u, v = (self.grid.gather(fields[c]) for c in p.barbs)
            eu, ev = u[self.barb_rows, self.barb_cols], v[self.barb_rows, self.barb_cols]
            bu = eu * self.barb_cos - ev * self.barb_sin
            bv = eu * self.barb_sin + ev * self.barb_cos
        return FrameData(shade, p.levels, p.convert.units, contour, p.contour_levels, bu, bv, title)

    def draw(self, frame: FrameData) -> None:
        """Put a prepared frame on the figure (image data, contours, barbs, title)."""
        self.frame = frame
        self.image.set_data(np.ma.masked_invalid(frame.shade))
        if self._contours is not None:
            self._contours.remove()  # type: ignore[attr-defined]
            self._contours = None
        if frame.contour is not None:
            s = CONTOUR_STRIDE
            z = frame.contour[::s, ::s]
            cs = Axes.contour(self.ax, self.grid.xs[::s], self.grid.ys[::s], np.ma.masked_invalid(z),
                              levels=list(frame.contour_levels), colors="black", linewidths=0.7, zorder=4)
            cs.set_clip_path(self.ax.patch)
            cs.set_animated(True)
            # Every other line labelled: enough to read the field, few enough to keep the map clear.
            for text in Axes.clabel(self.ax, cs, levels=cs.levels[::2], fontsize=5.5, fmt="%d", inline=True,
                                    inline_spacing=1):
                text.set_animated(True)
            self._contours = cs
        if frame.barb_u is not None:
            x, y = self.grid.xs[self.barb_cols], self.grid.ys[self.barb_rows]
            u, v = frame.barb_u * MS_TO_KNOTS, frame.barb_v * MS_TO_KNOTS
            if self._barbs is None:
                self._barbs = Axes.barbs(self.ax, x, y, u, v, length=4.2, linewidth=0.45, zorder=5,
                                         flip_barb=self.barb_south, animated=True)
            else:
                self._barbs.set_UVC(u, v)  # type: ignore[attr-defined]
        self.title.set_text(frame.title)

    def rgb(self) -> np.ndarray:
        """The figure with the current frame, as an (h, w, 3) uint8 array (static parts restored, not redrawn)."""
        self.canvas.restore_region(self._background)
        ax = self.ax
        # In z-order: field, coastlines and graticule, contours, barbs, the map frame, the title.
        for artist in (self.image, *self._overlay, self._contours, self._barbs, ax.spines["geo"]):
            if artist is not None:
                ax.draw_artist(artist)
        for text in getattr(self._contours, "labelTexts", ()):
            ax.draw_artist(text)
        self.fig.draw_artist(self.title)
        return np.asarray(self.canvas.buffer_rgba())[..., :3].copy()

    def render(self, fields: dict[str, np.ndarray], title: str) -> tuple[bytes, np.ndarray]:
        """One frame: PNG bytes (no timestamps: byte-identical on a rerun) and its RGB pixels."""
        self.draw(self.prepare(fields, title))
        rgb = self.rgb()
        return png_bytes(rgb), rgb

    def close(self) -> None:
        """Drop the figure's artists so its memory is released promptly."""
        self.fig.clear()


def png_bytes(rgb: np.ndarray) -> bytes:
    """RGB pixels as PNG bytes (no metadata, so the bytes depend on the pixels only)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=PNG_COMPRESSION)
    return buf.getvalue()
