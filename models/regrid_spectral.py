"""Resolution transfer: an initial state moved to another equiangular grid by spherical-harmonic interpolation.

An SFNO acts on spherical-harmonic coefficients, so the same weights run on any grid (zero-shot).
What the finer grid needs is an initial state there. Conservative remapping from a coarser grid
gives a piecewise-constant field whose cell edges are grid-scale noise the model never saw;
band-limited interpolation instead keeps the coefficients both grids resolve and synthesises them
on the target grid. The truncation is at degree ``(nlat + 1) // 2`` of the smaller grid, where the
equiangular quadrature of the analysis is exact (as in the planet's sampling, ``ingest.sources``):
a field band-limited there moves to the other grid and back unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
import torch_harmonics as th
import xarray as xr

from core.errors import DataContractError
from core.grid import Grid

SPATIAL = ("latitude", "longitude")


def spectral_regrid(ds: xr.Dataset, grid: Grid) -> xr.Dataset:
    """Every (latitude, longitude) variable of ``ds`` moved to ``grid`` by truncated spherical-harmonic synthesis."""
    nlat, nlon = ds.sizes.get("latitude"), ds.sizes.get("longitude")
    if nlat is None or nlon is None:
        raise DataContractError("a resolution transfer needs latitude and longitude dimensions")
    if (nlat, nlon) == grid.shape:
        return ds.assign_coords(latitude=grid.latitudes, longitude=grid.longitudes)
    lat = np.asarray(ds["latitude"].values, dtype=float)
    if not (np.isclose(lat[0], 90.0) and np.isclose(lat[-1], -90.0)):
        raise DataContractError(f"a resolution transfer needs an equiangular grid from 90 to -90; latitude runs "
                                f"{lat[0]} .. {lat[-1]}")
    lmax = (min(nlat, grid.nlat) + 1) // 2
    mmax = min(nlon // 2 + 1, grid.nlon // 2 + 1, lmax)
    forward = th.RealSHT(nlat, nlon, lmax=lmax, mmax=mmax, grid="equiangular").double()
    inverse = th.InverseRealSHT(grid.nlat, grid.nlon, lmax=lmax, mmax=mmax, grid="equiangular").double()
    out = {}
    for name, da in ds.data_vars.items():
        if not set(SPATIAL) <= set(da.dims):
            out[name] = da
            continue
        lead = [d for d in da.dims if d not in SPATIAL]
        values = da.transpose(*lead, *SPATIAL).values
        if not np.all(np.isfinite(values)):
            raise DataContractError(f"variable {name!r} holds non-finite values; it cannot be moved to {grid.name}")
        with torch.no_grad():
            field = torch.from_numpy(values.reshape(-1, nlat, nlon).astype(np.float64))
            moved = inverse(forward(field)).numpy().astype(da.dtype)
        shape = tuple(da.sizes[d] for d in lead) + grid.shape
        out[name] = xr.DataArray(moved.reshape(shape), dims=(*lead, *SPATIAL), attrs=da.attrs).transpose(*da.dims)
    coords = {k: v for k, v in ds.coords.items() if not set(v.dims) & set(SPATIAL)}
    coords.update(latitude=("latitude", grid.latitudes, ds["latitude"].attrs),
                  longitude=("longitude", grid.longitudes, ds["longitude"].attrs))
    return xr.Dataset(out, coords=coords, attrs={**ds.attrs, "grid": grid.describe()})
