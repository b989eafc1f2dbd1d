"""Map batches: every product × region as a non-blank PNG of its size, animations, offline, all or nothing."""

from __future__ import annotations

import socket
from pathlib import Path

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from fastapi.testclient import TestClient

from core.config import MapBox
from serve.layout import animation_index, map_index, map_relpath
from serve.maps import lead_hours, render_run_maps
from serve.products import products_for
from serve.regions import REGIONS
from tests.serve.conftest import make_forecast, pixels, png_size
from tests.serve.test_products import weather

DPI = 30
BOX = MapBox(name="alps", lon_min=4, lon_max=18, lat_min=43, lat_max=49, projection="LambertConformal")


def as_forecast(analysis: xr.Dataset) -> xr.Dataset:
    """An analysis relabelled as the lead times of one init time (as conftest's make_forecast does)."""
    ds = analysis.drop_vars(["done", "expver"])
    lead = ds["time"].values - ds["time"].values[0]
    ds = ds.rename(time="lead_time").assign_coords(lead_time=lead)
    ds = ds.expand_dims(init_time=[ds["lead_time"].values[0] * 0 + analysis["time"].values[0]])
    return ds.assign_coords(valid_time=(("init_time", "lead_time"), ds["init_time"].values[:, None] + lead[None, :]))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], xr.Dataset]:
    forecast = as_forecast(weather(periods=2))
    out = tmp_path_factory.mktemp("maps")
    written = render_run_maps(forecast, out, dpi=DPI, regions=[*REGIONS, "alps"], boxes=[BOX], animations=False)
    return out, written, forecast


def colorbar_strip(rgb: np.ndarray) -> np.ndarray:
    """The middle row of the colorbar (axes at 0.2…0.8 × 0.12…0.15 of the figure)."""
    h, w, _ = rgb.shape
    return rgb[int((1 - 0.135) * h), int(0.22 * w):int(0.78 * w)]


def test_every_product_and_region_renders_a_map_with_a_colorbar(rendered: tuple[Path, list[Path], xr.Dataset]) -> None:
    out, written, _ = rendered
    # The table's products, then one generic product per channel none of them draws.
    products = ["z500_t850", "mslp", "t2m", "wind10m", "wind500", "wind850", "geopotential_850", "temperature_500"]
    regions = [*REGIONS, "alps"]
    rel = [p.relative_to(out).as_posix() for p in written]
    assert map_index(rel) == {p: {r: [0, 6] for r in sorted(regions)} for p in sorted(products)}
    assert set(out.rglob("*.*")) == set(written) and [p.name for p in out.iterdir()] == ["maps"]
    figsize = {**{r: REGIONS[r].figsize for r in REGIONS}, "alps": None}
    for path in (p for p in written if p.suffix == ".png"):
        region = path.parent.name
        data = path.read_bytes()
        if figsize[region] is not None:
            assert png_size(data) == tuple(round(s * DPI) for s in figsize[region]), path
        rgb = pixels(data)
        h, w, _ = rgb.shape
        assert rgb[int(0.25 * h):int(0.85 * h), int(0.1 * w):int(0.9 * w)].var() > 0, path
        strip = colorbar_strip(rgb)
        assert len({tuple(px) for px in strip}) >= 8, f"no colorbar in {path}"


def test_frames_change_with_lead_but_the_colour_scale_does_not(rendered: tuple[Path, list[Path], xr.Dataset]) -> None:
    out, _, _ = rendered
    for product in ("z500_t850", "wind500"):
        a, b = (pixels(out / map_relpath(product, "global", lead)) for lead in (0, 6))
        np.testing.assert_array_equal(colorbar_strip(a), colorbar_strip(b))
        assert not np.array_equal(a, b)


