"""Quadrature-weighted mean squared error on the sphere.

For a field on an equiangular grid with poles, the area mean is ``Σ_i w_i · mean_λ f(φ_i, λ)`` with
the row weights of :attr:`core.grid.Grid.weights` (band areas, summing to 1). The loss is that area
mean of the squared error, per channel, averaged over everything before the channel axis, and
combined over channels with optional weights:

    L = Σ_c a_c · MSE_c / Σ_c a_c,   MSE_c = E_batch Σ_i w_i · mean_λ (ŷ − y)²_c
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from core.grid import grid_for_shape


def latitude_weights(nlat: int, nlon: int = 4) -> torch.Tensor:
    """Area weights of the rows of an equiangular grid with poles, summing to one (float32)."""
    return torch.as_tensor(grid_for_shape(nlat, max(nlon, 4)).weights, dtype=torch.float32)


def sphere_mse_per_channel(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Area-weighted MSE of ``(…, channel, lat, lon)`` tensors per channel, averaged over the leading dims."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if weights.shape != (pred.shape[-2],):
        raise ValueError(f"{weights.numel()} latitude weights for {pred.shape[-2]} latitudes")
    sq = (pred - target).pow(2).mean(dim=-1)  # (…, channel, lat)
    per = (sq * weights.to(sq)).sum(dim=-1)  # (…, channel)
    return per.reshape(-1, per.shape[-1]).mean(dim=0)


class SphereMSE(nn.Module):
    """Area-weighted MSE over the sphere combined over channels with optional channel weights."""

    def __init__(self, channel_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        cw = None if channel_weights is None else torch.as_tensor(channel_weights, dtype=torch.float32)
        if cw is not None and (cw.ndim != 1 or torch.any(cw < 0) or cw.sum() <= 0):
            raise ValueError("channel_weights must be a non-negative 1-D vector with a positive sum")
        self.channel_weights = cw
        self._lat: dict[int, torch.Tensor] = {}

    def _weights(self, nlat: int, device: torch.device) -> torch.Tensor:
        # Cached per resolution so the same loss object works on every grid.
        if nlat not in self._lat:
            self._lat[nlat] = latitude_weights(nlat)
        return self._lat[nlat].to(device)

    def per_channel(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-channel area-weighted MSE, shape ``(channel,)``."""
        return sphere_mse_per_channel(pred, target, self._weights(pred.shape[-2], pred.device))

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar loss: channel-weighted mean of :meth:`per_channel`."""
        per = self.per_channel(pred, target)
        if self.channel_weights is None:
            return per.mean()
        cw = self.channel_weights.to(per)
        if cw.numel() != per.numel():
            raise ValueError(f"{cw.numel()} channel weights for {per.numel()} channels")
        return (per * cw).sum() / cw.sum()
