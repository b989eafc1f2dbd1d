"""Derived map products, as tables: forecast error, ensemble spread and probability of exceedance.

Each derived product comes from a base product of :mod:`serve.products` and draws a field computed
before rendering (:mod:`serve.derived`), already in display units, so the renderer treats it as any
single-channel product. Names carry a prefix no channel or base product has:

- ``error_<product>``: forecast − analysis of the product's shaded field (speed for wind), on a
  diverging palette centred on 0 with fixed symmetric levels, and the error of its contoured field
  (Z500 of ``z500_t850``) as contours, dashed where negative. Drawn by verification once truth exists.
- ``spread_<product>``: the standard deviation over ensemble members of the shaded field.
- ``prob_<name>``: the percentage of members beyond a threshold (:data:`PROBABILITIES`).

Levels are fixed per display unit (:data:`ERROR_STEPS`, :data:`SPREAD_STEPS`) so a colour means the
same error or spread at every lead, in every run and every product of that unit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from serve.products import KELVIN_TO_C, METRES_PER_SECOND, PA_TO_HPA, Convert, Product, _steps

ERROR_PREFIX = "error_"
SPREAD_PREFIX = "spread_"
PROB_PREFIX = "prob_"
DERIVED_PREFIXES = (ERROR_PREFIX, SPREAD_PREFIX, PROB_PREFIX)

# A difference of temperatures is in kelvin, not degrees Celsius; other units read the same.
_DIFFERENCE_UNITS = {"°C": "K"}

# Display units → (largest error shaded, step): beyond it the extend colours take over.
ERROR_STEPS: dict[str, tuple[float, float]] = {
    "K": (10.0, 1.0), "hPa": (16.0, 2.0), "dam": (16.0, 2.0), "m s⁻¹": (16.0, 2.0), "g kg⁻¹": (5.0, 0.5),
    "kg m⁻²": (20.0, 2.0), "mm": (20.0, 2.0), "Pa s⁻¹": (1.0, 0.1),
}
# Display units → (largest spread shaded, step).
SPREAD_STEPS: dict[str, tuple[float, float]] = {
    "K": (6.0, 0.5), "hPa": (12.0, 1.0), "dam": (12.0, 1.0), "m s⁻¹": (12.0, 1.0), "g kg⁻¹": (3.0, 0.25),
    "kg m⁻²": (10.0, 1.0), "mm": (10.0, 1.0), "Pa s⁻¹": (0.6, 0.05),
}
ERROR_CMAP = "cmo.balance"
SPREAD_CMAP = "cmo.amp"
PROB_CMAP = "cmo.dense"
PROBABILITY_LEVELS = _steps(0, 100, 10)
PERCENT = Convert("%")


@dataclass(frozen=True)
class Threshold:
    """One probability-of-exceedance product: P(field ``op`` ``value``) over members, in %."""

    name: str
    title: str
    field: tuple[str, ...]
    """One channel, or (u, v) whose speed is compared."""
    convert: Convert
    op: str
    """``>`` or ``<``."""
    value: float
    """Threshold in the display units of ``convert``."""


PROBABILITIES: list[Threshold] = [
    Threshold("prob_t2m_below_0C", "Probability of 2 metre temperature below 0 °C", ("2m_temperature",),
              KELVIN_TO_C, "<", 0.0),
    Threshold("prob_wind10m_above_15ms", "Probability of 10 metre wind speed above 15 m s⁻¹",
              ("10m_u_component_of_wind", "10m_v_component_of_wind"), METRES_PER_SECOND, ">", 15.0),
    Threshold("prob_mslp_below_990hPa", "Probability of mean sea level pressure below 990 hPa",
              ("mean_sea_level_pressure",), PA_TO_HPA, "<", 990.0),
    Threshold("prob_t850_above_16C", "Probability of 850 hPa temperature above 16 °C", ("temperature_850",),
              KELVIN_TO_C, ">", 16.0),
]


def difference_units(units: str) -> str:
    """Units of a difference of two values in ``units`` (°C → K)."""
    return _DIFFERENCE_UNITS.get(units, units)


def _symmetric(units: str, table: dict[str, tuple[float, float]]) -> tuple[float, ...]:
    span, step = table.get(units, (10.0, 1.0))
    return _steps(-span, span, step)


def shade_key(kind: str, product: Product) -> str:
    """Array name of a derived product's shaded field (a file-safe name, no channel is spelt so)."""
    return f"{kind}__{product.name}__shade"


def contour_key(kind: str, product: Product) -> str:
    """Array name of a derived product's contoured field."""
    return f"{kind}__{product.name}__contour"


def error_product(base: Product) -> Product:
    """``error_<base>``: forecast − analysis of the base's shaded (and contoured) field."""
    units = difference_units(base.convert.units)
    contour = None
    levels: tuple[float, ...] = ()
    units_c = units
    if base.contour and (base.contour,) != base.shade:
        contour = contour_key("error", base)
        units_c = difference_units((base.contour_convert or base.convert).units)
        levels = tuple(v for v in _symmetric(units_c, ERROR_STEPS) if v != 0)
    title = f"{base.title}: forecast − analysis"
    if contour:
        title += f" (contours: {base.contour.replace('_', ' ')} error, {units_c}, dashed < 0)"
    return Product(ERROR_PREFIX + base.name, title, (shade_key("error", base),), Convert(units),
                   _symmetric(units, ERROR_STEPS), ERROR_CMAP, contour=contour, contour_levels=levels)


def spread_product(base: Product) -> Product:
    """``spread_<base>``: standard deviation over members of the base's shaded field."""
    units = difference_units(base.convert.units)
    top, step = SPREAD_STEPS.get(units, (6.0, 0.5))
    return Product(SPREAD_PREFIX + base.name, f"{base.title}: ensemble spread (standard deviation)",
                   (shade_key("spread", base),), Convert(units), _steps(0, top, step), SPREAD_CMAP)


def probability_product(row: Threshold) -> Product:
    """The map product of one threshold row: percentage of members beyond it."""
    return Product(row.name, f"{row.title} (% of members)", (f"prob__{row.name}__shade",), PERCENT,
                   PROBABILITY_LEVELS, PROB_CMAP)


def thresholds_for(channels: Sequence[str]) -> list[Threshold]:
    """The probability rows a run holding ``channels`` can make."""
    have = set(channels)
    return [row for row in PROBABILITIES if set(row.field) <= have]


def is_derived(name: str) -> bool:
    """Whether a product name is a derived product (error, spread or probability)."""
    return name.startswith(DERIVED_PREFIXES)
