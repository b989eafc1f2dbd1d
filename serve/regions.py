"""Map regions as data: a projection, an extent, a figure size and the coastline scale.

The built-in regions are rows of :data:`REGIONS`; a user box from ``render.boxes`` becomes one
more row (:func:`box_region`). Nothing here draws: :mod:`serve.render` builds the axes from a row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cartopy.crs as ccrs

from core.config import MapBox, check_map_box
from core.errors import ConfigError


@dataclass(frozen=True)
class Region:
    """One map region."""

    name: str
    projection: str
    """cartopy CRS class name: PlateCarree, Robinson, LambertConformal, NorthPolarStereo, SouthPolarStereo."""
    extent: tuple[float, float, float, float] | None
    """(lon_min, lon_max, lat_min, lat_max) in degrees; None: the whole globe."""
    figsize: tuple[float, float]
    coastlines: str = "110m"
    """Natural Earth scale of coastlines and borders (110m or 50m, both shipped in serve/naturalearth)."""
    projection_kwargs: dict[str, Any] = field(default_factory=dict)

    def crs(self) -> ccrs.Projection:
        """The cartopy projection of the map."""
        return getattr(ccrs, self.projection)(**self.projection_kwargs)


REGIONS: dict[str, Region] = {r.name: r for r in [
    Region("global", "PlateCarree", None, (8.0, 4.6)),
    Region("global_robinson", "Robinson", None, (8.0, 4.6)),
    Region("europe", "LambertConformal", (-25.0, 45.0, 30.0, 72.0), (6.4, 5.6), "50m",
           {"central_longitude": 10.0, "central_latitude": 50.0, "standard_parallels": (35.0, 65.0)}),
    Region("north_america", "LambertConformal", (-135.0, -55.0, 15.0, 65.0), (7.2, 5.4), "50m",
           {"central_longitude": -97.0, "central_latitude": 40.0, "standard_parallels": (33.0, 45.0)}),
    Region("arctic", "NorthPolarStereo", (-180.0, 180.0, 50.0, 90.0), (6.0, 6.6)),
    Region("antarctic", "SouthPolarStereo", (-180.0, 180.0, -90.0, -50.0), (6.0, 6.6)),
]}


def box_region(box: MapBox) -> Region:
    """A user box as a region: PlateCarree, or LambertConformal centred on the box."""
    check_map_box(box.name, box.lon_min, box.lon_max, box.lat_min, box.lat_max)
    extent = (box.lon_min, box.lon_max, box.lat_min, box.lat_max)
    width, height = box.lon_max - box.lon_min, box.lat_max - box.lat_min
    aspect = min(max(width / height, 0.6), 2.2)
    figsize = (7.0, round(max(4.2, min(8.0, 7.0 / aspect + 1.2)), 1))
    coast = "50m" if width * height < 6000 else "110m"
    if box.projection == "PlateCarree":
        central = (box.lon_min + box.lon_max) / 2 if width < 360 else 0.0
        return Region(box.name, "PlateCarree", extent, figsize, coast,
                      {"central_longitude": ((central + 180) % 360) - 180})
    mid_lat = (box.lat_min + box.lat_max) / 2
    if abs(mid_lat) < 5:
        raise ConfigError(f"map region {box.name!r}: a LambertConformal box needs its centre away from the equator "
                         f"(centre latitude {mid_lat}); use PlateCarree")
    parallels = (box.lat_min + height / 6, box.lat_max - height / 6)
    if mid_lat < 0:
        parallels = parallels[::-1]
    return Region(box.name, "LambertConformal", extent, figsize, coast,
                  {"central_longitude": (box.lon_min + box.lon_max) / 2, "central_latitude": mid_lat,
                   "standard_parallels": parallels, **({"cutoff": 30} if mid_lat < 0 else {})})


def resolve_regions(names: Sequence[str] | None, boxes: Sequence[MapBox] = ()) -> list[Region]:
    """Regions by name (built-in or a box's); every box if ``names`` is None and boxes exist else the defaults."""
    table = dict(REGIONS)
    for box in boxes:
        if box.name in REGIONS:
            raise ConfigError(f"map region box {box.name!r} has the name of a built-in region")
        table[box.name] = box_region(box)
    if names is None:
        names = list(REGIONS) + [b.name for b in boxes]
    out = []
    for name in names:
        if name not in table:
            raise ConfigError(f"unknown map region {name!r}; known: {', '.join(table)} "
                             "(add a lon/lat box under render.boxes)")
        out.append(table[name])
    if len({r.name for r in out}) != len(out):
        raise ConfigError(f"map regions {list(names)} name a region twice")
    return out