def test_one_animation_frame_per_lead(tmp_path: Path) -> None:
    forecast = as_forecast(weather(periods=3))
    leads = len(lead_hours(forecast))
    written = render_run_maps(forecast, tmp_path, dpi=DPI, products=["z500_t850", "wind500"], regions=["europe"])
    rel = [p.relative_to(tmp_path).as_posix() for p in written]
    assert animation_index(rel) == {p: {"europe": ["gif", "mp4"]} for p in ("wind500", "z500_t850")}
    out = tmp_path
    gif = iio.imread(out / "maps/wind500/europe/animation.gif", index=None)
    assert gif.shape[0] == leads
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(out / "maps/z500_t850/europe/animation.mp4"))
    assert frames == leads
    first = pixels(out / map_relpath("wind500", "europe", 0))
    assert gif.shape[1:3] == first.shape[:2]


def test_rendering_never_touches_the_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted while rendering")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    forecast = as_forecast(weather(periods=1))
    written = render_run_maps(forecast, tmp_path, dpi=DPI, products=["mslp"], regions=["europe", "arctic"],
                              animations=False)
    assert [p.relative_to(tmp_path).as_posix() for p in written] == [
        "maps/mslp/arctic/000.png", "maps/mslp/europe/000.png"]


@pytest.mark.parametrize("kwargs, words", [
    ({"products": ["z500_t850"]}, "temperature_850"),
    ({"products": ["mslp"]}, "mean_sea_level_pressure"),
    ({"products": ["rainbow"]}, "unknown map product 'rainbow'"),
    ({"regions": ["mars"]}, "unknown map region 'mars'"),
])
def test_bad_requests_raise_and_leave_maps_untouched(tmp_path: Path, kwargs: dict, words: str) -> None:
    old = tmp_path / "maps" / "geopotential_500" / "global" / "000.png"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"old map")
    with pytest.raises(ValueError, match=words):
        render_run_maps(make_forecast(leads=1), tmp_path, dpi=DPI, **kwargs)
    assert old.read_bytes() == b"old map"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps"]
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [old]


