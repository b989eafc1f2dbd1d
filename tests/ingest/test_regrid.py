"""Conservative regridding: global mean conserved, constants kept, identity, lazy and bounded, regional refused."""

from __future__ import annotations

import time
import tracemalloc

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from core.grid import Grid, get_grid
from ingest.regrid import cell_areas, conservative_weights, regrid

ERA5 = Grid("0.25deg", 721, 1440)
ONE_DEG = Grid("1deg", 181, 360)


def smooth_field(grid: Grid, seed: int, lead: tuple[int, ...] = ()) -> np.ndarray:
    """Random smooth field: a few low-order harmonics-like terms with random amplitudes and phases."""
    rng = np.random.default_rng(seed)
    phi = np.deg2rad(grid.latitudes)[:, None]
    lam = np.deg2rad(grid.longitudes)[None, :]
    out = np.zeros(lead + grid.shape)
    for _ in range(12):
        m, n = rng.integers(0, 8), rng.integers(0, 6)
        amp = rng.normal(size=lead + (1, 1)) if lead else rng.normal()
        out += amp * np.cos(phi) ** m * np.sin(phi) ** n * np.cos(m * lam + rng.uniform(0, 2 * np.pi))
    return 280.0 + 10.0 * out


def global_mean(field: np.ndarray, lat: np.ndarray) -> float:
    return float((cell_areas(lat)[:, None] * field).sum() / field.shape[-1])


def as_dataset(field: np.ndarray, grid: Grid, dims: tuple[str, ...] = ("latitude", "longitude")) -> xr.Dataset:
    return xr.Dataset({"t": (dims, field)}, coords={"latitude": grid.latitudes, "longitude": grid.longitudes})


def test_cell_areas_are_the_grid_weights() -> None:
    for grid in (ERA5, ONE_DEG, get_grid("tiny"), get_grid("5.625deg"), get_grid("2.8125deg")):
        np.testing.assert_allclose(cell_areas(grid.latitudes), grid.weights, rtol=1e-12)
        assert cell_areas(grid.latitudes).sum() == pytest.approx(1.0, abs=1e-14)


@pytest.mark.parametrize(("src", "dst"), [(ERA5, "5.625deg"), (ERA5, "tiny"), (ONE_DEG, "2.8125deg")])
def test_global_mean_is_conserved(src: Grid, dst: str) -> None:
    target = get_grid(dst)
    field = smooth_field(src, seed=target.nlat).astype(np.float32)
    out = regrid(as_dataset(field, src), target)["t"].values
    assert out.shape == target.shape and out.dtype == np.float32
    before = global_mean(field.astype(np.float64), src.latitudes)
    after = float((target.weights[:, None] * out.astype(np.float64)).sum() / target.nlon)
    assert abs(after - before) / abs(before) < 1e-4
    assert abs(after - before) / abs(before) < 1e-6  # float32 rounding is all that is lost
    # Exact in float64 even for rough data, where point sampling visibly is not.
    noise = 280.0 + 10.0 * np.random.default_rng(0).normal(size=src.shape)
    exact = regrid(as_dataset(noise, src), target)["t"].values
    truth = global_mean(noise, src.latitudes)
    assert abs(float((target.weights[:, None] * exact).sum() / target.nlon) - truth) / truth < 1e-12
    ilat = np.rint((90.0 - target.latitudes) / (180.0 / (src.nlat - 1))).astype(int)
    ilon = np.rint(target.longitudes / (360.0 / src.nlon)).astype(int) % src.nlon
    sampled = noise[np.ix_(ilat, ilon)]
    assert abs(float((target.weights[:, None] * sampled).sum() / target.nlon) - truth) / truth > 1e-5


