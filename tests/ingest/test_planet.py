import numpy as np
import pandas as pd
import pytest

from core.config import SyntheticConfig, load_config
from core.grid import get_grid
from ingest.planet import Planet
from ingest.sources import SyntheticSource

FAST = SyntheticConfig(solver_nlat=33, solver_nlon=64, dt_seconds=360, spinup_days=2)
VARS = ["geopotential", "u_component_of_wind", "v_component_of_wind"]


def test_planet_is_seeded_and_continuous() -> None:
    times = list(pd.date_range("2000-01-01", periods=6, freq="6h"))
    one = SyntheticSource(get_grid("tiny"), FAST).fetch(times, VARS, [500])
    # A fresh source asked only for later times must land on the very same values.
    late = SyntheticSource(get_grid("tiny"), FAST).fetch(times[3:], VARS, [500])
    np.testing.assert_array_equal(one.geopotential.values[3:], late.geopotential.values)
    other = SyntheticSource(get_grid("tiny"), FAST.model_copy(update={"seed": 1})).fetch(times[3:], VARS, [500])
    assert not np.allclose(other.u_component_of_wind.values, late.u_component_of_wind.values)
    assert one.geopotential.dtype == np.float32
    # geopotential of a 5,600 m layer spans roughly z500's range
    assert 4.0e4 < float(one.geopotential.min()) and float(one.geopotential.max()) < 6.2e4
    assert 10 < float(np.abs(one.u_component_of_wind).max()) < 150


def test_planet_stays_weather_like_after_spinup() -> None:
    planet = Planet(nlat=33, nlon=64, dt=360, spinup_days=6)
    energies = [planet.energy(planet.state_at(k)) for k in (0, 20, 40)]
    for ke, eddy in energies:
        assert 60 < ke < 300, ke  # the jets neither die nor run away
        assert eddy > 1.0, eddy  # stirring keeps it turbulent


def test_source_rejects_what_it_cannot_make() -> None:
    src = SyntheticSource(get_grid("tiny"), FAST)
    with pytest.raises(ValueError, match="no 'temperature'"):
        src.fetch([pd.Timestamp("2000-01-01")], ["temperature"], [500])
    with pytest.raises(ValueError, match="one level, 500 hPa"):
        src.fetch([pd.Timestamp("2000-01-01")], ["geopotential"], [850])
    with pytest.raises(ValueError, match="not on the planet's 6-hourly axis"):
        src.fetch([pd.Timestamp("2000-01-01T03")], ["geopotential"], [500])
    with pytest.raises(ValueError, match="ingest.source"):
        load_config(env={}, overrides={"ingest": {"source": "grib-ftp"}})
    with pytest.raises(ValueError, match="must divide 6 h"):
        Planet(nlat=17, nlon=32, dt=7000)


def test_dataset_version_tracks_everything_that_changes_values() -> None:
    a = SyntheticSource(get_grid("tiny"), FAST).dataset_version()
    assert a == SyntheticSource(get_grid("tiny"), FAST).dataset_version()
    assert a != SyntheticSource(get_grid("5.625deg"), FAST).dataset_version()
    assert a != SyntheticSource(get_grid("tiny"), FAST.model_copy(update={"seed": 3})).dataset_version()


def test_forecast_step_stirs_as_another_seed_would_or_not_at_all() -> None:
    src = SyntheticSource(get_grid("tiny"), FAST)
    planet = src.planet
    state = planet.state_at(4)
    # Stirred with seed 5's kicks, from this state: exactly what the seed-5 planet's own step does.
    other = Planet(seed=5, nlat=33, nlon=64, dt=360, spinup_days=2)
    np.testing.assert_array_equal(planet.forecast_step(state, 5).uspec.numpy(), other._advance(state).uspec.numpy())
    truth = planet.state_at(5)
    calm = planet.forecast_step(state, None)
    assert calm.sample == truth.sample == 5
    # Unstirred, it misses only the kick: close to the truth but not it, and the input state is left alone.
    diff = np.abs(calm.uspec.numpy() - truth.uspec.numpy()).max()
    assert 0 < diff < 0.05 * np.abs(truth.uspec.numpy()).max()
    np.testing.assert_array_equal(planet.state_at(4).uspec.numpy(), state.uspec.numpy())
    # project() is fetch's sampling of a state on the source's grid.
    fetched = SyntheticSource(get_grid("tiny"), FAST).fetch([pd.Timestamp("2000-01-02T06")], VARS, [500])
    np.testing.assert_array_equal(src.project(truth.uspec).astype(np.float32)[0], fetched.geopotential.values[0, 0])
    with pytest.raises(ValueError, match="the planet's own seed"):
        planet.forecast_step(state, 0)


def test_band_limited_keeps_exactly_what_the_grid_shows() -> None:
    src = SyntheticSource(get_grid("tiny"), FAST)  # 17×32 shows degrees 0–8 of the 33×64 solver's 0–16
    state = src.planet.state_at(3)
    seen = src.band_limited(state.uspec)
    spec = seen.numpy()
    assert np.abs(spec[:, 9:]).max() == 0 and np.abs(state.uspec.numpy()[:, 9:]).max() > 0  # it dropped something
    np.testing.assert_array_equal(spec[:, :9], state.uspec.numpy()[:, :9])
    # What the store holds of the state is the same with or without the dropped degrees.
    np.testing.assert_allclose(src.project(seen), src.project(state.uspec), rtol=0, atol=1e-9)
    assert state.uspec.numpy()[:, 9:].any()  # and the state itself was left alone
