"""Static input fields: what a translation-invariant operator cannot learn — where it is on the sphere.

Grid statics are computed from the grid alone, so a model that carries them moves to another grid
(zero-shot) by recomputing them. Store statics are variables of the analysis store without a time
axis (a land-sea mask or orography, where the store holds them); they are standardised when read
and exist only on the store's grid.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from core.errors import ConfigError, DataContractError
from core.grid import Grid, parse_grid_attr

GRID_STATICS = ("cos_latitude", "sin_latitude", "cos_longitude", "sin_longitude")


def grid_statics(grid: Grid, names: list[str] | tuple[str, ...]) -> np.ndarray:
    """The named grid statics on ``grid``, ``(len(names), lat, lon)`` float32; ``ValueError`` for other names."""
    unknown = [n for n in names if n not in GRID_STATICS]
    if unknown:
        raise ConfigError(f"{unknown} are not grid statics (those are {list(GRID_STATICS)})")
    lat = np.deg2rad(grid.latitudes)[:, None] * np.ones((1, grid.nlon))
    lon = np.ones((grid.nlat, 1)) * np.deg2rad(grid.longitudes)[None, :]
    computed = {"cos_latitude": np.cos(lat), "sin_latitude": np.sin(lat),
                "cos_longitude": np.cos(lon), "sin_longitude": np.sin(lon)}
    return np.asarray([computed[n] for n in names], dtype=np.float32).reshape(len(names), grid.nlat, grid.nlon)


def static_fields(analysis: xr.Dataset, names: list[str] | tuple[str, ...]) -> np.ndarray:
    """The named static fields on the store's grid, ``(len(names), lat, lon)`` float32, standardised."""
    grid = parse_grid_attr(str(analysis.attrs["grid"]))
    out = []
    for name in names:
        if name in GRID_STATICS:
            field = grid_statics(grid, [name])[0].astype(np.float64)
        elif name in analysis.data_vars and "time" not in analysis[name].dims:
            field = np.asarray(analysis[name].values, dtype=np.float64)
            if field.shape != (grid.nlat, grid.nlon):
                raise DataContractError(f"static field {name!r} has shape {field.shape}, not the grid's {grid.shape}")
            # Standardised here (inputs to the network are O(1)); a constant field stays 0.
            std = field.std()
            field = (field - field.mean()) / (std if std > 0 else 1.0)
        else:
            have = sorted(v for v in analysis.data_vars if "time" not in analysis[v].dims)
            raise ConfigError(f"unknown static field {name!r}: use one of {list(GRID_STATICS)} or a store "
                              f"variable without a time axis ({have or 'the store has none'})")
        if not np.isfinite(field).all():
            raise DataContractError(f"static field {name!r} has NaN or Inf values")
        out.append(field)
    return np.asarray(out, dtype=np.float32).reshape(len(names), grid.nlat, grid.nlon)
