"""Stochastic rollouts: the model's one-step residuals added back, as weather the analyses cannot foresee.

A model trained on mean-squared error forecasts the expected next state. Where the truth is stirred
by forcing no analysis shows (the planet's random kicks every 6 h; unresolved processes in the real
atmosphere) the expected state lacks that part's variance, and a long deterministic rollout loses
the eddies the forcing keeps alive (on the planet it settles near its time-mean flow, 0.76 of the
kinetic energy). Adding, each step, a one-step residual ``truth − model`` drawn at random from a
bank measured on training windows puts that variance back with the right spatial structure and the
right balance between fields: for an MSE-optimal model the residual is uncorrelated with the
forecast, so one step's expected variance is the truth's. Residuals are drawn independently per
step and per batch member (the planet's kicks are white in time), and the bank is centred: a finite
bank's mean is a fixed pattern (about rms/√n — 10 m²/s² and 0.07 m/s for 512 planet residuals) that,
drawn every step, forces the flow steadily; uncentred, the planet's years gained energy from month 11
(1.9–2.7× by month 25). Centred, the first year stays within about ±13 % of the truth's kinetic
energy; the second is not yet robust (two checkpoints: 0 and 2 of 4 starts lost their jets; docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from core.errors import DataContractError, MissingInputError


class ResidualNoise:
    """A bank of one-step residuals ``(n, channel, lat, lon)`` in physical units, sampled with replacement."""

    def __init__(self, bank: torch.Tensor, scale: float = 1.0, center: bool = True) -> None:
        if bank.ndim != 4 or bank.shape[0] == 0:
            raise ValueError(f"a residual bank is (n ≥ 1, channel, lat, lon); got shape {tuple(bank.shape)}")
        if not bool(torch.isfinite(bank).all()):
            raise DataContractError("the residual bank holds non-finite values: the model or its data is broken")
        if not scale >= 0:
            raise ValueError(f"noise scale must be ≥ 0, got {scale}")
        self.bank = bank - bank.mean(dim=0, keepdim=True) if center else bank
        self.scale = float(scale)

    @classmethod
    @torch.no_grad()
    def fit(cls, model: nn.Module, dataset: Sequence[Any], count: int = 512, seed: int = 0,
            batch_size: int = 64, scale: float = 1.0, center: bool = True) -> ResidualNoise:
        """Residuals of ``model``'s first step on ``count`` random windows of ``dataset`` (training data)."""
        if len(dataset) == 0:
            raise MissingInputError("no windows to measure the model's residuals on")
        if count < 1:
            raise ValueError(f"residual count must be ≥ 1, got {count}")
        picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].tolist()
        was_training = model.training
        model.eval()
        parts = []
        for start in range(0, len(picks), batch_size):
            items = [dataset[i] for i in picks[start:start + batch_size]]
            x = torch.stack([it[0] for it in items])
            y = torch.stack([it[1][0] for it in items])  # the first target step
            parts.append((y - model(x)).float())
        model.train(was_training)
        return cls(torch.cat(parts), scale, center)

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """``batch`` residuals drawn with replacement, scaled: ``(batch, channel, lat, lon)``."""
        picks = torch.randint(len(self.bank), (batch,), generator=generator)
        return self.bank[picks] * self.scale

    def rms(self) -> list[float]:
        """Root-mean-square of the bank per channel (physical units)."""
        return self.bank.double().pow(2).mean(dim=(0, 2, 3)).sqrt().tolist()


class StochasticForecaster(nn.Module):
    """A one-step model whose every step adds a residual from a :class:`ResidualNoise` bank (seeded)."""

    def __init__(self, model: nn.Module, noise: ResidualNoise, seed: int = 0) -> None:
        super().__init__()
        self.model, self.noise = model, noise
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's next state plus a residual per batch member."""
        new = self.model(x)
        if tuple(new.shape[1:]) != tuple(self.noise.bank.shape[1:]):
            raise ValueError(f"model output {tuple(new.shape[1:])} does not match the residual bank's "
                             f"{tuple(self.noise.bank.shape[1:])} (channel, lat, lon): another grid or task")
        return new + self.noise.sample(new.shape[0], self.generator).to(new.device, new.dtype)

    def advance(self, x: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """The wrapped model's input stack one step later (history and clock), or ``new`` for a bare model."""
        advance = getattr(self.model, "advance", None)
        return advance(x, new) if advance is not None else new