def test_a_failure_midway_leaves_maps_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from serve.render import MapRenderer

    old = tmp_path / "maps" / "x" / "global" / "000.png"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"old map")
    real, calls = MapRenderer.render, []

    def fail_on_second(self: MapRenderer, *args: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(self, *args)

    monkeypatch.setattr(MapRenderer, "render", fail_on_second)
    with pytest.raises(RuntimeError, match="disk full"):
        render_run_maps(make_forecast(leads=2), tmp_path, dpi=DPI, regions=["global"])
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [old]


def test_rerender_replaces_maps_and_parallel_workers_match_one_process(tmp_path: Path) -> None:
    forecast = make_forecast(leads=2)
    (tmp_path / "maps" / "stale").mkdir(parents=True)
    one = render_run_maps(forecast, tmp_path / "a", dpi=DPI, regions=["global", "arctic"], animations=False)
    stats: dict[str, float] = {}
    two = render_run_maps(forecast, tmp_path, dpi=DPI, regions=["global", "arctic"], animations=False,
                          workers=2, stats=stats)
    assert not (tmp_path / "maps" / "stale").exists()
    assert [p.relative_to(tmp_path / "a") for p in one] == [p.relative_to(tmp_path) for p in two]
    for a, b in zip(one, two, strict=True):
        assert a.read_bytes() == b.read_bytes(), b  # byte-identical: no timestamps, same drawing
    assert stats["frames"] == 8 and stats["workers"] == 2 and stats["cpu_s"] > 0


def test_ensemble_forecast_maps_the_member_mean(tmp_path: Path) -> None:
    ds = make_forecast(leads=1)
    members = xr.concat([ds, ds + 0.0], dim="member").transpose("init_time", "lead_time", "member", ...)
    members = members.assign_coords(valid_time=ds["valid_time"])
    kw = {"dpi": DPI, "regions": ["global"], "products": ["wind500"], "animations": False}
    (mean,) = render_run_maps(members, tmp_path / "ens", **kw)
    (single,) = render_run_maps(ds, tmp_path / "one", **kw)
    a, b = pixels(mean), pixels(single)
    h = a.shape[0]
    np.testing.assert_array_equal(a[int(0.1 * h):], b[int(0.1 * h):])  # same field; the title says "Ensemble mean"
    assert not np.array_equal(a, b)


def test_lead_hours_and_products_of_the_test_run(forecast: xr.Dataset) -> None:
    assert lead_hours(forecast) == [0, 6, 12, 18, 24]
    odd = forecast.assign_coords(lead_time=forecast["lead_time"] + np.timedelta64(30, "m"))
    with pytest.raises(ValueError, match="whole hours"):
        lead_hours(odd)
    channels = ["geopotential_500", "u_component_of_wind_500", "v_component_of_wind_500"]
    assert [p.name for p in products_for(channels)] == ["wind500", "geopotential_500"]
    assert pd.Timestamp(forecast["init_time"].values[0]) == pd.Timestamp("2000-01-01")


def test_map_routes_by_region_legacy_and_animation(client: TestClient, run_dir: Path) -> None:
    run = run_dir.name
    entry = client.get(f"/runs/{run}").json()
    listed = next(e for e in client.get("/runs").json() if e["name"] == run)
    # The conftest's runs map two regions (global, arctic).
    assert listed["maps"] == {p: {r: [0, 6, 12, 18, 24] for r in ("arctic", "global")}
                              for p in ("geopotential_500", "wind500")}
    assert entry["maps"] == listed["maps"] and entry["animations"] == listed["animations"]
    assert listed["channels"] == ["geopotential_500", "wind500"] and entry["lead_hours"] == [0, 6, 12, 18, 24]
    arctic = client.get(f"/runs/{run}/maps/wind500/arctic/12.png")
    assert arctic.status_code == 200 and arctic.headers["content-type"] == "image/png"
    assert arctic.content == (run_dir / "maps/wind500/arctic/012.png").read_bytes()
    assert client.head(f"/runs/{run}/maps/wind500/arctic/12.png").status_code == 200
    # The per-channel URL of old clients is the global region.
    assert client.get(f"/runs/{run}/maps/geopotential_500/6.png").content == \
        (run_dir / "maps/geopotential_500/global/006.png").read_bytes()
    gif = client.get(f"/runs/{run}/maps/wind500/arctic/animation.gif")
    assert gif.headers["content-type"] == "image/gif" and iio.imread(gif.content, index=None).shape[0] == 5
    mp4 = client.get(f"/runs/{run}/maps/wind500/arctic/animation.mp4")
    assert mp4.status_code == 200 and mp4.headers["content-type"] == "video/mp4" and b"ftyp" in mp4.content[:32]
    missing = client.get(f"/runs/{run}/maps/wind500/mars/12.png")
    assert missing.status_code == 404 and "region 'mars'" in missing.json()["detail"]
    assert "arctic, global" in missing.json()["detail"]
    assert client.get(f"/runs/{run}/maps/wind500/arctic/7.png").status_code == 404
    assert client.get(f"/runs/{run}/maps/wind500/arctic/animation.webm").status_code in (404, 422)


def test_regional_maps_draw_fifty_metre_borders_from_the_shipped_files(forecast: xr.Dataset) -> None:
    from dataclasses import replace

    from serve.cartopy_offline import offline_natural_earth
    from serve.products import fallback
    from serve.render import MapRenderer

    lat, lon = forecast["latitude"].values, forecast["longitude"].values
    vertices = {}
    with offline_natural_earth(None):
        for scale in ("50m", "110m"):
            region = replace(REGIONS["europe"], coastlines=scale)
            renderer = MapRenderer(fallback("geopotential_500"), region, lat, lon, DPI)
            assert renderer.borders is not None
            vertices[scale] = sum(len(p) for p in renderer.borders.get_segments())
            renderer.close()
    assert REGIONS["europe"].coastlines == "50m" and vertices["50m"] > 2 * vertices["110m"]
