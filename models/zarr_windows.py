"""Training windows read from the analysis store item by item: history, multistep targets, static fields.

:class:`models.data.WindowDataset` loads a period into memory, which is right for the planet and
wrong for years of 0.25° ERA5. This dataset keeps only the window index and reads each window's
times from the Zarr store when asked (one inner chunk per time and variable: the store keeps one
time per chunk), so a ``DataLoader`` with ``num_workers`` prefetches batches in worker processes
while the model trains. Use spawned workers (``multiprocessing_context="spawn"``): Zarr runs an
event-loop thread that a forked child would inherit locked but not running. Store handles are
opened lazily in each process (they are dropped when the
dataset is pickled into a worker).

A window at analysis index ``j`` is ``(x, targets)``::

    x        the states at j − (history−1)·s, …, j − s, j (oldest first), channels concatenated,
             then the clock's fields at j (``models.clock``), then the static fields: shape (history·C + 2F + S, lat, lon)
    targets  the states at j + s, …, j + steps·s: shape (steps, C, lat, lon)

with ``s`` the model step in analysis times. Every one of those times must be inside the period
and marked done (completeness comes from the ``done`` flags, never from the values).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
import zarr
from torch.utils.data import Dataset

from core.errors import DataContractError, MissingInputError
from core.location import as_location
from core.variables import parse_channel
from models.clock import check_time_features, clock_values
from models.data import open_analysis, streamed_mean, time_stride
from models.statics import GRID_STATICS, static_fields

__all__ = ["GRID_STATICS", "ZarrWindowDataset", "static_fields"]

log = logging.getLogger(__name__)


class ZarrWindowDataset(Dataset):
    """``(x, targets)`` windows read from the store per item; see the module docstring for shapes."""

    def __init__(self, path: Path | str, channels: list[str], start: datetime | str, end: datetime | str,
                 steps: int, time_step_hours: int, history: int = 1, static: list[str] | tuple[str, ...] = (),
                 time_features: Sequence[str] = ()) -> None:
        if steps < 1 or history < 1:
            raise ValueError(f"steps and history must be ≥ 1, got steps={steps}, history={history}")
        self.path = as_location(path)
        analysis = open_analysis(self.path)
        self.channels, self.steps, self.history = list(channels), steps, history
        self.stride = time_stride(analysis, time_step_hours)
        times = pd.DatetimeIndex(analysis["time"].values)
        lo, hi = times.searchsorted(pd.Timestamp(start)), times.searchsorted(pd.Timestamp(end), side="right")
        done = analysis["done"].values.astype(bool)
        back, ahead = (history - 1) * self.stride, steps * self.stride
        offsets = np.arange(-back, ahead + 1, self.stride)
        starts = [j for j in range(lo + back, hi - ahead) if done[j + offsets].all()]
        self.index = np.asarray(starts, dtype=np.int64)
        self.done_rows = lo + np.flatnonzero(done[lo:hi])  # the period's done times, for its climatology
        self.offsets = offsets
        self.times = times.values
        self.time_features = check_time_features(time_features)
        self.clock = torch.from_numpy(clock_values(self.times, self.time_features))  # (time, 2F)
        self.sources = self._sources(analysis)
        self.static = torch.from_numpy(static_fields(analysis, static)) if static else None
        self.static_names = list(static)
        self._arrays: dict[str, Any] | None = None
        log.info("%d windows (history %d, %d steps) in %s..%s, read from %s", len(self.index), history, steps,
                 pd.Timestamp(start), pd.Timestamp(end), self.path)

    def _sources(self, analysis: xr.Dataset) -> list[tuple[str, int | None]]:
        """For each channel, the store variable and level index it is read from."""
        out = []
        levels = [int(v) for v in analysis["level"].values] if "level" in analysis.coords else []
        for ch in self.channels:
            name, level = parse_channel(ch)
            if name not in analysis.data_vars:
                raise DataContractError(f"analysis store {self.path} has no variable {name!r} (channel {ch!r})")
            if level is not None and level not in levels:
                raise DataContractError(f"analysis store {self.path} has no level {level} for channel {ch!r}")
            out.append((name, levels.index(level) if level is not None else None))
        return out

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes open their own store handles: an open Zarr array is not shared state.
        return {**self.__dict__, "_arrays": None}

    def _array(self, name: str) -> Any:
        if self._arrays is None:
            group = zarr.open_group(str(self.path), mode="r", use_consolidated=None)
            self._arrays = {n: group[n] for n, _ in self.sources}
        return self._arrays[name]

    def __len__(self) -> int:
        """Number of complete windows."""
        return len(self.index)

    def read_states(self, rows: np.ndarray) -> torch.Tensor:
        """The states at analysis indices ``rows``: ``(len(rows), C, lat, lon)`` float32."""
        first = self._array(self.sources[0][0])
        out = np.empty((len(rows), len(self.channels), *first.shape[-2:]), dtype=np.float32)
        by_var: dict[str, list[tuple[int, int | None]]] = {}
        for c, (name, level) in enumerate(self.sources):
            by_var.setdefault(name, []).append((c, level))
        for name, targets in by_var.items():
            values = self._array(name).get_orthogonal_selection((rows,))  # one read per variable
            for c, level in targets:
                out[:, c] = values[:, level] if level is not None else values
        return torch.from_numpy(out)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Window ``i``: the input stack (history, then static fields) and the ``steps`` target states."""
        j = int(self.index[i])
        states = self.read_states(j + self.offsets)
        if not torch.isfinite(states).all():
            bad = pd.Timestamp(self.times[j])
            raise DataContractError(f"analysis store {self.path}: NaN/Inf in a done time of the window at {bad}")
        x = states[: self.history].reshape(-1, *states.shape[-2:])
        if self.time_features:
            x = torch.cat([x, self.clock[j][:, None, None].expand(-1, *x.shape[-2:])])
        if self.static is not None:
            x = torch.cat([x, self.static])
        return x, states[self.history:]

    @property
    def init_times(self) -> np.ndarray:
        """Initial (latest input) times of the windows (datetime64)."""
        return self.times[self.index]

    @property
    def grid_shape(self) -> tuple[int, int]:
        """``(nlat, nlon)`` of the states."""
        shape = self._array(self.sources[0][0]).shape
        return int(shape[-2]), int(shape[-1])

    def time_mean(self, max_times: int = 1024) -> torch.Tensor:
        """Mean state over the period's done times (a climatology); above ``max_times`` over that many evenly spaced."""
        rows = self.done_rows
        if rows.size == 0:
            raise MissingInputError(f"no done times in {self.path} to average")
        if rows.size > max_times:  # years of ERA5: a sample of the period
            rows = np.unique(rows[np.linspace(0, rows.size - 1, max_times).round().astype(int)])
        return streamed_mean(self.read_states, rows)  # a few states in memory at a time, never the period

    @property
    def in_channels(self) -> int:
        """Channels of the input stack: history × prognostic channels + static fields."""
        return self.history * len(self.channels) + 2 * len(self.time_features) + len(self.static_names)
