"""Normalization wrapper: normalize∘unnormalize = id, residual form, zero core = persistence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.normalization import Normalized, Rollout

MEAN, STD, DIFF = [5.5e4, 0.0, -1.0], [2.0e3, 10.0, 5.0], [150.0, 2.0, 1.5]


class Zero(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(z)


class Echo(nn.Module):
    """Returns its (normalized) input: lets a test see exactly what the core receives."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z


@pytest.mark.parametrize("seed", range(5))
def test_normalize_unnormalize_is_identity(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    model = Normalized(Zero(), MEAN, STD, DIFF)
    x = torch.tensor(MEAN)[:, None, None] + torch.tensor(STD)[:, None, None] * torch.randn(4, 3, 5, 8, generator=g)
    torch.testing.assert_close(model.unnormalize(model.normalize(x)), x, rtol=1e-6, atol=1e-3)
    z = torch.randn(4, 3, 5, 8, generator=g)
    torch.testing.assert_close(model.normalize(model.unnormalize(z)), z, rtol=1e-5, atol=1e-5)


def test_normalized_state_has_unit_scale() -> None:
    model = Normalized(Zero(), MEAN, STD, DIFF)
    x = torch.tensor(MEAN)[:, None, None] + torch.tensor(STD)[:, None, None] * torch.ones(1, 3, 2, 2)
    torch.testing.assert_close(model.normalize(x), torch.ones(1, 3, 2, 2))


def test_zero_core_is_persistence() -> None:
    x = torch.randn(2, 3, 5, 8) * 100 + 5e4
    assert torch.equal(Normalized(Zero(), MEAN, STD, DIFF)(x), x)


def test_forward_adds_core_output_scaled_by_diff_std() -> None:
    model = Normalized(Echo(), MEAN, STD, DIFF)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64) + torch.tensor(MEAN, dtype=torch.float64)[:, None, None]
    expected = x + model.normalize(x) * torch.tensor(DIFF, dtype=torch.float64)[:, None, None]
    torch.testing.assert_close(model(x), expected.to(model(x).dtype))


def test_scale_tendency_divides_by_diff_std() -> None:
    model = Normalized(Zero(), MEAN, STD, DIFF)
    dx = torch.tensor(DIFF)[:, None, None].expand(3, 4, 4)
    torch.testing.assert_close(model.scale_tendency(dx), torch.ones(3, 4, 4))


def test_stats_are_in_the_state_dict() -> None:
    state = Normalized(Zero(), MEAN, STD, DIFF).state_dict()
    assert {"mean", "std", "diff_std"} <= set(state)
    assert state["std"].tolist() == pytest.approx(STD)


@pytest.mark.parametrize(("std", "diff", "match"), [([1.0, 0.0, 1.0], DIFF, "positive"),
                                                    (STD, [1.0, 2.0], "lengths differ"),
                                                    ([1.0, float("nan"), 1.0], DIFF, "finite")])
def test_invalid_stats_are_rejected(std: list[float], diff: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Normalized(Zero(), MEAN, std, diff)


def test_channel_count_is_checked() -> None:
    with pytest.raises(ValueError, match="channels"):
        Normalized(Zero(), MEAN, STD, DIFF)(torch.zeros(1, 2, 4, 4))


def test_rollout_stacks_autoregressive_steps() -> None:
    class AddOne(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + 1

    out = Rollout(AddOne())(torch.zeros(2, 3, 4, 4), steps=3)
    assert out.shape == (2, 3, 3, 4, 4)
    assert out[:, :, 0, 0, 0].tolist() == [[1.0, 2.0, 3.0]] * 2


def test_rollout_records_gradients_only_for_its_last_grad_steps() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.tensor(0.5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a * x

    model, x = Scale(), torch.ones(1, 1, 2, 2)
    full = Rollout(model)(x, 4)
    assert torch.allclose(full[:, -1], torch.full_like(x, 0.5**4))
    part = Rollout(model)(x, 4, grad_steps=1)
    assert torch.equal(part, full.detach())  # the same states...

    def grad(states: torch.Tensor, i: int) -> float:
        (g,) = torch.autograd.grad(states[:, i].sum(), model.a, retain_graph=True, allow_unused=True)
        return 0.0 if g is None else float(g)

    # ...but only the last step carries a gradient, and only through its own step: d(a·x₃)/da = Σx₃ = 0.5,
    # where the full rollout's is d(a⁴·x)/da = Σ4a³x = 2.0.
    assert [grad(part, i) for i in range(4)] == [0.0, 0.0, 0.0, 0.5]
    assert grad(full, 3) == 2.0
    # With grad_first 2 the first two steps also carry theirs, the second through the first as in the full
    # rollout (d(a²x)/da = Σ2ax = 4.0), while the third stays a constant and the last sees only its own step.
    both = Rollout(model)(x, 4, grad_steps=1, grad_first=2)
    assert torch.equal(both, full.detach())
    assert [grad(both, i) for i in range(4)] == [4.0, 4.0, 0.0, 0.5] == [grad(full, i) for i in range(2)] + [0.0, 0.5]
