"""Time features (the model's clock): phases, rotation over a year of steps, windows, the model, training, forecast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from core.config import Config, config_from_dict, deep_merge, dump_config
from core.fields import to_channels
from models.checkpoint import read_checkpoint
from models.clock import TROPICAL_YEAR_HOURS, advance_clock, clock_fields, clock_values
from models.data import WindowDataset, open_analysis
from models.forecast import load_forecaster, rollout
from models.normalization import Normalized, Rollout
from models.sfno import SFNO
from models.train import train
from models.zarr_windows import ZarrWindowDataset
from tests.models.conftest import CHANNELS, moving_planet, tiny_config, write_data

C = len(CHANNELS)
BOTH = ["day_of_year", "hour_of_day"]


def t64(text: str) -> np.datetime64:
    return pd.Timestamp(text).to_datetime64()


def test_phases_start_at_the_reference_and_turn_with_time() -> None:
    got = clock_values([t64("2000-01-01T00"), t64("2000-01-01T06"), t64("2000-01-01T12")], BOTH)
    np.testing.assert_allclose(got[0], [1, 0, 1, 0], atol=1e-6)
    np.testing.assert_allclose(got[1, 2:], [0, 1], atol=1e-6)  # a quarter of a day
    np.testing.assert_allclose(got[2, 2:], [-1, 0], atol=1e-6)
    half_year = np.datetime64("2000-01-01T00:00", "ns") + np.timedelta64(int(TROPICAL_YEAR_HOURS / 2 * 3.6e12), "ns")
    np.testing.assert_allclose(clock_values([half_year], ["day_of_year"])[0], [-1, 0], atol=1e-6)
    # No jump at New Year: 6 h before and after it are as close as any two 6-h neighbours.
    a, b = clock_values([t64("2000-12-31T21"), t64("2001-01-01T03")], ["day_of_year"])
    assert np.linalg.norm(a - b) == pytest.approx(2 * np.sin(np.pi * 6 / TROPICAL_YEAR_HOURS), rel=1e-3)
    with pytest.raises(ValueError, match=r"unknown time feature\(s\) \['season'\]"):
        clock_values([t64("2000-01-01")], ["season"])


def test_rotating_the_clock_for_a_year_of_six_hour_steps_lands_on_the_true_time() -> None:
    start = t64("2000-11-20T18")  # the year of steps crosses a New Year
    clock = clock_fields([start], BOTH, 3, 4)
    for _ in range(1460):
        clock = advance_clock(clock, BOTH, 6.0)
    end = clock_fields([start + np.timedelta64(1460 * 6, "h")], BOTH, 3, 4)
    assert clock.shape == (1, 4, 3, 4)
    torch.testing.assert_close(clock, end, atol=2e-4, rtol=0)


def test_windows_end_with_the_clock_of_their_latest_input_from_memory_and_from_the_store(tmp_path: Path) -> None:
    ds = moving_planet()
    write_data(tmp_path, ds)
    memory = WindowDataset(ds, CHANNELS, "2000-01-01", "2000-01-05", 2, 6, history=2, time_features=BOTH)
    store = ZarrWindowDataset(tmp_path / "data" / "analysis.zarr", CHANNELS, "2000-01-01", "2000-01-05", 2, 6,
                              history=2, time_features=BOTH)
    assert len(memory) == len(store) > 0 and store.in_channels == 2 * C + 4
    for k in (0, len(memory) - 1):
        x, y = memory[k]
        assert x.shape == (2 * C + 4, 17, 32)
        expected = clock_fields([memory.init_times[k]], BOTH, 17, 32)[0]
        assert torch.equal(x[2 * C:], expected)
        xs, ys = store[k]
        assert torch.equal(x, xs) and torch.equal(y, ys)
    plain = WindowDataset(ds, CHANNELS, "2000-01-01", "2000-01-05", 2, 6, history=2)
    assert torch.equal(plain[0][0], memory[0][0][:2 * C])


def clocked(history: int = 1) -> Normalized:
    core = SFNO(history * C + 4, C, 17, 32, embed_dim=8, num_layers=1)
    return Normalized(core, [0.0] * C, [1.0] * C, [1.0] * C, history, time_features=BOTH, step_hours=6)


def test_the_model_passes_its_clock_to_the_core_and_moves_it_on_each_step() -> None:
    model = clocked(history=2)
    seen: list[torch.Tensor] = []
    model.core.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    states = torch.randn(1, 2 * C, 17, 32)
    start = t64("2000-03-01T00")
    x = torch.cat([states, clock_fields([start], BOTH, 17, 32)], dim=1)
    with torch.no_grad():
        out = Rollout(model)(x, 3)
    assert out.shape == (1, 3, C, 17, 32) and len(seen) == 3
    for k, z in enumerate(seen):  # the core's input: normalized states, then the clock at that step's time
        when = start + np.timedelta64(6 * k, "h")
        torch.testing.assert_close(z[:, 2 * C:], clock_fields([when], BOTH, 17, 32), atol=1e-5, rtol=0)
    assert torch.equal(model.latest(x), states[:, C:])
    moved = model.advance(x, out[:, 0])
    assert torch.equal(moved[:, :2 * C], torch.cat([states[:, C:], out[:, 0]], dim=1))
    with pytest.raises(ValueError, match=r"expects 2 × 3 \+ 4 clock fields \(day_of_year, hour_of_day\)"):
        model(states)
    with pytest.raises(ValueError, match="unknown time feature"):
        Normalized(model.core, [0.0] * C, [1.0] * C, [1.0] * C, 1, time_features=["season"])


def test_the_config_names_a_wrong_time_feature() -> None:
    with pytest.raises(ValueError, match="task.time_features.0: Input should be 'day_of_year' or 'hour_of_day'"):
        config_from_dict({"task": {"time_features": ["season"]}})


def with_clock(config: Config, features: list[str]) -> Config:
    return config_from_dict(deep_merge(dump_config(config), {"task": {"time_features": features}}))


@pytest.fixture(scope="module")
def clock_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Path]:
    root = tmp_path_factory.mktemp("clock")
    write_data(root, moving_planet())
    config = with_clock(tiny_config(root, max_steps=6, tensorboard=False, input_noise=0.05), BOTH)
    return config, train(config)


def test_a_clocked_checkpoint_forecasts_with_the_time_moving_on(clock_run) -> None:
    config, path = clock_run
    model, meta = load_forecaster(path)
    assert model.time_features == BOTH and meta["task"]["time_features"] == BOTH
    assert meta["arch"]["in_channels"] == C + 4
    analysis = open_analysis(config.paths.analysis_store)
    ds = rollout(model, meta, analysis, "2000-01-17T06", 12)
    # The same two steps by hand, the clock computed afresh at each valid time.
    x = torch.from_numpy(to_channels(analysis.sel(time="2000-01-17T06"), CHANNELS).values.astype(np.float32))[None]
    with torch.no_grad():
        for k, when in enumerate(("2000-01-17T06", "2000-01-17T12"), start=1):
            x = model(torch.cat([x, clock_fields([t64(when)], BOTH, 17, 32)], dim=1))
            np.testing.assert_allclose(to_channels(ds.isel(init_time=0, lead_time=k), CHANNELS).values, x[0].numpy(),
                                       rtol=1e-5, atol=1e-3)
    # The clock matters: the same state at another time of day steps differently.
    state = torch.from_numpy(to_channels(analysis.sel(time="2000-01-17T06"), CHANNELS).values.astype(np.float32))[None]
    with torch.no_grad():
        a = model(torch.cat([state, clock_fields([t64("2000-01-17T06")], BOTH, 17, 32)], dim=1))
        b = model(torch.cat([state, clock_fields([t64("2000-07-17T18")], BOTH, 17, 32)], dim=1))
    assert not torch.allclose(a, b)


def test_resuming_a_clocked_run_without_its_clock_is_refused_before_any_step(clock_run) -> None:
    config, _ = clock_run
    last = config.paths.runs / config.train.run_name / "last.pt"
    before = last.read_bytes()
    plain = config_from_dict(deep_merge(dump_config(config), {"task": {"time_features": []},
                                                              "train": {"max_steps": 8}}))
    with pytest.raises(ValueError, match="task.time_features"):
        train(plain)
    assert last.read_bytes() == before
    assert read_checkpoint(last, weights_only=False)["meta"]["task"]["time_features"] == BOTH
