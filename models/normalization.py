"""GraphCast-style normalization that wraps the predictor, so checkpoints work in physical units.

The core network sees the state normalized per channel, ``z = (x − mean) / std``, and predicts the
6-h tendency in units of its standard deviation, so

    x_next = x + core((x − mean) / std) · diff_std

A core that outputs zeros is persistence; the loss compares tendencies scaled by ``diff_std``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


def _as_buffer(values: Sequence[float] | np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(values, dtype=np.float32))
    if t.ndim != 1 or not torch.all(torch.isfinite(t)):
        raise ValueError(f"{name} must be a finite 1-D per-channel vector, got shape {tuple(t.shape)}")
    return t


class Normalized(nn.Module):
    """Wrap a core model so it maps a physical state ``(batch, channel, lat, lon)`` to the next one."""

    def __init__(self, core: nn.Module, mean: Sequence[float] | np.ndarray | torch.Tensor,
                 std: Sequence[float] | np.ndarray | torch.Tensor,
                 diff_std: Sequence[float] | np.ndarray | torch.Tensor) -> None:
        super().__init__()
        self.core = core
        mean_t, std_t, diff_t = (_as_buffer(v, n) for v, n in ((mean, "mean"), (std, "std"), (diff_std, "diff_std")))
        if not (mean_t.shape == std_t.shape == diff_t.shape):
            raise ValueError(f"mean/std/diff_std lengths differ: {len(mean_t)}, {len(std_t)}, {len(diff_t)}")
        if torch.any(std_t <= 0) or torch.any(diff_t <= 0):
            raise ValueError("std and diff_std must be positive")
        # Persistent buffers: the stats travel inside the state_dict and its checksum.
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)
        self.register_buffer("diff_std", diff_t)

    @property
    def num_channels(self) -> int:
        """Number of channels the wrapper normalizes."""
        return int(self.mean.numel())

    @staticmethod
    def _b(v: torch.Tensor) -> torch.Tensor:
        return v[:, None, None]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Physical state → normalized state ``(x − mean) / std``."""
        return (x - self._b(self.mean)) / self._b(self.std)

    def unnormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalized state → physical state ``z · std + mean``."""
        return z * self._b(self.std) + self._b(self.mean)

    def scale_tendency(self, dx: torch.Tensor) -> torch.Tensor:
        """Physical difference → difference in units of the 6-h tendency's std (what the loss sees)."""
        return dx / self._b(self.diff_std)

    def set_grid(self, nlat: int, nlon: int) -> None:
        """Move the wrapped core model to another grid (zero-shot)."""
        self.core.set_grid(nlat, nlon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One model step in physical units: ``x + core(normalize(x)) · diff_std``."""
        if x.shape[-3] != self.num_channels:
            raise ValueError(f"input has {x.shape[-3]} channels, model expects {self.num_channels}")
        return x + self.core(self.normalize(x)) * self._b(self.diff_std)


class Rollout(nn.Module):
    """Autoregressive application of a one-step model (one module call, so DDP sees one forward)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, steps: int) -> torch.Tensor:
        """States after 1 … ``steps`` steps from ``x``: ``(batch, steps, channel, lat, lon)``."""
        out = []
        for _ in range(steps):
            x = self.model(x)
            out.append(x)
        return torch.stack(out, dim=1)
