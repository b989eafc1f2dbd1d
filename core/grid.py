"""Equiangular latitude/longitude grids with both poles, and their area quadrature weights.

Latitudes run 90 → −90 (``nlat`` points, both poles included), longitudes 0 → 360−Δ.
The weight of a row is the area of the band it represents: cell edges sit halfway between rows
and the pole rows own the polar caps, so ``w_i ∝ sin(φ_{i−½}) − sin(φ_{i+½})`` and the weights
sum to one. This is what WeatherBench calls latitude weighting, done without the cos(±90°)=0 hole.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from core.errors import ConfigError, DataContractError

PRESETS: dict[str, tuple[int, int]] = {
    "tiny": (17, 32),
    "5.625deg": (33, 64),
    "2.8125deg": (65, 128),
    "1.5deg": (121, 240),
    "0.25deg": (721, 1440),
}


@dataclass(frozen=True)
class Grid:
    """An equiangular grid with poles: ``nlat`` rows from 90 to −90, ``nlon`` columns from 0."""

    name: str
    nlat: int
    nlon: int

    def __post_init__(self) -> None:
        if self.nlat < 3 or self.nlon < 4:
            raise ConfigError(f"grid {self.name!r}: nlat={self.nlat}, nlon={self.nlon} is too small")

    @property
    def shape(self) -> tuple[int, int]:
        """(nlat, nlon)."""
        return (self.nlat, self.nlon)

    @cached_property
    def latitudes(self) -> np.ndarray:
        """Row latitudes in degrees, 90 → −90."""
        return np.linspace(90.0, -90.0, self.nlat)

    @cached_property
    def longitudes(self) -> np.ndarray:
        """Column longitudes in degrees, 0 → 360−Δ."""
        return np.arange(self.nlon) * (360.0 / self.nlon)

    @cached_property
    def weights(self) -> np.ndarray:
        """Area weight of each row, summing to 1 (shape ``(nlat,)``)."""
        edges = np.concatenate([[90.0], (self.latitudes[:-1] + self.latitudes[1:]) / 2, [-90.0]])
        w = np.sin(np.deg2rad(edges[:-1])) - np.sin(np.deg2rad(edges[1:]))
        return w / w.sum()

    def describe(self) -> str:
        """The string stored in the ``grid`` attribute of every artifact."""
        return f"{self.name}:{self.nlat}x{self.nlon}:equiangular-poles"


def latent_shape(nlat: int, nlon: int, scale_factor: int) -> tuple[int, int]:
    """Shape of the SFNO's latent grid for a data grid with poles downsampled by ``scale_factor``."""
    return (nlat - 1) // scale_factor + 1, nlon // scale_factor


def scale_factors(nlat: int, nlon: int) -> list[int]:
    """Every SFNO ``scale_factor`` that divides a grid (``nlat − 1`` and ``nlon``) and leaves a latent lmax ≥ 2."""
    return [d for d in range(1, nlon + 1)
            if (nlat - 1) % d == 0 and nlon % d == 0 and min(latent_shape(nlat, nlon, d)[0], nlon // d // 2) >= 2]


def check_scale_factor(nlat: int, nlon: int, scale_factor: int) -> None:
    """Raise one ``ValueError`` naming the problem if an SFNO cannot run on ``nlat × nlon`` at ``scale_factor``."""
    if nlat < 3 or nlon < 4:
        raise ConfigError(f"grid {nlat}x{nlon} cannot be used by the spherical harmonic transform: it needs "
                          "nlat ≥ 3 (both poles and one row between) and nlon ≥ 4")
    allowed = scale_factors(nlat, nlon)
    if scale_factor not in allowed:
        # A latent grid that does not subsample the data grid exactly shifts every latent node a little:
        # refuse rather than silently train on a grid the user did not ask for.
        raise ConfigError(f"scale_factor {scale_factor} does not fit grid {nlat}x{nlon}: it must divide nlat−1 = "
                          f"{nlat - 1} and nlon = {nlon} and leave a latent lmax ≥ 2; allowed: "
                          f"{', '.join(map(str, allowed)) or 'none'}")


def get_grid(name: str) -> Grid:
    """Return the preset grid called ``name`` or raise ``ValueError`` listing the presets."""
    if name not in PRESETS:
        raise ConfigError(f"unknown grid preset {name!r}; known presets: {', '.join(PRESETS)}")
    nlat, nlon = PRESETS[name]
    return Grid(name, nlat, nlon)


def grid_for_shape(nlat: int, nlon: int) -> Grid:
    """Return the preset matching a shape, or an unnamed grid of that shape."""
    for name, shape in PRESETS.items():
        if shape == (nlat, nlon):
            return Grid(name, nlat, nlon)
    return Grid(f"custom{nlat}x{nlon}", nlat, nlon)


def parse_grid_attr(text: str) -> Grid:
    """Inverse of :meth:`Grid.describe`; raise ``ValueError`` on a malformed string."""
    try:
        name, shape, kind = text.split(":")
        nlat, nlon = (int(v) for v in shape.split("x"))
    except ValueError as exc:
        raise DataContractError(f"malformed grid attribute {text!r} (expected name:NLATxNLON:kind)") from exc
    if kind != "equiangular-poles":
        raise DataContractError(f"grid attribute {text!r}: only equiangular-poles grids are supported")
    return Grid(name, nlat, nlon)
