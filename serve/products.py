"""The map products a forecaster reads, as one table: fields, display units, fixed levels, overlays.

Every product is a :class:`Product` row. Its levels are fixed (never fitted to a run's values), so
the same colour means the same value at every lead and in every run. A row whose name holds
``{level}`` is a template expanded once per pressure level the run has (``wind{level}`` →
``wind500``). A product applies to a run only if the run holds all its channels; every channel no
applied product draws gets a generic product of its own (:data:`FALLBACK`), so nothing is lost.

This module is data only (no matplotlib, no cartopy): the catalog reads it to know a product's
channels without importing a plotting library.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from core.errors import ConfigError
from core.variables import VARIABLES, parse_channel

G0 = 9.80665  # m s-2: geopotential / (10 g) is geopotential height in decametres


@dataclass(frozen=True)
class Convert:
    """Display value = stored value × scale + offset, in ``units`` (what a forecaster reads)."""

    units: str
    scale: float = 1.0
    offset: float = 0.0

    def __call__(self, values: np.ndarray) -> np.ndarray:
        """The values in display units."""
        return values * np.float32(self.scale) + np.float32(self.offset) if (self.scale, self.offset) != (1, 0) \
            else values


KELVIN_TO_C = Convert("°C", 1.0, -273.15)
PA_TO_HPA = Convert("hPa", 0.01)
GEOPOTENTIAL_TO_DAM = Convert("dam", 1.0 / (10 * G0))
METRES_PER_SECOND = Convert("m s⁻¹")


@dataclass(frozen=True)
class Product:
    """One map product: a shaded field, optional contour overlay and optional wind barbs."""

    name: str
    title: str
    shade: tuple[str, ...]
    """Channels of the shaded field: one channel, or (u, v) whose speed is shaded."""
    convert: Convert
    levels: tuple[float, ...]
    """Fixed colour boundaries in display units (values beyond them take the extend colours)."""
    cmap: str
    contour: str | None = None
    contour_convert: Convert | None = None
    contour_levels: tuple[float, ...] = ()
    barbs: tuple[str, str] | None = None
    """(u, v) channels drawn as barbs, thinned to a fixed number per map."""

    @property
    def channels(self) -> tuple[str, ...]:
        """Every channel the product reads."""
        extra = (self.contour,) if self.contour else ()
        return tuple(dict.fromkeys(self.shade + extra + (self.barbs or ())))

    @property
    def speed(self) -> bool:
        """Whether the shaded field is the speed of a (u, v) pair."""
        return len(self.shade) == 2


def _steps(lo: float, hi: float, step: float) -> tuple[float, ...]:
    return tuple(float(v) for v in np.round(np.arange(lo, hi + step / 2, step), 6))


def _wind(name: str, title: str, u: str, v: str, top: float, step: float) -> Product:
    return Product(name, title, (u, v), METRES_PER_SECOND, _steps(0, top, step), "cmo.speed", barbs=(u, v))


# The table. Order is the order products are listed in a run.
PRODUCTS: list[Product] = [
    Product("z500_t850", "500 hPa geopotential height (dam) and 850 hPa temperature",
            ("temperature_850",), KELVIN_TO_C, _steps(-40, 36, 2), "cmo.thermal",
            contour="geopotential_500", contour_convert=GEOPOTENTIAL_TO_DAM,
            contour_levels=_steps(462, 612, 6)),
    Product("mslp", "Mean sea level pressure", ("mean_sea_level_pressure",), PA_TO_HPA,
            _steps(960, 1052, 4), "cmo.balance", contour="mean_sea_level_pressure", contour_convert=PA_TO_HPA,
            contour_levels=_steps(940, 1068, 4)),
    Product("t2m", "2 metre temperature", ("2m_temperature",), KELVIN_TO_C, _steps(-48, 48, 3), "cmo.thermal"),
    _wind("wind10m", "10 metre wind speed", "10m_u_component_of_wind", "10m_v_component_of_wind", 30, 2),
    _wind("wind{level}", "{level} hPa wind speed", "u_component_of_wind_{level}", "v_component_of_wind_{level}",
          80, 5),
]


def _standard_height_dam(level_hpa: int) -> float:
    # International standard atmosphere (troposphere formula, good enough to centre fixed levels).
    return 44330.8 * (1 - (level_hpa / 1013.25) ** 0.190263) / 10


def _fallback_levels(name: str, level: int | None) -> tuple[Convert, tuple[float, ...], str]:
    """Units, fixed levels and colormap of the generic product of one channel."""
    var = VARIABLES[name]
    if name == "geopotential":
        centre = round(_standard_height_dam(level or 500) / 6) * 6
        span = max(60, round(0.14 * centre / 6) * 6)
        return GEOPOTENTIAL_TO_DAM, _steps(centre - span, centre + span, 6), "viridis"
    if var.units == "K":
        top = 30.0 if level is None or level >= 700 else 0.0
        return KELVIN_TO_C, _steps(top - 72, top + 12, 3), "cmo.thermal"
    if var.units == "Pa":
        return PA_TO_HPA, (_steps(960, 1052, 4) if "sea_level" in name else _steps(500, 1050, 25)), "viridis"
    if var.units == "m" and name == "total_precipitation":
        return Convert("mm", 1000.0), (0.0, 0.1, 0.5, 1, 2, 4, 8, 16, 32, 64), "cmo.rain"
    if var.units == "kg kg**-1":
        return Convert("g kg⁻¹", 1000.0), _steps(0, 20, 1), "cmo.haline"
    if var.units == "kg m**-2":
        return Convert("kg m⁻²", 1.0), _steps(0, 70, 5), "cmo.haline"
    if var.units == "Pa s**-1":
        return Convert("Pa s⁻¹"), _steps(-2, 2, 0.25), "cmo.balance"
    # Wind components: diverging around zero, wider aloft.
    bound = 40.0 if level is not None and level < 700 else 20.0
    return METRES_PER_SECOND, _steps(-bound, bound, bound / 10), "cmo.balance"


def fallback(channel: str) -> Product:
    """The generic product of one channel (named like the channel: ``geopotential_500``)."""
    name, level = parse_channel(channel)
    convert, levels, cmap = _fallback_levels(name, level)
    title = VARIABLES[name].long_name + (f" {level} hPa" if level is not None else "")
    return Product(channel, title, (channel,), convert, levels, cmap)


def _expand(row: Product, level: int) -> Product:
    fill = {"level": level}
    return replace(row, name=row.name.format(**fill), title=row.title.format(**fill),
                   shade=tuple(c.format(**fill) for c in row.shade),
                   barbs=tuple(c.format(**fill) for c in row.barbs) if row.barbs else None)  # type: ignore[arg-type]


def candidates(levels: Iterable[int]) -> list[Product]:
    """Every table row, templates expanded over ``levels``."""
    out: list[Product] = []
    for row in PRODUCTS:
        if "{level}" in row.name:
            out.extend(_expand(row, lv) for lv in levels)
        else:
            out.append(row)
    return out


def products_for(channels: Sequence[str], requested: Sequence[str] | None = None) -> list[Product]:
    """Products of a run with ``channels``: the requested names (all that apply if None), fallbacks included.

    An explicitly requested product the run cannot make is a ``ValueError`` naming the missing channels.
    """
    have = set(channels)
    levels = sorted({lv for ch in channels for lv in [parse_channel(ch)[1]] if lv is not None})
    table = candidates(levels)
    applied = [p for p in table if set(p.channels) <= have]
    covered = {c for p in applied for c in p.channels}
    applied += [fallback(ch) for ch in channels if ch not in covered]
    if requested is None:
        return applied
    by_name = {p.name: p for p in applied}
    out = []
    for name in requested:
        if name in by_name:
            out.append(by_name[name])
            continue
        known = {p.name: p for p in candidates(levels or [500])}
        if name in known:
            missing = sorted(set(known[name].channels) - have)
            raise ConfigError(f"map product {name!r} needs {', '.join(missing)}, which the run does not hold")
        if "{level}" not in name and _template_name(name) is not None:
            raise ConfigError(f"map product {name!r} needs a pressure level the run does not hold "
                             f"(levels: {levels or 'none'})")
        try:
            parse_channel(name)
        except ValueError:
            raise ConfigError(f"unknown map product {name!r}; this run offers {', '.join(by_name) or 'none'}") from None
        raise ConfigError(f"map product {name!r} needs {name}, which the run does not hold")
    return out


def _template_name(name: str) -> Product | None:
    for row in PRODUCTS:
        head, _, tail = row.name.partition("{level}")
        if _ and name.startswith(head) and name.endswith(tail) and name[len(head):len(name) - len(tail)].isdigit():
            return row
    return None


def product_channels(name: str) -> tuple[str, ...]:
    """Channels a product name reads, known from its name alone (a fallback's is its own channel)."""
    for row in PRODUCTS:
        if row.name == name:
            return row.channels
    row = _template_name(name)
    if row is not None:
        level = int(name[len(row.name.partition("{level}")[0]):len(name) - len(row.name.partition("{level}")[2])])
        return _expand(row, level).channels
    parse_channel(name)
    return (name,)
