"""Map rendering: one PNG per channel and lead, fixed colour scale per channel, no seam, not blank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from core.variables import VARIABLES
from serve.layout import map_index, map_relpath
from serve.maps import color_limits, forecast_channels, lead_hours, map_title, render_map_png, render_run_maps
from tests.serve.conftest import make_forecast, pixels, png_size

CHANNELS = ["geopotential_500", "u_component_of_wind_500", "v_component_of_wind_500"]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory, forecast: xr.Dataset) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("maps")
    return out, render_run_maps(forecast, out, dpi=50)


def map_area(rgb: np.ndarray) -> np.ndarray:
    """The inside of the map frame (title, colorbar and frame cut away)."""
    h, w, _ = rgb.shape
    return rgb[int(0.1 * h):int(0.75 * h), int(0.1 * w):int(0.9 * w)]


def colorbar_area(rgb: np.ndarray) -> np.ndarray:
    """The colorbar with its ticks and label."""
    h, _, _ = rgb.shape
    return rgb[int(0.82 * h):, :]


def test_one_png_per_channel_and_lead(rendered: tuple[Path, list[Path]]) -> None:
    out, written = rendered
    expected = {out / "maps" / ch / f"{lead:03d}.png" for ch in CHANNELS for lead in (0, 6, 12, 18, 24)}
    assert set(written) == expected and len(written) == 15
    assert set(out.rglob("*.png")) == expected
    assert not list(out.rglob("*.tmp")), "no temporary files may be left behind"
    rel = [p.relative_to(out).as_posix() for p in written]
    assert map_index(rel) == {ch: [0, 6, 12, 18, 24] for ch in CHANNELS}


def test_pngs_open_have_one_size_and_are_not_blank(rendered: tuple[Path, list[Path]]) -> None:
    _, written = rendered
    sizes = {png_size(p.read_bytes()) for p in written}
    assert sizes == {(400, 230)}  # 8 × 4.6 inches at 50 dpi
    for path in written:
        area = map_area(pixels(path))
        assert area.var() > 0, path


def test_colour_scale_is_fixed_across_leads_but_fields_change(rendered: tuple[Path, list[Path]]) -> None:
    out, _ = rendered
    for channel in CHANNELS:
        images = [pixels(out / map_relpath(channel, lead)) for lead in (0, 6, 12, 18, 24)]
        # Same limits → the colorbar, its ticks and its label are pixel-identical at every lead.
        for img in images[1:]:
            np.testing.assert_array_equal(colorbar_area(img), colorbar_area(images[0]))
        assert any(not np.array_equal(map_area(img), map_area(images[0])) for img in images[1:])


def test_color_limits_cover_all_leads_and_diverging_is_symmetric(forecast: xr.Dataset) -> None:
    z = forecast["geopotential"].sel(level=500).values
    lo, hi = color_limits(z, VARIABLES["geopotential"])
    assert (lo, hi) == (float(z.min()), float(z.max()))
    for lead in range(z.shape[1]):
        assert lo <= z[0, lead].min() and z[0, lead].max() <= hi
    u = forecast["u_component_of_wind"].values
    ulo, uhi = color_limits(u, VARIABLES["u_component_of_wind"])
    assert ulo == -uhi == -float(np.abs(u).max())


def test_color_limits_edge_cases() -> None:
    z, u = VARIABLES["geopotential"], VARIABLES["u_component_of_wind"]
    lo, hi = color_limits(np.full((3, 4), 5.0e4), z)
    assert lo < 5.0e4 < hi
    assert color_limits(np.array([1.0, np.nan, 3.0]), z) == (1.0, 3.0)
    assert color_limits(np.full(4, np.nan), z) == (0.0, 1.0)
    assert color_limits(np.zeros(4), u) == (-1.0, 1.0)


def test_no_seam_at_the_date_line_or_greenwich() -> None:
    ds = make_forecast(leads=1)
    field = ds["geopotential"].isel(init_time=0, lead_time=0).sel(level=500)
    rgb = pixels(render_map_png(xr.full_like(field, 5.0e4), dpi=50))
    area = map_area(rgb)
    white = (area.min(axis=2) > 250).mean()
    assert white == 0.0, "background shows through the mesh"
    # Out to the frame: the filled columns form one unbroken band as wide as the map, so the
    # cells overhanging ±180° close the edges too.
    h, w, _ = rgb.shape
    band = rgb[int(0.1 * h):int(0.75 * h)]
    filled = np.where((band.min(axis=2) < 250).mean(axis=0) > 0.99)[0]
    assert filled.max() - filled.min() + 1 == filled.size
    assert filled.size >= 0.8 * w


def test_titles_and_channels(forecast: xr.Dataset) -> None:
    assert forecast_channels(forecast) == CHANNELS
    assert lead_hours(forecast) == [0, 6, 12, 18, 24]
    title = map_title("geopotential_500", pd.Timestamp("2000-01-01"), 12, pd.Timestamp("2000-01-01T12"))
    assert title == "Geopotential 500 hPa — init 2000-01-01 00UTC +12h (valid 2000-01-01 12UTC)"
    assert map_title("2m_temperature", pd.Timestamp("2000-01-01"), 0, pd.Timestamp("2000-01-01")).startswith(
        "2 metre temperature — init")


def test_non_whole_hour_leads_are_refused(forecast: xr.Dataset) -> None:
    odd = forecast.assign_coords(lead_time=forecast["lead_time"] + np.timedelta64(30, "m"))
    with pytest.raises(ValueError, match="whole hours"):
        lead_hours(odd)


def test_ensemble_forecast_maps_the_member_mean(tmp_path: Path) -> None:
    ds = make_forecast(leads=2)
    members = xr.concat([ds, ds + 0.0], dim="member").transpose("init_time", "lead_time", "member", ...)
    members = members.assign_coords(valid_time=ds["valid_time"])
    for name in ds.data_vars:
        members[name].attrs = ds[name].attrs
    written = render_run_maps(members, tmp_path, dpi=40)
    assert len(written) == 2 * len(CHANNELS)
    single = render_run_maps(ds, tmp_path / "single", dpi=40)
    # Title differs ("Ensemble mean …"), the field itself is identical.
    np.testing.assert_array_equal(map_area(pixels(written[0])), map_area(pixels(single[0])))
    assert not np.array_equal(pixels(written[0]), pixels(single[0]))
