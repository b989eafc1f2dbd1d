"""First-order conservative (area-weighted) regridding between global regular latitude/longitude grids.

Cells
    Every grid point owns the cell bounded by the midpoints to its neighbours. In latitude the
    outermost points own everything up to the pole: a point *on* a pole owns the polar cap from
    ±90° to the midpoint towards its neighbour, which is the cell definition of
    :attr:`core.grid.Grid.weights` (so those weights are exactly this module's normalised
    destination cell areas, see :func:`cell_areas`). In longitude a point at λ with spacing Δ owns
    [λ − Δ/2, λ + Δ/2], taken periodically (the cell of 0° straddles the 360° seam).
Weights
    Cells are latitude bands × longitude sectors, so the spherical area of an overlap separates:
    ``area = R² · Δ(sin φ) · Δλ``. The overlap of a source and a destination band is measured in
    sin(latitude) — exact spherical area, not degrees — and that of two sectors in degrees with
    periodic wrap. Normalising each row by the destination cell's own extent gives two sparse
    matrices ``Wlat`` (nlat_dst × nlat_src) and ``Wlon`` (nlon_dst × nlon_src) whose rows sum to 1, and

        out = Wlat · field · Wlonᵀ

    is the area-weighted mean of the source over each destination cell. Constants stay constant,
    and because the destination cells tile the sphere exactly, the area-weighted global mean is
    conserved (to rounding): Σᵢ aᵢ (W f)ᵢ = Σₖ f_k Σᵢ overlapᵢₖ = Σₖ a_k f_k.
Cost
    Both matrices are tiny and sparse (≈ nlat_src + nlat_dst non-zeros), never a dense
    (721·1440) × (33·64) operator. Dask-backed input is remapped lazily, one spatial block at a
    time; NumPy input is processed in batches of fields so memory stays bounded.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
import xarray as xr

from core.errors import DataContractError
from core.grid import Grid

log = logging.getLogger(__name__)

SPATIAL = ("latitude", "longitude")
_TOL = 1e-6
_BATCH_BYTES = 64 * 2**20  # float64 working set per batch of NumPy fields


def _describe(lat: np.ndarray, lon: np.ndarray) -> str:
    # Longitude extent as the shortest arc holding all points, so a box across 0° reads "-10…2".
    east = np.sort(np.mod(lon, 360.0))
    gaps = np.diff(np.concatenate([east, east[:1] + 360.0]))
    k = int(np.argmax(gaps))
    start, end = east[(k + 1) % east.size], east[k]
    start = start - 360.0 if start > end else start
    return f"{lat.size}x{lon.size}, latitude {lat.max():g}…{lat.min():g}, longitude {start:g}…{end:g}"


def check_global(lat: np.ndarray, lon: np.ndarray, what: str = "source grid") -> None:
    """Raise ``ValueError`` naming the extent unless (lat, lon) is a regular global grid."""
    lat, lon = np.asarray(lat, dtype=float), np.asarray(lon, dtype=float)
    if lat.size < 2 or lon.size < 2:
        raise DataContractError(f"{what} is not global: only {lat.size}x{lon.size} points")
    s = np.sort(lat)[::-1]
    if np.any(np.diff(s) == 0):
        raise DataContractError(f"{what}: latitude has repeated values")
    # The outermost cells must reach the poles: a point on the pole, or half a spacing from it.
    top, bottom = s[0] + (s[0] - s[1]) / 2, s[-1] - (s[-2] - s[-1]) / 2
    reaches_poles = top >= 90 - _TOL and bottom <= -90 + _TOL and s[0] <= 90 + _TOL and s[-1] >= -90 - _TOL
    wraps = np.allclose(np.diff(np.sort(np.mod(lon, 360.0))), 360.0 / lon.size, atol=_TOL)
    if not (reaches_poles and wraps):
        raise DataContractError(f"{what} is not global ({_describe(lat, lon)}); conservative regridding needs "
                                "a regular global grid whose cells reach both poles and wrap in longitude")


def _lat_bounds(lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # (upper, lower) band edges in sin(latitude), in the order the points are given.
    order = np.argsort(-lat, kind="stable")
    s = lat[order]
    mid = (s[:-1] + s[1:]) / 2
    upper = np.sin(np.deg2rad(np.concatenate([[90.0], mid])))
    lower = np.sin(np.deg2rad(np.concatenate([mid, [-90.0]])))
    out_u, out_l = np.empty_like(upper), np.empty_like(lower)
    out_u[order], out_l[order] = upper, lower
    return out_u, out_l


def cell_areas(lat: np.ndarray) -> np.ndarray:
    """Area of each latitude band of this module's cells as a fraction of the sphere (sums to 1)."""
    upper, lower = _lat_bounds(np.asarray(lat, dtype=float))
    return (upper - lower) / 2.0


def _lat_weights(src: np.ndarray, dst: np.ndarray) -> sp.csr_matrix:
    su, sl = _lat_bounds(src)
    du, dl = _lat_bounds(dst)
    overlap = np.minimum(du[:, None], su[None, :]) - np.maximum(dl[:, None], sl[None, :])
    overlap = np.clip(overlap, 0.0, None)
    return sp.csr_matrix(overlap / (du - dl)[:, None])


