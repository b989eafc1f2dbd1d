"""GraphCast-style normalization that wraps the predictor, so checkpoints work in physical units.

The core network sees the state normalized per channel, ``z = (x − mean) / std``, and predicts the
6-h tendency in units of its standard deviation, so

    x_next = x + core((x − mean) / std) · diff_std

A core that outputs zeros is persistence; the loss compares tendencies scaled by ``diff_std``.

With ``history`` h > 1 the input is the stack of the h latest states, oldest first, channels
concatenated (``(batch, h·C, lat, lon)``), each normalized alike; the tendency is added to the
latest. With time features (``models.clock``) the stack ends with the clock's constant fields,
``(batch, h·C + 2F, lat, lon)``: passed to the core as they are and rotated one step on by
:meth:`Normalized.advance`, so a rollout keeps its own time. Static fields (``models.statics``)
ride along as a buffer appended to the core's input, so a checkpoint carries them and a forecast
cannot feed the wrong ones; grid statics are recomputed when the model moves to another grid.
With ``pole_modes`` (``models.poles``) the tendency's two pole rows are projected, per channel, onto the
longitudinal wavenumber the training data's pole rows hold, so the pole rows keep the data's form.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from core.errors import ConfigError
from core.grid import grid_for_shape
from core.schema import check_pole_modes
from models.clock import advance_clock, check_time_features
from models.poles import pole_masks, project_pole_rows
from models.statics import GRID_STATICS, grid_statics


def _as_buffer(values: Sequence[float] | np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(values, dtype=np.float32))
    if t.ndim != 1 or not torch.all(torch.isfinite(t)):
        raise ValueError(f"{name} must be a finite 1-D per-channel vector, got shape {tuple(t.shape)}")
    return t


class Normalized(nn.Module):
    """Wrap a core model so it maps a physical state ``(batch, channel, lat, lon)`` to the next one."""

    def __init__(self, core: nn.Module, mean: Sequence[float] | np.ndarray | torch.Tensor,
                 std: Sequence[float] | np.ndarray | torch.Tensor,
                 diff_std: Sequence[float] | np.ndarray | torch.Tensor, history: int = 1,
                 static: np.ndarray | torch.Tensor | None = None, static_names: Sequence[str] = (),
                 time_features: Sequence[str] = (), step_hours: float = 6.0,
                 pole_modes: Sequence[Sequence[int]] | None = None) -> None:
        super().__init__()
        self.core = core
        mean_t, std_t, diff_t = (_as_buffer(v, n) for v, n in ((mean, "mean"), (std, "std"), (diff_std, "diff_std")))
        if not (mean_t.shape == std_t.shape == diff_t.shape):
            raise ValueError(f"mean/std/diff_std lengths differ: {len(mean_t)}, {len(std_t)}, {len(diff_t)}")
        if torch.any(std_t <= 0) or torch.any(diff_t <= 0):
            raise ValueError("std and diff_std must be positive")
        if history < 1:
            raise ValueError(f"history must be ≥ 1, got {history}")
        # Persistent buffers: the stats travel inside the state_dict and its checksum.
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)
        self.register_buffer("diff_std", diff_t)
        self.history = int(history)
        self.time_features = check_time_features(time_features)
        if self.time_features and not step_hours > 0:
            raise ValueError(f"step_hours must be positive with time features, got {step_hours}")
        self.step_hours = float(step_hours)
        self.static_names = list(static_names)
        if (static is None) != (not self.static_names) or (static is not None and len(static) != len(self.static_names)):
            raise ValueError(f"{len(self.static_names)} static names for "
                             f"{'no' if static is None else len(static)} static fields")
        if static is not None:
            self.register_buffer("static", torch.as_tensor(np.asarray(static, dtype=np.float32)))
        self.set_pole_modes(pole_modes)

    @property
    def in_channels(self) -> int:
        """Channels of the core's input: the history stack, the clock and the static fields."""
        return self.stack_channels + len(self.static_names)

    @property
    def stack_channels(self) -> int:
        """Channels of an input stack: ``history`` states and two clock fields per time feature."""
        return self.history * self.num_channels + 2 * len(self.time_features)

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

    def set_pole_modes(self, modes: Sequence[Sequence[int]] | None) -> None:
        """Keep each step's pole rows to the form ``modes`` (``models.poles``) from now on, or leave them free (None)."""
        # Measured on the training data and recorded in the checkpoint's meta, so not part of the weights.
        self.pole_modes = check_pole_modes(modes, self.num_channels, "model") if modes is not None else None
        masks = pole_masks(self.pole_modes).to(self.mean.device) if self.pole_modes is not None else None
        self.register_buffer("pole_masks", masks, persistent=False)

    def set_grid(self, nlat: int, nlon: int) -> None:
        """Move the wrapped core model (and grid statics) to another grid (zero-shot)."""
        if self.static_names:
            fixed = [n for n in self.static_names if n not in GRID_STATICS]
            if fixed and tuple(self.static.shape[-2:]) != (nlat, nlon):
                raise ConfigError(f"static fields {fixed} come from the training store's grid "
                                  f"{tuple(self.static.shape[-2:])}; the model cannot run on {nlat}x{nlon}")
            if not fixed:
                fields = grid_statics(grid_for_shape(nlat, nlon), self.static_names)
                self.static = torch.from_numpy(fields).to(self.static.device)
        self.core.set_grid(nlat, nlon)

    def latest(self, x: torch.Tensor) -> torch.Tensor:
        """The latest state of an input stack ``(batch, history·C [+ clock], lat, lon)``."""
        end = self.history * self.num_channels
        return x[:, end - self.num_channels:end] if x.shape[1] != self.num_channels else x

    def advance(self, x: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """The input stack one step later: drop the oldest state, append ``new``, move the clock on."""
        if x.shape[1] == self.num_channels:
            return new
        end = self.history * self.num_channels
        parts = [x[:, self.num_channels:end], new] if self.history > 1 else [new]
        if self.time_features:
            parts.append(advance_clock(x[:, end:], self.time_features, self.step_hours))
        return torch.cat(parts, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One model step in physical units: ``latest + core(normalized stack, clock, statics) · diff_std``."""
        c, end = self.num_channels, self.history * self.num_channels
        if x.shape[-3] != self.stack_channels:
            clock = f" + {2 * len(self.time_features)} clock fields ({', '.join(self.time_features)})" \
                if self.time_features else ""
            raise ValueError(f"input has {x.shape[-3]} channels, model expects {self.history} × {c}{clock}")
        states = x[:, :end]
        z = self.normalize(states.unflatten(-3, (self.history, c))).flatten(-4, -3) if self.history > 1 \
            else self.normalize(states)
        if self.time_features:
            z = torch.cat([z, x[:, end:].to(z.dtype)], dim=-3)
        if self.static_names:
            z = torch.cat([z, self.static.to(z.dtype).expand(z.shape[0], -1, -1, -1)], dim=-3)
        dx = self.core(z) * self._b(self.diff_std)
        if self.pole_masks is not None:
            dx = project_pole_rows(dx, self.pole_masks)
        return self.latest(x) + dx


class Rollout(nn.Module):
    """Autoregressive application of a one-step model (one module call, so DDP sees one forward)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, steps: int, grad_steps: int | None = None, grad_first: int = 0) -> torch.Tensor:
        """States after 1 … ``steps`` steps from the input stack ``x``: ``(batch, steps, channel, lat, lon)``.

        With ``grad_steps``, only the last that many steps record gradients (the earlier states are constants),
        and with ``grad_first`` also the first that many (back-propagated through each other, from ``x``).
        """
        return torch.stack(list(self.states(x, steps, grad_steps, grad_first)), dim=1)

    def states(self, x: torch.Tensor, steps: int, grad_steps: int | None = None,
               grad_first: int = 0) -> Iterator[torch.Tensor]:
        """The states after 1 … ``steps`` steps, ``(batch, channel, lat, lon)`` each, one at a time as computed.

        The one autoregressive loop: :meth:`forward` stacks it for training, and a forecast writes each
        state out before the next is computed, so its memory does not grow with the lead time.
        """
        advance = getattr(self.model, "advance", None)  # a bare core (benches) has history 1
        free = steps - grad_steps if grad_steps is not None and grad_steps < steps else 0
        for i in range(steps):
            with torch.no_grad() if grad_first <= i < free else nullcontext():
                new = self.model(x)
            yield new
            x = advance(x, new) if advance is not None else new
