"""models.noise: residual banks and stochastic rollouts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.noise import ResidualNoise, StochasticForecaster
from models.normalization import Rollout


class Damped(nn.Module):
    """A one-step 'model' that halves the state: its residual against a known truth is computable by hand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x


def _windows(n: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(2, 4, 8, generator=g), torch.randn(3, 2, 4, 8, generator=g)) for _ in range(n)]


def test_fit_measures_first_step_residuals_of_the_picked_windows() -> None:
    data = _windows()
    raw = ResidualNoise.fit(Damped(), data, count=4, seed=1, batch_size=3, center=False)
    picks = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))[:4].tolist()
    expected = torch.stack([data[i][1][0] - 0.5 * data[i][0] for i in picks])
    torch.testing.assert_close(raw.bank, expected)
    assert raw.rms() == pytest.approx(expected.double().pow(2).mean(dim=(0, 2, 3)).sqrt().tolist())
    # By default the bank is centred: drawn every step, its mean would act as a constant forcing.
    noise = ResidualNoise.fit(Damped(), data, count=4, seed=1, batch_size=3)
    torch.testing.assert_close(noise.bank, expected - expected.mean(dim=0, keepdim=True))
    assert float(noise.bank.mean(dim=0).abs().max()) < 1e-6
    # count larger than the data takes every window once
    assert len(ResidualNoise.fit(Damped(), data, count=99).bank) == len(data)


def test_stochastic_rollouts_are_seeded_and_draw_per_member_and_step() -> None:
    noise = ResidualNoise(torch.randn(16, 2, 4, 8, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(3, 2, 4, 8)
    a = Rollout(StochasticForecaster(Damped(), noise, seed=5))(x, 4)
    b = Rollout(StochasticForecaster(Damped(), noise, seed=5))(x, 4)
    c = Rollout(StochasticForecaster(Damped(), noise, seed=6))(x, 4)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    first = a[:, 0] - 0.5 * x  # what was added at the first step: a bank member for each batch member
    for member in first:
        assert min(float((member - row).abs().max()) for row in noise.bank) < 1e-6
    assert not torch.allclose(first[0], first[1]) or not torch.allclose(first[1], first[2])
    # A zero bank (or scale 0) is the deterministic model exactly.
    zero = Rollout(StochasticForecaster(Damped(), ResidualNoise(torch.randn(4, 2, 4, 8), scale=0.0)))(x, 4)
    torch.testing.assert_close(zero, Rollout(Damped())(x, 4))


def test_bad_banks_and_mismatched_models_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\(n ≥ 1, channel, lat, lon\)"):
        ResidualNoise(torch.zeros(0, 2, 4, 8))
    with pytest.raises(ValueError, match="non-finite"):
        ResidualNoise(torch.full((2, 2, 4, 8), float("nan")))
    with pytest.raises(ValueError, match="scale must be ≥ 0"):
        ResidualNoise(torch.zeros(2, 2, 4, 8), scale=-1.0)
    with pytest.raises(ValueError, match="no windows"):
        ResidualNoise.fit(Damped(), [])
    with pytest.raises(ValueError, match="another grid or task"):
        StochasticForecaster(Damped(), ResidualNoise(torch.zeros(2, 2, 4, 8)))(torch.zeros(1, 2, 5, 8))