def test_weights_are_sparse_rows_summing_to_one() -> None:
    target = get_grid("5.625deg")
    wlat, wlon = conservative_weights(ERA5.latitudes, ERA5.longitudes, target.latitudes, target.longitudes)
    assert wlat.shape == (33, 721) and wlon.shape == (64, 1440)
    np.testing.assert_allclose(np.asarray(wlat.sum(axis=1)).ravel(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(wlon.sum(axis=1)).ravel(), 1.0, rtol=1e-12)
    assert wlat.nnz < 2 * 721 and wlon.nnz < 2 * 1440
    # The 0° destination sector straddles the seam: it takes source columns from both ends.
    cols = wlon[0].indices
    assert 0 in cols and 1439 in cols


def test_constant_stays_constant_and_orientation_does_not_matter() -> None:
    target = get_grid("5.625deg")
    const = regrid(as_dataset(np.full(ONE_DEG.shape, 287.5, np.float32), ONE_DEG), target)["t"].values
    assert np.max(np.abs(const - 287.5)) <= 287.5 * np.finfo(np.float32).eps
    field = smooth_field(ONE_DEG, seed=3)
    flipped = as_dataset(field, ONE_DEG).isel(latitude=slice(None, None, -1), longitude=slice(None, None, -1))
    straight = regrid(as_dataset(field, ONE_DEG), target)["t"].values
    np.testing.assert_allclose(regrid(flipped, target)["t"].values, straight, rtol=1e-12)
    transposed = as_dataset(field.T, ONE_DEG, dims=("longitude", "latitude"))
    out = regrid(transposed, target)
    assert out["t"].dims == ("longitude", "latitude")
    np.testing.assert_allclose(out["t"].values.T, straight, rtol=1e-12)


def test_identity_when_grids_match_keeps_values_and_other_variables() -> None:
    target = get_grid("tiny")
    field = smooth_field(target, seed=5).astype(np.float32)
    ds = as_dataset(field, target)
    ds["expver"] = ("time", np.array([1, 5], np.int8))
    out = regrid(ds, target)
    assert np.shares_memory(out["t"].values, field)
    np.testing.assert_array_equal(out["expver"].values, [1, 5])
    assert out["latitude"].values is target.latitudes or np.array_equal(out["latitude"].values, target.latitudes)
    coarse = regrid(as_dataset(smooth_field(ONE_DEG, seed=1), ONE_DEG).assign(expver=ds["expver"]), target)
    np.testing.assert_array_equal(coarse["expver"].values, [1, 5])


def _lazy_slab(ntime: int, nlevel: int, nvar: int) -> xr.Dataset:
    phi = np.deg2rad(ERA5.latitudes)[:, None]
    lam = np.deg2rad(ERA5.longitudes)[None, :]

    def block(x: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        t, lv = block_info[None]["chunk-location"][:2]
        field = 250 + 20 * np.cos(phi) ** 2 + (t + 1) * np.sin(3 * lam + lv) * np.cos(phi) ** 3
        return field[None, None].astype(np.float32)

    shape, chunks = (ntime, nlevel) + ERA5.shape, (1, 1) + ERA5.shape
    data = {f"v{k}": (("time", "level", "latitude", "longitude"),
                      da.map_blocks(block, da.zeros(shape, chunks=chunks, dtype=np.float32), dtype=np.float32) + k)
            for k in range(nvar)}
    return xr.Dataset(data, coords={"latitude": ERA5.latitudes, "longitude": ERA5.longitudes})


def test_lazy_slab_from_era5_resolution_is_fast_and_bounded() -> None:
    slab = _lazy_slab(4, 13, 6)  # 1.3 GB at 0.25°
    target = get_grid("5.625deg")
    out = regrid(slab, target)
    assert out["v0"].chunks is not None  # still lazy
    tracemalloc.start()
    start = time.perf_counter()
    values = out.compute(scheduler="threads")
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"0.25° → 33x64, 4 times x 13 levels x 6 variables: {elapsed:.2f} s, peak traced {peak / 2**20:.0f} MiB")
    assert peak < 512 * 2**20
    one = slab["v2"].isel(time=3, level=7).values
    direct = regrid(as_dataset(one, ERA5), target)["t"].values
    np.testing.assert_allclose(values["v2"].isel(time=3, level=7).values, direct, rtol=1e-6)


def test_regional_grid_is_rejected_naming_its_extent() -> None:
    lat, lon = np.arange(58.0, 49.99, -0.25), np.arange(-10.0, 2.01, 0.25)
    uk = xr.Dataset({"t": (("latitude", "longitude"), np.zeros((lat.size, lon.size)))},
                    coords={"latitude": lat, "longitude": lon})
    with pytest.raises(ValueError, match=r"not global \(33x49, latitude 58…50, longitude -10…2\)"):
        regrid(uk, get_grid("tiny"))
    band = as_dataset(np.zeros(ONE_DEG.shape), ONE_DEG).isel(latitude=slice(10, -10))
    with pytest.raises(ValueError, match="not global"):
        regrid(band, get_grid("tiny"))
    with pytest.raises(ValueError, match="lacks"):
        regrid(xr.Dataset({"t": ("x", [1.0])}), get_grid("tiny"))
