"""Bilinear interpolation on the equiangular grid with poles, as four indices and weights per point.

The grid (:mod:`core.grid`) has ``nlat`` rows from 90 to −90 (both poles are rows) and ``nlon``
columns at ``0, Δ, …, 360−Δ``. A point (lat, lon) lies in the cell between rows ``i0, i0+1`` and
columns ``j0, j1 = (j0+1) mod nlon``: longitude wraps, so a point between ``360−Δ`` and 360 is
interpolated between the last column and the first. Longitudes are accepted in −180 … 360 and
normalised to [0, 360); latitudes in [−90, 90]. A pole is an ordinary row here: at lat = ±90 the
weights fall on that row alone, and the value still varies with longitude if the field does
(the grid stores one value per column on the pole row, and bilinear keeps them).

The value at a point is ``sum_k w[k] * field[ilat[k], ilon[k]]`` with ``sum_k w[k] == 1``; on a
grid node the node's weight is exactly 1 and the others exactly 0, so the answer is the stored
value bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.errors import ConfigError

# A fractional index this close to an integer is that node: grid latitudes come from linspace, and
# (90 − lat)/Δ for a node's own latitude can land a few ulps below the integer.
_SNAP = 1e-9


@dataclass(frozen=True)
class Weights:
    """For each of ``n`` points: four (row, column) indices and their bilinear weights, shapes ``(n, 4)``."""

    ilat: np.ndarray
    ilon: np.ndarray
    w: np.ndarray

    def apply(self, field: np.ndarray) -> np.ndarray:
        """Interpolate a ``(..., nlat, nlon)`` field to the points: shape ``(..., n)``."""
        corners = field[..., self.ilat, self.ilon]  # (..., n, 4)
        return np.einsum("...nk,nk->...n", corners.astype(np.float64), self.w)


def normalise_lon(lon: np.ndarray) -> np.ndarray:
    """Longitudes in −180 … 360 mapped to [0, 360) (360 itself becomes 0)."""
    lon = np.asarray(lon, dtype=np.float64)
    return np.where(lon < 0, lon + 360.0, np.where(lon >= 360.0, lon - 360.0, lon))


def check_points(lat: np.ndarray, lon: np.ndarray) -> None:
    """Raise ``ValueError`` naming the first coordinate that is not finite or out of range."""
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    for name, values, lo, hi in (("latitude", lat, -90.0, 90.0), ("longitude", lon, -180.0, 360.0)):
        bad = ~np.isfinite(values) | (values < lo) | (values > hi)
        if bad.any():
            raise ConfigError(f"{name} {float(values[bad][0]):g} is outside {lo:g} … {hi:g}")


def _split(f: np.ndarray, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer cell index in 0 … n_cells−1 and fraction in [0, 1] from a fractional index."""
    near = np.rint(f)
    f = np.where(np.abs(f - near) < _SNAP, near, f)
    i0 = np.clip(np.floor(f), 0, n_cells - 1).astype(np.intp)
    return i0, f - i0


def bilinear_weights(lat: np.ndarray, lon: np.ndarray, nlat: int, nlon: int) -> Weights:
    """Four neighbours and bilinear weights of each (lat, lon) point on the ``nlat × nlon`` grid with poles."""
    lat = np.atleast_1d(np.asarray(lat, dtype=np.float64))
    lon = np.atleast_1d(np.asarray(lon, dtype=np.float64))
    check_points(lat, lon)
    dlat, dlon = 180.0 / (nlat - 1), 360.0 / nlon
    # Rows: nlat−1 cells between the nlat rows; the last cell ends on the south pole row.
    i0, fy = _split((90.0 - lat) / dlat, nlat - 1)
    # Columns: nlon cells, the last one between column nlon−1 and column 0 (= 360°); a longitude that
    # snaps up to 360 lands in that last cell with fraction 1, i.e. on column 0.
    j0, fx = _split(normalise_lon(lon) / dlon, nlon)
    i1 = np.minimum(i0 + 1, nlat - 1)
    j1 = (j0 + 1) % nlon
    ilat = np.stack([i0, i0, i1, i1], axis=1)
    ilon = np.stack([j0, j1, j0, j1], axis=1)
    w = np.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx], axis=1)
    return Weights(ilat=ilat, ilon=ilon, w=w)