def _lon_weights(src: np.ndarray, dst: np.ndarray) -> sp.csr_matrix:
    def bounds(lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        half = 180.0 / lon.size
        centre = np.mod(lon, 360.0)
        return centre - half, centre + half

    sa, sb = bounds(src)
    da, db = bounds(dst)
    overlap = np.zeros((dst.size, src.size))
    for shift in (-360.0, 0.0, 360.0):  # periodic wrap: a sector may straddle the 0/360 seam
        overlap += np.clip(np.minimum(db[:, None], sb[None, :] + shift)
                           - np.maximum(da[:, None], sa[None, :] + shift), 0.0, None)
    return sp.csr_matrix(overlap / (db - da)[:, None])


def conservative_weights(src_lat: np.ndarray, src_lon: np.ndarray, dst_lat: np.ndarray,
                         dst_lon: np.ndarray) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Sparse ``(Wlat, Wlon)`` with ``out = Wlat @ field @ Wlon.T`` for global grids in any order."""
    src_lat, src_lon = np.asarray(src_lat, dtype=float), np.asarray(src_lon, dtype=float)
    dst_lat, dst_lon = np.asarray(dst_lat, dtype=float), np.asarray(dst_lon, dtype=float)
    check_global(src_lat, src_lon, "source grid")
    check_global(dst_lat, dst_lon, "destination grid")
    wlat, wlon = _lat_weights(src_lat, dst_lat), _lon_weights(src_lon, dst_lon)
    wlat.eliminate_zeros()
    wlon.eliminate_zeros()
    return wlat, wlon


def _apply(block: np.ndarray, wlat: sp.csr_matrix, wlon: sp.csr_matrix) -> np.ndarray:
    lead, (nlat, nlon) = block.shape[:-2], block.shape[-2:]
    nlat_d, nlon_d = wlat.shape[0], wlon.shape[0]
    fields = block.reshape(-1, nlat, nlon)
    out_dtype = block.dtype if np.issubdtype(block.dtype, np.floating) else np.float64
    out = np.empty((fields.shape[0], nlat_d, nlon_d), dtype=out_dtype)
    batch = max(1, _BATCH_BYTES // (nlat * nlon * 8))
    for start in range(0, fields.shape[0], batch):
        x = np.asarray(fields[start:start + batch], dtype=np.float64)
        b = x.shape[0]
        # Longitude first (rows stay contiguous), then latitude on the much smaller result.
        y = (wlon @ x.reshape(-1, nlon).T).T.reshape(b, nlat, nlon_d)
        z = wlat @ y.transpose(1, 0, 2).reshape(nlat, b * nlon_d)
        out[start:start + b] = z.reshape(nlat_d, b, nlon_d).transpose(1, 0, 2)
    return out.reshape(lead + (nlat_d, nlon_d))


def _matches(lat: np.ndarray, lon: np.ndarray, grid: Grid) -> bool:
    return (lat.shape == grid.latitudes.shape and lon.shape == grid.longitudes.shape
            and np.allclose(lat, grid.latitudes, atol=_TOL) and np.allclose(lon, grid.longitudes, atol=_TOL))


def regrid(ds: xr.Dataset, grid: Grid) -> xr.Dataset:
    """Conservatively remap every (latitude, longitude) variable of ``ds`` onto ``grid``."""
    missing = [d for d in SPATIAL if d not in ds.dims]
    if missing:
        raise DataContractError(f"regrid needs dimensions {SPATIAL}; the dataset lacks {missing}")
    lat = np.asarray(ds["latitude"].values, dtype=float)
    lon = np.asarray(ds["longitude"].values, dtype=float)
    if _matches(lat, lon, grid):
        # Same grid: relabel with the exact target coordinates, values untouched (no copy).
        return ds.assign_coords(latitude=grid.latitudes, longitude=grid.longitudes)
    wlat, wlon = conservative_weights(lat, lon, grid.latitudes, grid.longitudes)
    log.debug("regrid %s → %s", _describe(lat, lon), grid.describe())
    out = {}
    for name, da in ds.data_vars.items():
        spatial = [d for d in SPATIAL if d in da.dims]
        if not spatial:
            out[name] = da
            continue
        if len(spatial) == 1:
            raise DataContractError(f"variable {name!r} has {spatial[0]!r} but not both latitude and longitude")
        if da.chunks is not None:
            da = da.chunk({"latitude": -1, "longitude": -1})
        dtype = da.dtype if np.issubdtype(da.dtype, np.floating) else np.dtype(np.float64)
        remapped = xr.apply_ufunc(
            _apply, da, kwargs={"wlat": wlat, "wlon": wlon},
            input_core_dims=[list(SPATIAL)], output_core_dims=[list(SPATIAL)], exclude_dims=set(SPATIAL),
            dask="parallelized", output_dtypes=[dtype],
            dask_gufunc_kwargs={"output_sizes": {"latitude": grid.nlat, "longitude": grid.nlon}},
            keep_attrs=True,
        )
        out[name] = remapped.transpose(*da.dims)
    coords = {k: v for k, v in ds.coords.items() if not set(v.dims) & set(SPATIAL)}
    coords.update(latitude=("latitude", grid.latitudes, ds["latitude"].attrs),
                  longitude=("longitude", grid.longitudes, ds["longitude"].attrs))
    return xr.Dataset(out, coords=coords, attrs=ds.attrs)
