"""Maps render with coastlines from the shipped Natural Earth files, with the network unusable."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import cartopy
import cartopy.feature
import cartopy.io
import cartopy.io.shapereader as shapereader
import numpy as np
import pytest
import xarray as xr

from core.grid import get_grid
from serve.cartopy_offline import (
    NATURAL_EARTH_DIR,
    OfflineNaturalEarthError,
    natural_earth_shapefile,
    offline_natural_earth,
)
from serve.maps import render_map_png
from tests.serve.conftest import pixels, png_size

SHIPPED = [("physical", "110m", "coastline"), ("physical", "50m", "coastline"),
           ("cultural", "110m", "admin_0_boundary_lines_land")]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Make every download path fail and empty cartopy's caches and data dir."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(cartopy.io, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    empty = tmp_path / "cartopy-data"
    empty.mkdir()
    monkeypatch.setitem(cartopy.config, "data_dir", empty)
    monkeypatch.setitem(cartopy.config, "pre_existing_data_dir", tmp_path / "nothing-here")
    # Geometries already loaded by another test would hide where they come from.
    monkeypatch.setattr(cartopy.feature, "_NATURAL_EARTH_GEOM_CACHE", {})
    return empty


def constant_field(value: float = 280.0) -> xr.DataArray:
    g = get_grid("tiny")
    return xr.DataArray(np.full(g.shape, value, dtype=np.float32), dims=("latitude", "longitude"),
                        coords={"latitude": g.latitudes, "longitude": g.longitudes},
                        name="2m_temperature")


def test_shipped_layers_are_complete_and_small() -> None:
    total = 0
    for category, scale, name in SHIPPED:
        shp = natural_earth_shapefile(NATURAL_EARTH_DIR, category, scale, name)
        for suffix in (".shp", ".shx", ".dbf", ".prj"):
            assert shp.with_suffix(suffix).is_file(), shp.with_suffix(suffix)
        assert len(list(shapereader.Reader(shp).geometries())) > 100
    total = sum(p.stat().st_size for p in NATURAL_EARTH_DIR.rglob("*") if p.is_file())
    assert total < 3_000_000
    assert "public domain" in (NATURAL_EARTH_DIR / "README.md").read_text().lower()


def test_map_renders_coastlines_offline_from_shipped_files(no_network: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[Path] = []
    real_reader = shapereader.Reader

    def spy_reader(filename: object, *args: object, **kwargs: object) -> object:
        opened.append(Path(str(filename)).resolve())
        return real_reader(filename, *args, **kwargs)

    monkeypatch.setattr(shapereader, "Reader", spy_reader)
    with_coast = render_map_png(constant_field(), title="offline", dpi=60)

    coastline = natural_earth_shapefile(NATURAL_EARTH_DIR, "physical", "110m", "coastline")
    assert opened == [coastline.resolve()]
    assert list(no_network.iterdir()) == [], "nothing may be downloaded into cartopy's data_dir"
    cached = cartopy.feature._NATURAL_EARTH_GEOM_CACHE[("coastline", "physical", "110m")]
    assert len(cached) == len(list(real_reader(coastline).geometries())) == 134

    # A constant field is one flat colour; coastlines are the only near-black pixels on the map.
    assert png_size(with_coast)[0] > 300
    rgb = pixels(with_coast)
    h, w, _ = rgb.shape
    map_area = rgb[int(0.1 * h):int(0.75 * h), int(0.1 * w):int(0.9 * w)]
    dark = (map_area.max(axis=2) < 90).mean()
    assert 0.002 < dark < 0.2


def test_missing_layer_raises_instead_of_downloading(no_network: Path, tmp_path: Path) -> None:
    partial = tmp_path / "ne"
    shp = natural_earth_shapefile(partial, "physical", "110m", "coastline")
    shp.parent.mkdir(parents=True)
    for src in natural_earth_shapefile(NATURAL_EARTH_DIR, "physical", "110m", "coastline").parent.glob(
            "ne_110m_coastline.*"):
        (shp.parent / src.name).write_bytes(src.read_bytes())
    with offline_natural_earth(partial), pytest.raises(OfflineNaturalEarthError, match="ne_10m_land"):
        shapereader.natural_earth(resolution="10m", category="physical", name="land")


def test_directory_without_coastline_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(OfflineNaturalEarthError, match="ne_110m_coastline"):
        with offline_natural_earth(tmp_path):
            pass


def test_cartopy_config_is_restored() -> None:
    before = (cartopy.config["pre_existing_data_dir"], cartopy.config["downloaders"][("shapefiles", "natural_earth")])
    with offline_natural_earth() as directory:
        assert cartopy.config["pre_existing_data_dir"] == directory == NATURAL_EARTH_DIR
    after = (cartopy.config["pre_existing_data_dir"], cartopy.config["downloaders"][("shapefiles", "natural_earth")])
    assert after == before
