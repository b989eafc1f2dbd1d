"""Time inputs: the season (and time of day) that one state of a forced planet does not show.

A planet whose forcing follows the seasons — ERA5's Earth, and the shallow-water planet whose jets
swing ±10° of latitude over the year — cannot be forecast for months by a model that sees only the
current state: the same jet position comes in spring (moving poleward) and in autumn (moving back).
Trained on part of a year without a clock, the SFNO learned the seasonal drift of its training
months as a law and carried the jets 10–20° past the planet's range in a year-long rollout.

Each time feature is a pair of constant fields ``(cos θ, sin θ)`` of a phase ``θ = 2π·(t − t₀)/P``
that grows steadily with the valid time ``t`` of the latest input state (no jump at New Year), so a
rollout advances the clock by rotating the pair through ``2π·Δt/P`` — the stack carries its own time
and no caller has to pass one. ``t₀`` is 2000-01-01T00 UTC: ``day_of_year`` has θ = 0 there,
``hour_of_day`` at every midnight UTC.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import get_args

import numpy as np
import torch

from core.config import TimeFeature
from core.errors import ConfigError

REFERENCE = np.datetime64("2000-01-01T00:00:00", "ns")
TROPICAL_YEAR_HOURS = 365.2422 * 24.0
PERIOD_HOURS = {"day_of_year": TROPICAL_YEAR_HOURS, "hour_of_day": 24.0}
TIME_FEATURES = tuple(PERIOD_HOURS)
assert set(TIME_FEATURES) == set(get_args(TimeFeature)), "the config's time features and the clock's differ"


def check_time_features(names: Sequence[str]) -> list[str]:
    """``names`` as a list; ``ValueError`` naming an unknown or repeated feature."""
    names = list(names)
    unknown = [n for n in names if n not in PERIOD_HOURS]
    if unknown:
        raise ConfigError(f"unknown time feature(s) {unknown}: use {list(TIME_FEATURES)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"time features repeat: {names}")
    return names


def clock_values(times: np.ndarray | Sequence[np.datetime64], names: Sequence[str]) -> np.ndarray:
    """``(len(times), 2·len(names))`` float32: cos and sin of each feature's phase at each time."""
    names = check_time_features(names)
    t = np.asarray(times, dtype="datetime64[ns]")
    if np.isnat(t).any():
        raise ValueError("time features need valid times, got NaT")
    hours = (t - REFERENCE).astype(np.int64).astype(np.float64) / 3.6e12
    cols = []
    for name in names:
        period = PERIOD_HOURS[name]
        theta = 2 * np.pi * np.mod(hours, period) / period  # reduced first: float64 phases stay exact for millennia
        cols += [np.cos(theta), np.sin(theta)]
    return np.stack(cols, axis=-1).astype(np.float32) if cols else np.zeros((len(t), 0), np.float32)


def clock_fields(times: np.ndarray | Sequence[np.datetime64], names: Sequence[str], nlat: int,
                 nlon: int) -> torch.Tensor:
    """The clock as constant fields ``(len(times), 2·len(names), nlat, nlon)`` to append to input stacks."""
    values = torch.from_numpy(clock_values(times, names))
    return values[:, :, None, None].expand(-1, -1, nlat, nlon).contiguous()


def advance_clock(clock: torch.Tensor, names: Sequence[str], hours: float) -> torch.Tensor:
    """Clock fields ``(batch, 2·F, lat, lon)`` moved ``hours`` later: each (cos, sin) pair rotated."""
    if not names:
        return clock
    angles = torch.tensor([2 * math.pi * hours / PERIOD_HOURS[n] for n in names], dtype=torch.float64)
    c, s = torch.cos(angles).to(clock.dtype), torch.sin(angles).to(clock.dtype)
    pairs = clock.unflatten(1, (len(names), 2))
    cos_t, sin_t = pairs[:, :, 0], pairs[:, :, 1]
    shape = (1, -1) + (1,) * (cos_t.dim() - 2)
    c, s = c.to(clock.device).view(shape), s.to(clock.device).view(shape)
    new_cos, new_sin = cos_t * c - sin_t * s, sin_t * c + cos_t * s
    # Renormalised so float32 rounding cannot shrink or grow the pair over a year of 6-h steps.
    norm = torch.sqrt(new_cos**2 + new_sin**2).clamp_min(1e-6)
    return torch.stack([new_cos / norm, new_sin / norm], dim=2).flatten(1, 2)
