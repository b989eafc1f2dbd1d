"""Map products: display units, fixed levels and overlays, checked on the data handed to matplotlib."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from matplotlib.axes import Axes

from core.config import MapBox, RenderConfig
from core.grid import get_grid
from core.testing import analysis_dataset
from serve.cartopy_offline import offline_natural_earth
from serve.maps import attribution
from serve.products import product_channels, products_for
from serve.regions import REGIONS, resolve_regions
from serve.render import MapRenderer
from serve.render_grid import pixel_grid

ALL_VARIABLES = ("geopotential", "temperature", "u_component_of_wind", "v_component_of_wind",
                 "mean_sea_level_pressure", "2m_temperature", "10m_u_component_of_wind", "10m_v_component_of_wind")


def weather(grid: str = "tiny", periods: int = 3, seed: int = 0) -> xr.Dataset:
    """An analysis with every mapped variable at 500 and 850 hPa, in realistic ranges (smooth waves)."""
    ds = analysis_dataset(grid=grid, periods=periods, variables=ALL_VARIABLES, levels=(500, 850), seed=seed)
    lat = np.deg2rad(ds["latitude"].values)[:, None]
    lon = np.deg2rad(ds["longitude"].values)[None, :]
    wave = [np.cos(lat) * np.cos(3 * lon + 0.4 * t) for t in range(periods)]
    wave = np.stack(wave).astype(np.float32)  # (time, lat, lon), −1…1
    pole = np.cos(lat).astype(np.float32)
    lv = np.array([1.0, 0.3], dtype=np.float32)[None, :, None, None]  # 500, 850
    ds["geopotential"].values = (98.0665 * (540 + 30 * pole + 10 * wave))[:, None] * np.array([1.0, 0.26])[None, :, None, None]
    ds["temperature"].values = (250 + 30 * pole + 5 * wave)[:, None] + 20 * (1 - lv)
    ds["u_component_of_wind"].values = (25 * wave)[:, None] * lv
    ds["v_component_of_wind"].values = (15 * np.roll(wave, 4, axis=-1))[:, None] * lv
    ds["mean_sea_level_pressure"].values = 101300 + 1500 * wave
    ds["2m_temperature"].values = 255 + 40 * pole + 4 * wave
    ds["10m_u_component_of_wind"].values = 8 * wave
    ds["10m_v_component_of_wind"].values = -6 * wave
    ds.attrs["dataset_version"] = "era5-files-tiny-abc"
    return ds


def frame_fields(ds: xr.Dataset, t: int, channels: tuple[str, ...]) -> dict[str, np.ndarray]:
    """One time's (lat, lon) arrays by channel, picked with xarray's own selection."""
    out = {}
    for ch in channels:
        name, _, level = ch.rpartition("_")
        out[ch] = (ds[name].isel(time=t).sel(level=int(level)) if level.isdigit() and name in ds
                   else ds[ch].isel(time=t)).values
    return out


def renderer_for(name: str, ds: xr.Dataset, region: str = "global", earth: bool = True) -> MapRenderer:
    channels = [f"{v}_{lv}" for v in ("geopotential", "temperature", "u_component_of_wind", "v_component_of_wind")
                for lv in (500, 850)] + list(ALL_VARIABLES[4:])
    (product,) = products_for(channels, [name])
    with offline_natural_earth():
        return MapRenderer(product, REGIONS[region], ds["latitude"].values, ds["longitude"].values, 30, earth=earth,
                           attribution="test")


@pytest.fixture(scope="module")
def ds() -> xr.Dataset:
    return weather()


def test_products_of_a_full_run_and_the_fallbacks() -> None:
    channels = ["geopotential_500", "temperature_850", "temperature_500", "u_component_of_wind_500",
                "v_component_of_wind_500", "mean_sea_level_pressure", "2m_temperature", "total_precipitation"]
    names = [p.name for p in products_for(channels)]
    assert names == ["z500_t850", "mslp", "t2m", "wind500", "temperature_500", "total_precipitation"]
    # The synthetic planet (z500, u500, v500): no z500_t850, so z500 keeps a product of its own.
    assert [p.name for p in products_for(["geopotential_500", "u_component_of_wind_500",
                                          "v_component_of_wind_500"])] == ["wind500", "geopotential_500"]
    assert product_channels("wind850") == ("u_component_of_wind_850", "v_component_of_wind_850")
    assert product_channels("z500_t850") == ("temperature_850", "geopotential_500")


def test_requests_name_what_is_missing() -> None:
    planet = ["geopotential_500", "u_component_of_wind_500", "v_component_of_wind_500"]
    with pytest.raises(ValueError, match="'z500_t850' needs temperature_850"):
        products_for(planet, ["z500_t850"])
    with pytest.raises(ValueError, match="'mslp' needs mean_sea_level_pressure"):
        products_for(planet, ["mslp"])
    with pytest.raises(ValueError, match="'wind850' needs .*level"):
        products_for(planet, ["wind850"])
    with pytest.raises(ValueError, match="unknown map product 'rainbow'"):
        products_for(planet, ["rainbow"])
    with pytest.raises(ValueError, match="unknown map region 'mars'"):
        resolve_regions(["global", "mars"])
    for box in ({"lon_min": 20, "lon_max": 10, "lat_min": 40, "lat_max": 50},   # reversed
                {"lon_min": 10, "lon_max": 20, "lat_min": 50, "lat_max": 50},   # empty
                {"lon_min": 10, "lon_max": 20, "lat_min": 60, "lat_max": 40}):
        with pytest.raises(ValueError, match="map region 'alps'.*(reversed or empty)"):
            MapBox(name="alps", **box)
    with pytest.raises(ValueError, match="built-in"):
        RenderConfig(boxes=[MapBox(name="europe", lon_min=0, lon_max=10, lat_min=40, lat_max=50)])


def test_z500_in_dam_every_6_over_t850_in_celsius(ds: xr.Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []
    real = Axes.contour
    monkeypatch.setattr(Axes, "contour", lambda self, *a, **k: calls.append(k) or real(self, *a, **k))
    r = renderer_for("z500_t850", ds)
    r.render(frame_fields(ds, 1, r.product.channels), "t")
    f = r.frame
    z = ds["geopotential"].isel(time=1).sel(level=500).values / 98.0665
    t = ds["temperature"].isel(time=1).sel(level=850).values - 273.15
    assert 500 < z.min() and z.max() < 620  # realistic z500 in dam: the contours cross the fixed levels
    assert np.nanmin(f.contour) >= z.min() - 1e-3 and np.nanmax(f.contour) <= z.max() + 1e-3
    assert len([p for p in r._contours.get_paths() if len(p.vertices)]) >= 5  # isohypses are drawn
    assert np.nanmin(f.shade) >= t.min() - 1e-3 and np.nanmax(f.shade) <= t.max() + 1e-3
    assert f.units == "°C" and np.all(np.diff(f.contour_levels) == 6) and 552 in f.contour_levels
    assert list(calls[-1]["levels"]) == list(f.contour_levels)
    assert set(np.diff(f.levels)) == {2.0}  # fixed shading bands, whatever the run's range


def test_mslp_isobars_every_4_hpa(ds: xr.Dataset) -> None:
    r = renderer_for("mslp", ds, "europe")
    r.render(frame_fields(ds, 0, r.product.channels), "t")
    f = r.frame
    p = ds["mean_sea_level_pressure"].isel(time=0).values / 100
    assert f.units == "hPa" and set(np.diff(f.contour_levels)) == {4.0} and 1012 in f.contour_levels
    assert p.min() - 1e-3 <= np.nanmin(f.contour) and np.nanmax(f.contour) <= p.max() + 1e-3


def test_wind_speed_from_u_and_v_with_barbs(ds: xr.Dataset) -> None:
    r = renderer_for("wind500", ds)
    fields = frame_fields(ds, 2, r.product.channels)
    r.render(fields, "t")
    f = r.frame
    # Independently: each pixel's speed is |(u, v)| of the bilinearly interpolated components.
    u, v = (r.grid.gather(fields[c]) for c in r.product.shade)
    np.testing.assert_allclose(f.shade, np.hypot(u, v), rtol=1e-6)
    assert np.nanmax(f.shade) <= np.hypot(fields["u_component_of_wind_500"], fields["v_component_of_wind_500"]).max() + 1e-3
    # Barbs: a fixed number on the map, their magnitude the speed (PlateCarree needs no rotation).
    assert 100 <= f.barb_u.size <= 22 * 12
    np.testing.assert_allclose(np.hypot(f.barb_u, f.barb_v), f.shade[r.barb_rows, r.barb_cols], rtol=1e-5)
    polar = renderer_for("wind500", ds, "arctic")
    polar.render(fields, "t")
    # Rotated onto the polar map, barbs keep their speed.
    np.testing.assert_allclose(np.hypot(polar.frame.barb_u, polar.frame.barb_v),
                               polar.frame.shade[polar.barb_rows, polar.barb_cols], rtol=1e-4)


def test_pixel_grid_is_xarray_linear_interpolation_with_wrap() -> None:
    g = get_grid("5.625deg")
    rng = np.random.default_rng(3)
    field = xr.DataArray(rng.normal(size=g.shape).astype(np.float32), dims=("latitude", "longitude"),
                         coords={"latitude": g.latitudes, "longitude": g.longitudes})
    grid = pixel_grid(REGIONS["global"].crs(), (-180, 180), (-90, 90), 90, 45, g.latitudes, g.longitudes)
    ours = grid.gather(field.values)
    wrapped = xr.concat([field, field.isel(longitude=[0]).assign_coords(longitude=[360.0])], "longitude")
    ref = wrapped.interp(latitude=xr.DataArray(grid.lat.ravel()), longitude=xr.DataArray(grid.lon.ravel() % 360))
    inside = (grid.lat.ravel() >= g.latitudes.min()) & (grid.lat.ravel() <= g.latitudes.max())
    np.testing.assert_allclose(ours.ravel()[inside], ref.values[inside], rtol=1e-5, atol=1e-5)


def test_robinson_corners_are_off_the_globe() -> None:
    g = get_grid("tiny")
    crs = REGIONS["global_robinson"].crs()
    x0, x1 = crs.x_limits
    y0, y1 = crs.y_limits
    grid = pixel_grid(crs, (x0, x1), (y0, y1), 80, 40, g.latitudes, g.longitudes)
    assert not grid.valid[0, 0] and not grid.valid[-1, -1] and grid.valid[20, 40]
    assert np.isnan(grid.gather(np.ones(g.shape))[0, 0])


def test_synthetic_planet_has_no_coastlines_and_earth_has(ds: xr.Dataset) -> None:
    text, earth = attribution({"dataset_version": "swe-0123456789ab"})
    assert not earth and "synthetic shallow-water planet" in text.lower()
    assert attribution({}, {"init_source": "synthetic-shallow-water"})[1] is False
    assert "Copernicus" in attribution({"analysis_dataset_version": "era5-cds-1"})[0]
    assert "IFS open data" in attribution({}, {"init_source": "ecmwf-opendata-ifs"})[0]
    planet = renderer_for("wind500", ds, earth=False)
    real = renderer_for("wind500", ds)
    gids = lambda r: {c.get_gid() for c in r.ax.collections}  # noqa: E731
    assert "coastlines" not in gids(planet) and "borders" not in gids(planet) and planet.coastlines is None
    assert {"coastlines", "borders"} <= gids(real) and len(real.coastlines.get_segments()) > 100
