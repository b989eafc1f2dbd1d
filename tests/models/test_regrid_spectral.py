"""Resolution transfer of an initial state: band-limited interpolation between equiangular grids."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from core.grid import get_grid
from models.regrid_spectral import spectral_regrid


def band_limited(grid_name: str, seed: int = 0) -> xr.Dataset:
    """A smooth field of low-degree harmonics (as cos/sin of lat/lon products) plus a time-only flag."""
    g = get_grid(grid_name)
    phi, lam = np.deg2rad(g.latitudes)[:, None], np.deg2rad(g.longitudes)[None, :]
    rng = np.random.default_rng(seed)
    a, b, c = rng.normal(size=3)
    # Degrees ≤ 3: resolved by every preset, so coarse → fine → coarse must return it unchanged.
    field = 5.0 + a * np.sin(phi) + b * np.cos(phi) * np.cos(lam) + c * np.cos(phi) ** 2 * np.sin(2 * lam)
    data = np.stack([field, 2 * field]).astype(np.float64)
    return xr.Dataset({"geopotential": (("time", "latitude", "longitude"), data, {"units": "m**2 s**-2"}),
                       "done": ("time", np.array([1, 1], dtype=np.int8))},
                      coords={"time": np.array(["2000-01-01T00", "2000-01-01T06"], dtype="datetime64[ns]"),
                              "latitude": g.latitudes, "longitude": g.longitudes})


def test_a_band_limited_field_moves_to_a_finer_grid_exactly_and_back() -> None:
    coarse = band_limited("tiny")
    fine = spectral_regrid(coarse, get_grid("5.625deg"))
    assert fine["geopotential"].shape == (2, 33, 64) and fine["geopotential"].attrs["units"] == "m**2 s**-2"
    expected = band_limited("5.625deg")
    np.testing.assert_allclose(fine["geopotential"].values, expected["geopotential"].values, atol=1e-9)
    back = spectral_regrid(fine, get_grid("tiny"))
    np.testing.assert_allclose(back["geopotential"].values, coarse["geopotential"].values, atol=1e-9)
    np.testing.assert_array_equal(fine["done"].values, [1, 1])  # variables without a grid are carried over
    assert fine.attrs["grid"] == get_grid("5.625deg").describe()


def test_the_same_grid_is_left_untouched_and_bad_input_is_refused() -> None:
    ds = band_limited("tiny")
    assert spectral_regrid(ds, get_grid("tiny"))["geopotential"].equals(ds["geopotential"])
    broken = ds.copy(deep=True)
    broken["geopotential"][0, 3, 4] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        spectral_regrid(broken, get_grid("5.625deg"))
    with pytest.raises(ValueError, match="from 90 to -90"):
        spectral_regrid(ds.isel(latitude=slice(None, None, -1)), get_grid("5.625deg"))
