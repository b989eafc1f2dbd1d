"""The skill bench's mean of independently trained members: whole trajectories averaged, scored as one model is.

Hand-made members on a hand-made set of windows, so the expected errors follow from arithmetic: member
``2x`` and member ``0x`` average to ``2^(k-1) x0`` after k steps, while a model that averaged their one-step
outputs and fed that back would stay at ``x0``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benches.skill_eval import member_mean_errors, relative_errors
from models.losses import latitude_weights

NLAT, NLON, STEPS = 5, 8, 3


class Scale(nn.Module):
    """A one-step "forecast" that multiplies the state by a constant."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class Windows:
    """What the scorers read of a WindowDataset: length, (input, truth per step) items, grid shape, channels."""

    channels = ["a", "b"]
    grid_shape = (NLAT, NLON)
    steps = STEPS

    def __init__(self, count: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x0 = torch.randn(count, 2, NLAT, NLON, generator=g)
        self.y = torch.randn(count, STEPS, 2, NLAT, NLON, generator=g)

    def __len__(self) -> int:
        return len(self.x0)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x0[i], self.y[i]


def _relative(forecast: torch.Tensor, truth: torch.Tensor, clim: torch.Tensor) -> float:
    w = latitude_weights(NLAT)

    def rmse(a: torch.Tensor) -> torch.Tensor:  # per channel, area-weighted, over all windows
        return (((a - truth) ** 2).mean(-1) * w).sum(-1).mean(0).sqrt()

    return float((rmse(forecast) / rmse(clim.expand_as(truth))).mean())


def test_mean_is_of_trajectories_not_of_steps() -> None:
    data, clim = Windows(20), torch.randn(2, NLAT, NLON, generator=torch.Generator().manual_seed(1))
    got = member_mean_errors([Scale(2.0), Scale(0.0)], data, [1, 2, 3], 6, clim, batch_size=7)
    for k in (1, 2, 3):
        want = _relative(2.0 ** (k - 1) * data.x0, data.y[:, k - 1], clim)
        assert got[f"{6 * k}h"] == pytest.approx(want, rel=1e-6)
    step_mean = _relative(data.x0, data.y[:, 2], clim)  # what feeding back the averaged step would score
    assert got["18h"] != pytest.approx(step_mean, rel=1e-2)


def test_one_member_scores_as_the_bench_scores_that_model() -> None:
    data, clim = Windows(9), torch.zeros(2, NLAT, NLON)
    model = Scale(0.5)
    alone = relative_errors(model, data, [1, 3], 6, clim)  # type: ignore[arg-type]
    got = member_mean_errors([model], data, [1, 3], 6, clim)
    assert got == pytest.approx({lead: v["model"] for lead, v in alone["relative_error"].items()}, rel=1e-6)


def test_no_members_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one member"):
        member_mean_errors([], Windows(2), [1], 6, torch.zeros(2, NLAT, NLON))
