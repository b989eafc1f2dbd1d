"""History and static inputs end to end: windows, the wrapped model, training from either loader, forecast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from core.config import Config, config_from_dict, deep_merge, dump_config
from core.fields import to_channels
from core.grid import get_grid
from models.checkpoint import read_checkpoint
from models.data import WindowDataset, open_analysis
from models.forecast import load_forecaster, rollout
from models.normalization import Normalized, Rollout
from models.sfno import SFNO
from models.statics import GRID_STATICS, grid_statics
from models.train import train
from tests.models.conftest import CHANNELS, moving_planet, tiny_config, write_data

C = len(CHANNELS)


def with_task(config: Config, **task: object) -> Config:
    """``config`` with task fields replaced (validated like a YAML file)."""
    return config_from_dict(deep_merge(dump_config(config), {"task": task}))


def wrapped(history: int, static: list[str], nlat: int = 17, nlon: int = 32) -> Normalized:
    core = SFNO(history * C + len(static), C, nlat, nlon, embed_dim=8, num_layers=1)
    fields = grid_statics(get_grid("tiny"), static) if static else None
    return Normalized(core, [0.0] * C, [1.0] * C, [1.0] * C, history, fields, static)


def test_in_memory_windows_stack_the_history_oldest_first() -> None:
    ds = moving_planet(periods=20)
    ds["done"].values[[7]] = 0
    one = WindowDataset(ds, CHANNELS, "2000-01-01", "2000-01-05T18", steps=2, time_step_hours=6)
    two = WindowDataset(ds, CHANNELS, "2000-01-01", "2000-01-05T18", steps=2, time_step_hours=6, history=2)
    truth = torch.from_numpy(to_channels(ds, CHANNELS).values.astype(np.float32))
    starts = [int(np.flatnonzero(ds.time.values == t)[0]) for t in two.init_times]
    assert starts == [i for i in range(1, 18) if not {i - 1, i, i + 1, i + 2} & {7}]  # i-1 must be done too
    # History 1 may also start at time 0 and right after the missing time (8).
    assert len(one) == len(two) + 2 and {0, 8} <= {int(np.flatnonzero(ds.time.values == t)[0]) for t in one.init_times}
    for k, i in enumerate(starts):
        x, y = two[k]
        assert torch.equal(x, torch.cat([truth[i - 1], truth[i]])) and torch.equal(y, truth[i + 1:i + 3])


def test_the_model_steps_from_the_latest_state_and_carries_its_statics() -> None:
    model = wrapped(2, ["cos_latitude", "sin_longitude"])
    with torch.no_grad():
        for p in model.core.parameters():
            p.zero_()  # a core that outputs zeros is persistence of the latest state
    x = torch.randn(3, 2 * C, 17, 32)
    assert torch.equal(model(x), x[:, C:])
    assert torch.equal(model.advance(x, x[:, :C]), torch.cat([x[:, C:], x[:, :C]], dim=1))
    out = Rollout(model)(x, 3)
    assert out.shape == (3, 3, C, 17, 32)
    assert "static" in model.state_dict()  # the fields travel with the weights
    with pytest.raises(ValueError, match="expects 2 × 3"):
        model(torch.randn(1, C, 17, 32))


def test_the_statics_reach_the_core() -> None:
    seen = {}
    model = wrapped(1, ["cos_latitude"])
    model.core.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    model(torch.zeros(2, C, 17, 32))
    expected = torch.from_numpy(grid_statics(get_grid("tiny"), ["cos_latitude"]))
    assert seen["x"].shape == (2, C + 1, 17, 32) and torch.equal(seen["x"][1, C], expected[0])


def test_grid_statics_follow_the_model_to_another_grid_and_store_statics_refuse() -> None:
    model = wrapped(1, list(GRID_STATICS))
    model.set_grid(33, 64)
    assert torch.equal(model.static, torch.from_numpy(grid_statics(get_grid("5.625deg"), list(GRID_STATICS))))
    assert model(torch.randn(1, C, 33, 64)).shape == (1, C, 33, 64)
    core = SFNO(C + 1, C, 17, 32, embed_dim=8, num_layers=1)
    orography = Normalized(core, [0.0] * C, [1.0] * C, [1.0] * C, 1, np.zeros((1, 17, 32), np.float32), ["orography"])
    with pytest.raises(ValueError, match=r"\['orography'\] come from the training store's grid"):
        orography.set_grid(33, 64)
    with pytest.raises(ValueError, match="1 static names for no static fields"):
        Normalized(core, [0.0] * C, [1.0] * C, [1.0] * C, 1, None, ["orography"])


def final_weights(config: Config) -> dict[str, torch.Tensor]:
    return read_checkpoint(config.paths.runs / config.train.run_name / "last.pt", weights_only=False)["model"]


def test_the_store_loader_trains_exactly_like_the_in_memory_one(tmp_path: Path) -> None:
    write_data(tmp_path, moving_planet())
    base = with_task(tiny_config(tmp_path, max_steps=6, deterministic=True, tensorboard=False),
                     history=2, static_fields=["cos_latitude", "sin_latitude"])
    memory = config_from_dict(deep_merge(dump_config(base), {"train": {"run_name": "memory"}}))
    store = config_from_dict(deep_merge(dump_config(base), {"train": {"run_name": "store", "loader": "zarr",
                                                                       "num_workers": 1}}))
    train(memory)
    train(store)  # windows read from Zarr in a spawned worker process
    a, b = final_weights(memory), final_weights(store)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["static"].shape == (2, 17, 32)
    scores = [read_checkpoint(c.paths.runs / c.train.run_name / "last.pt", weights_only=False)["training"]["position"]["best"]
              for c in (memory, store)]
    assert scores[0] == scores[1]  # the same climatology: the period's done times, read either way


@pytest.fixture(scope="module")
def history_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Path]:
    root = tmp_path_factory.mktemp("history")
    write_data(root, moving_planet())
    config = with_task(tiny_config(root, max_steps=8, tensorboard=False), history=2,
                       static_fields=["cos_latitude", "sin_latitude"])
    return config, train(config)


def test_a_history_checkpoint_forecasts_from_its_past_states(history_run) -> None:
    config, path = history_run
    model, meta = load_forecaster(path)
    assert model.history == 2 and model.static_names == ["cos_latitude", "sin_latitude"]
    assert meta["task"]["history"] == 2 and meta["arch"]["in_channels"] == 2 * C + 2
    analysis = open_analysis(config.paths.analysis_store)
    ds = rollout(model, meta, analysis, "2000-01-17T06", 24)
    assert ds.sizes["lead_time"] == 5 and np.isfinite(ds["geopotential"].values).all()
    lead0 = to_channels(ds.isel(init_time=0, lead_time=0), CHANNELS).values
    np.testing.assert_array_equal(lead0, to_channels(analysis.sel(time="2000-01-17T06"), CHANNELS).values)
    # The same forecast by hand: stack the two analyses, step, compare the first lead.
    x = torch.from_numpy(np.concatenate([to_channels(analysis.sel(time=t), CHANNELS).values
                                         for t in ("2000-01-17T00", "2000-01-17T06")]).astype(np.float32))[None]
    with torch.no_grad():
        first = model(x)[0].numpy()
    np.testing.assert_allclose(to_channels(ds.isel(init_time=0, lead_time=1), CHANNELS).values, first, rtol=1e-6)


def test_a_forecast_without_its_history_in_the_store_is_refused(history_run) -> None:
    config, path = history_run
    model, meta = load_forecaster(path)
    analysis = open_analysis(config.paths.analysis_store)
    first = pd.Timestamp(analysis["time"].values[0])
    with pytest.raises(ValueError, match=f"init_time {first} needs the analysis at {first - pd.Timedelta(hours=6)}"):
        rollout(model, meta, analysis, first, 24)


def test_unknown_static_fields_and_duplicates_are_refused_before_training(tmp_path: Path) -> None:
    write_data(tmp_path, moving_planet())
    config = with_task(tiny_config(tmp_path), static_fields=["orography"])
    with pytest.raises(ValueError, match="unknown static field 'orography'"):
        train(config)
    assert not (config.paths.runs / config.train.run_name).exists()
    with pytest.raises(ValueError, match="names a field twice"):
        with_task(tiny_config(tmp_path), static_fields=["cos_latitude", "cos_latitude"])
