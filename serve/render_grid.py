"""The projection of a lat/lon grid onto the pixels of a map's axes, computed once per region.

For every output pixel centre the projection's inverse transform gives a longitude and latitude;
from those come the four source cells around it and their bilinear weights (longitude wraps, the
poles clamp). A frame is then four gathers and a weighted sum: a smooth field on exactly the
axes' pixels, no per-frame reprojection.
"""

from __future__ import annotations

from dataclasses import dataclass

import cartopy.crs as ccrs
import numpy as np

from core.errors import DataContractError

_PLATE_CARREE = ccrs.PlateCarree()


@dataclass
class PixelGrid:
    """Source cells and bilinear weights of each pixel of a (ny, nx) image in a projection's coordinates."""

    xs: np.ndarray
    """Pixel-centre x in the projection's coordinates (left → right)."""
    ys: np.ndarray
    """Pixel-centre y (bottom → top: row 0 is the bottom row, imshow ``origin="lower"``)."""
    lon: np.ndarray
    """(ny, nx) longitude of each pixel centre (NaN outside the globe)."""
    lat: np.ndarray
    index: np.ndarray
    """(4, npix) flat indices into the source (lat, lon) field."""
    weights: np.ndarray
    """(4, npix) bilinear weights, float32."""
    valid: np.ndarray
    """(ny, nx) True where the pixel is on the globe."""

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx) of the image."""
        return self.valid.shape

    def gather(self, field: np.ndarray) -> np.ndarray:
        """The (lat, lon) ``field`` resampled onto the pixels (NaN off the globe), float32."""
        flat = np.ascontiguousarray(field, dtype=np.float32).reshape(-1)
        out = flat[self.index[0]] * self.weights[0]
        for k in range(1, 4):
            out += flat[self.index[k]] * self.weights[k]
        out = out.reshape(self.shape)
        out[~self.valid] = np.nan
        return out


def _fractional_lat(lat: np.ndarray, plat: np.ndarray) -> np.ndarray:
    """Fractional row index of each latitude in a monotonic (ascending or descending) ``lat``."""
    n = lat.size
    if lat[0] > lat[-1]:
        return (n - 1) - np.interp(plat, lat[::-1], np.arange(n, dtype=float))
    return np.interp(plat, lat, np.arange(n, dtype=float))


def pixel_grid(crs: ccrs.Projection, xlim: tuple[float, float], ylim: tuple[float, float], nx: int, ny: int,
               lat: np.ndarray, lon: np.ndarray) -> PixelGrid:
    """Bilinear weights from a regular (lat, lon) grid to the ``nx × ny`` pixel centres of an extent."""
    lat, lon = np.asarray(lat, dtype=float), np.asarray(lon, dtype=float)
    steps = np.diff(lon)
    if lon.size < 2 or not np.allclose(steps, 360.0 / lon.size, rtol=1e-6, atol=1e-9):
        raise DataContractError(f"map grid longitudes must be regular and cover 360° ({lon.size} values)")
    xs = xlim[0] + (np.arange(nx) + 0.5) * (xlim[1] - xlim[0]) / nx
    ys = ylim[0] + (np.arange(ny) + 0.5) * (ylim[1] - ylim[0]) / ny
    gx, gy = np.meshgrid(xs, ys)
    pts = _PLATE_CARREE.transform_points(crs, gx.ravel(), gy.ravel())
    plon, plat = pts[:, 0], pts[:, 1]
    valid = np.isfinite(plon) & np.isfinite(plat) & (np.abs(plat) <= 90.0)
    if not isinstance(crs, ccrs.PlateCarree):
        # Off-globe points of a pseudo-cylindrical projection (Robinson's corners) can come back finite:
        # a round trip that does not land where it started is not on the globe.
        back = crs.transform_points(_PLATE_CARREE, np.where(valid, plon, 0.0), np.where(valid, plat, 0.0))
        scale = max(abs(xlim[1] - xlim[0]), abs(ylim[1] - ylim[0]))
        valid &= np.hypot(back[:, 0] - gx.ravel(), back[:, 1] - gy.ravel()) < 1e-6 * scale
    plon, plat = np.where(valid, plon, 0.0), np.where(valid, plat, 0.0)
    nlat, nlon = lat.size, lon.size
    fi = np.clip(_fractional_lat(lat, plat), 0, nlat - 1)
    i0 = np.minimum(np.floor(fi).astype(np.int64), nlat - 2)
    wy = (fi - i0).astype(np.float32)
    fj = ((plon - lon[0]) % 360.0) / (360.0 / nlon)
    j0 = np.floor(fj).astype(np.int64) % nlon
    wx = (fj - np.floor(fj)).astype(np.float32)
    j1 = (j0 + 1) % nlon
    index = np.stack([i0 * nlon + j0, i0 * nlon + j1, (i0 + 1) * nlon + j0, (i0 + 1) * nlon + j1]).astype(np.int32)
    weights = np.stack([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx]).astype(np.float32)
    shape = (ny, nx)
    return PixelGrid(xs, ys, np.where(valid, plon, np.nan).reshape(shape), np.where(valid, plat, np.nan).reshape(shape),
                     index, weights, valid.reshape(shape))


def vector_rotation(crs: ccrs.Projection, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of the angle from east to the projection's +x at each point (rotates u, v onto the map)."""
    if isinstance(crs, ccrs.PlateCarree):
        return np.ones_like(lon), np.zeros_like(lon)
    ux, uy = crs.transform_vectors(_PLATE_CARREE, lon, lat, np.ones_like(lon), np.zeros_like(lon))
    norm = np.hypot(ux, uy)
    norm[norm == 0] = 1.0
    return ux / norm, uy / norm
