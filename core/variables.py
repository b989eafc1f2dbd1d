"""The one vocabulary table: every variable spherecast knows, in ERA5 long names.

A *channel* is ``<variable>_<level>`` for pressure-level variables (``geopotential_500``) and
``<variable>`` for single-level ones (``2m_temperature``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.errors import ConfigError


@dataclass(frozen=True)
class Variable:
    """One vocabulary entry: names, units, level type and how to plot it."""

    name: str
    long_name: str
    units: str
    level_type: Literal["pressure", "single"]
    cds_name: str
    short_name: str
    valid_range: tuple[float, float]
    cmap: str = "viridis"
    diverging: bool = False
    param_id: int = 0
    """ECMWF/WMO GRIB parameter id (``paramId``): what a GRIB2 message of this variable is labelled."""
    standard_name: str = ""
    """CF standard name (CF-1.8 table) written on the variable in NetCDF output."""
    accumulation_hours: int = 0
    """Hours a value accumulates over, ending at its time (ERA5's hourly ``tp``: 1); 0 = instantaneous."""


_TABLE = [
    Variable("geopotential", "Geopotential", "m**2 s**-2", "pressure", "geopotential", "z", (-1e4, 3.5e5), "viridis",
             param_id=129, standard_name="geopotential"),
    Variable("temperature", "Temperature", "K", "pressure", "temperature", "t", (150.0, 350.0), "RdYlBu_r",
             param_id=130, standard_name="air_temperature"),
    Variable("u_component_of_wind", "U component of wind", "m s**-1", "pressure", "u_component_of_wind", "u", (-250.0, 250.0), "RdBu_r", True,
             param_id=131, standard_name="eastward_wind"),
    Variable("v_component_of_wind", "V component of wind", "m s**-1", "pressure", "v_component_of_wind", "v", (-250.0, 250.0), "RdBu_r", True,
             param_id=132, standard_name="northward_wind"),
    Variable("specific_humidity", "Specific humidity", "kg kg**-1", "pressure", "specific_humidity", "q", (0.0, 0.1), "YlGnBu",
             param_id=133, standard_name="specific_humidity"),
    Variable("vertical_velocity", "Vertical velocity", "Pa s**-1", "pressure", "vertical_velocity", "w", (-50.0, 50.0), "RdBu_r", True,
             param_id=135, standard_name="lagrangian_tendency_of_air_pressure"),
    Variable("2m_temperature", "2 metre temperature", "K", "single", "2m_temperature", "t2m", (150.0, 350.0), "RdYlBu_r",
             param_id=167, standard_name="air_temperature"),
    Variable("10m_u_component_of_wind", "10 metre U wind component", "m s**-1", "single", "10m_u_component_of_wind", "u10", (-150.0, 150.0), "RdBu_r", True,
             param_id=165, standard_name="eastward_wind"),
    Variable("10m_v_component_of_wind", "10 metre V wind component", "m s**-1", "single", "10m_v_component_of_wind", "v10", (-150.0, 150.0), "RdBu_r", True,
             param_id=166, standard_name="northward_wind"),
    Variable("mean_sea_level_pressure", "Mean sea level pressure", "Pa", "single", "mean_sea_level_pressure", "msl", (8.0e4, 1.1e5), "viridis",
             param_id=151, standard_name="air_pressure_at_mean_sea_level"),
    Variable("surface_pressure", "Surface pressure", "Pa", "single", "surface_pressure", "sp", (4.0e4, 1.1e5), "viridis",
             param_id=134, standard_name="surface_air_pressure"),
    Variable("total_precipitation", "Total precipitation", "m", "single", "total_precipitation", "tp", (0.0, 1.0), "Blues",
             param_id=228, standard_name="lwe_thickness_of_precipitation_amount", accumulation_hours=1),
    Variable("total_column_water_vapour", "Total column vertically-integrated water vapour", "kg m**-2", "single", "total_column_water_vapour", "tcwv", (0.0, 150.0), "YlGnBu",
             param_id=137, standard_name="atmosphere_mass_content_of_water_vapor"),
]

VARIABLES: dict[str, Variable] = {v.name: v for v in _TABLE}
SHORT_NAMES: dict[str, str] = {v.short_name: v.name for v in _TABLE}
# Coordinate names as CDS delivers them → the contract's names.
COORD_RENAMES: dict[str, str] = {
    "valid_time": "time",
    "pressure_level": "level",
    "isobaricInhPa": "level",
    "lat": "latitude",
    "lon": "longitude",
}
PRESSURE_LEVELS = (1, 2, 3, 5, 7, 10, 20, 30, 50, 70, 100, 125, 150, 175, 200, 225, 250, 300, 350,
                   400, 450, 500, 550, 600, 650, 700, 750, 775, 800, 825, 850, 875, 900, 925, 950,
                   975, 1000)


def get_variable(name: str) -> Variable:
    """Return the vocabulary entry for a long name or raise ``ValueError`` naming it."""
    if name in VARIABLES:
        return VARIABLES[name]
    hint = f" (did you mean {SHORT_NAMES[name]!r}?)" if name in SHORT_NAMES else ""
    raise ConfigError(f"unknown variable {name!r}{hint}; known: {', '.join(VARIABLES)}")


def check_level(level: int) -> int:
    """Return ``level`` if ERA5 has that pressure level, else raise ``ValueError``."""
    if int(level) not in PRESSURE_LEVELS:
        raise ConfigError(f"pressure level {level!r} hPa is not an ERA5 level")
    return int(level)


def channel_names(variables: list[str], levels: list[int]) -> list[str]:
    """Ordered channel names: each pressure variable at each level, then the single-level ones."""
    out: list[str] = []
    for name in variables:
        var = get_variable(name)
        if var.level_type == "pressure":
            out.extend(f"{name}_{check_level(lv)}" for lv in levels)
        else:
            out.append(name)
    return out


def parse_channel(channel: str) -> tuple[str, int | None]:
    """Split ``geopotential_500`` into ``("geopotential", 500)``; single-level gives ``None``."""
    if channel in VARIABLES:
        return channel, None
    name, _, level = channel.rpartition("_")
    if name in VARIABLES and level.isdigit():
        if VARIABLES[name].level_type != "pressure":
            raise ConfigError(f"channel {channel!r}: {name!r} has no pressure levels")
        return name, check_level(int(level))
    raise ConfigError(f"unknown channel {channel!r}")
