"""Pole rows that keep the form the data gives them.

On a grid with both poles, each pole row holds ``nlon`` copies of one point, so the data's pole
rows carry a single longitudinal wavenumber: ERA5 on its regular grid writes every field (winds
included) as a constant row, wavenumber 0; the shallow-water planet writes scalars as constants and
its winds as the lat/lon components of one vector, ``a·cos λ + b·sin λ``, wavenumber 1. Nothing in
the network keeps that form: the area weight of a pole row is tiny, so the loss barely sees it, and
its pointwise layers can feed a pole row back on itself. On the planet a stochastic year drove the
zonal-mean zonal wind on the north pole row to 36 m/s (the data's is exactly 0), which the jet
diagnostics read as a jet at the pole (docs/benchmarks.md). With ``task.pole_rows = "data"`` the
training run measures which wavenumber each channel's pole rows hold on a few training times
(:func:`measure_pole_modes`, recorded in the checkpoint as ``pole_modes``) and the model projects each
step's tendency on the two pole rows onto it (:func:`project_pole_rows`), so a state whose pole rows
have the data's form keeps it for any number of steps. Rows whose data holds neither form are left free.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import numpy as np
import pandas as pd
import torch
import xarray as xr

from core.errors import MissingInputError
from core.fields import to_channels

CONSTANT, WAVENUMBER_1, FREE = 0, 1, -1
MODES = (CONSTANT, WAVENUMBER_1, FREE)
# A pole row "holds one wavenumber" when the others carry less than this fraction of its energy: float32 storage
# leaves at most 1e-15 (the planet's winds; ERA5's sample rows are exactly constant), while a row of real
# longitudinal structure is far above.
TOLERANCE = 1e-6
SAMPLES = 8


def classify_pole_rows(rows: np.ndarray) -> list[list[int]]:
    """Per pole and channel, the one wavenumber ``rows`` ``(time, channel, 2 poles, nlon)`` hold: 0, 1, or -1 (free)."""
    if rows.ndim != 4 or rows.shape[2] != 2 or rows.shape[0] == 0:
        raise ValueError(f"pole rows are (time ≥ 1, channel, 2, nlon); got shape {rows.shape}")
    energy = (np.abs(np.fft.rfft(rows.astype(np.float64), axis=-1)) ** 2).sum(axis=0)  # (channel, pole, m)
    total = energy.sum(axis=-1)
    modes = np.full(total.shape, FREE, dtype=int)
    for m in (WAVENUMBER_1, CONSTANT):  # a row of zeros holds every form: call it constant
        if energy.shape[-1] > m:
            modes[energy[..., m] >= (1.0 - TOLERANCE) * total] = m
    modes[~np.isfinite(total)] = FREE
    return modes.T.tolist()  # (pole, channel)


def measure_pole_modes(analysis: xr.Dataset, channels: list[str], start: datetime, end: datetime,
                       samples: int = SAMPLES) -> list[list[int]]:
    """The form of each channel's north and south pole rows on ``samples`` done times of ``start``..``end``."""
    times = pd.DatetimeIndex(analysis["time"].values)
    done = analysis["done"].values.astype(bool) & (times >= pd.Timestamp(start)) & (times <= pd.Timestamp(end))
    picks = np.flatnonzero(done)
    if picks.size == 0:
        raise MissingInputError(f"no done analysis times in {start}..{end} to measure the pole rows on")
    picks = picks[np.unique(np.linspace(0, picks.size - 1, min(samples, picks.size)).round().astype(int))]
    nlat = analysis.sizes["latitude"]
    rows = to_channels(analysis.isel(time=picks, latitude=[0, nlat - 1]), channels).values
    return classify_pole_rows(rows)


def pole_masks(modes: Sequence[Sequence[int]]) -> torch.Tensor:
    """Float masks ``(form: constant / wavenumber 1 / free, pole, channel, 1)`` of the codes ``modes``."""
    codes = torch.tensor(modes)
    return torch.stack([(codes == m).float() for m in MODES])[..., None]


def project_pole_rows(dx: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``dx`` ``(…, channel, lat, lon)`` with each pole row projected onto its channel's form (``pole_masks``)."""
    n, dtype = dx.shape[-1], torch.promote_types(dx.dtype, torch.float32)  # sums of nlon terms: not in bf16
    rows = torch.stack([dx[..., 0, :], dx[..., -1, :]], dim=-3).to(dtype)  # (…, pole, channel, lon)
    lon = torch.arange(n, device=dx.device, dtype=dtype) * (2 * torch.pi / n)
    cos, sin = torch.cos(lon), torch.sin(lon)
    constant = rows.mean(dim=-1, keepdim=True).expand_as(rows)
    wave = (2.0 / n) * ((rows * cos).sum(-1, keepdim=True) * cos + (rows * sin).sum(-1, keepdim=True) * sin)
    m = masks.to(dx.device, dtype)
    rows = (m[0] * constant + m[1] * wave + m[2] * rows).to(dx.dtype)
    return torch.cat([rows[..., 0, :, None, :], dx[..., 1:-1, :], rows[..., 1, :, None, :]], dim=-2)

