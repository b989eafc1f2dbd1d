import numpy as np
import pytest

from core.grid import PRESETS, get_grid, parse_grid_attr
from core.variables import channel_names, get_variable, parse_channel


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_have_poles_and_area_weights(name: str) -> None:
    g = get_grid(name)
    assert g.latitudes[0] == 90 and g.latitudes[-1] == -90 and g.latitudes.size == g.nlat
    assert g.longitudes[0] == 0 and np.isclose(g.longitudes[-1], 360 - 360 / g.nlon)
    assert np.isclose(g.weights.sum(), 1.0) and (g.weights > 0).all()
    # A band's weight is its share of the sphere's area: the northern hemisphere is half.
    north = g.weights[g.latitudes > 0].sum() + g.weights[g.latitudes == 0].sum() / 2
    assert np.isclose(north, 0.5)
    assert parse_grid_attr(g.describe()) == g


def test_area_weights_integrate_a_smooth_field() -> None:
    # ∫ sin²φ dA / 4π = 1/3: area weights must converge to it.
    g = get_grid("1.5deg")
    value = (g.weights * np.sin(np.deg2rad(g.latitudes)) ** 2).sum()
    assert abs(value - 1 / 3) < 1e-3


def test_unknown_grid_lists_presets() -> None:
    with pytest.raises(ValueError, match="known presets: tiny"):
        get_grid("2deg")


def test_vocabulary() -> None:
    assert get_variable("geopotential").units == "m**2 s**-2"
    with pytest.raises(ValueError, match="did you mean '2m_temperature'"):
        get_variable("t2m")
    assert channel_names(["temperature", "2m_temperature"], [850, 500]) == ["temperature_850", "temperature_500", "2m_temperature"]
    assert parse_channel("u_component_of_wind_850") == ("u_component_of_wind", 850)
    assert parse_channel("2m_temperature") == ("2m_temperature", None)
    for bad in ("geopotential_501", "humidity_500", "2m_temperature_500"):
        with pytest.raises(ValueError):
            parse_channel(bad)
