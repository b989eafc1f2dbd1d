"""Training windows from the analysis store: an initial state and the K states that follow it.

A window starting at analysis time ``t`` is ``(x(t), [x(t+Δ), …, x(t+KΔ)])`` with Δ the task's time
step; with a history of h states the input is the stack ``x(t−(h−1)Δ), …, x(t)`` (oldest first,
channels concatenated). It exists only if every one of those times lies inside the requested
period and is marked done in the store (completeness comes from the ``done`` flags, never from the values).
The selected period is small, so it is loaded once into memory as float32 (for large periods
``train.loader`` picks :class:`models.zarr_windows.ZarrWindowDataset`, which reads windows per item); the dataset is a plain
map-style dataset and works with ``DistributedSampler``. :func:`training_loader` batches it for one rank.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch.utils.data import DataLoader, Dataset, Sampler

from core.errors import ConfigError, DataContractError, MissingInputError
from core.fields import to_channels
from core.location import as_location, exists, zarr_url
from core.schema import FLAG_VARIABLES, validate_analysis
from models.clock import check_time_features, clock_values

log = logging.getLogger(__name__)


def open_analysis(path: Path | str) -> xr.Dataset:
    """Open the analysis store lazily (no dask) and check it against the contract."""
    path = as_location(path)
    if not exists(path):
        raise MissingInputError(f"analysis store {path} does not exist; run `spherecast ingest` first")
    ds = xr.open_zarr(zarr_url(path), consolidated=False, chunks=None)
    return validate_analysis(ds, what=f"analysis store {path}")


def time_stride(analysis: xr.Dataset, time_step_hours: int) -> int:
    """How many analysis times make one model step; ``ValueError`` if it is not a whole number."""
    times = analysis["time"].values
    if times.size < 2:
        raise DataContractError("the analysis holds fewer than 2 times, so its time step is unknown")
    store_h = (times[1] - times[0]) / np.timedelta64(1, "h")
    stride = time_step_hours / store_h
    if stride < 1 or stride != int(stride):
        raise ConfigError(f"model time step {time_step_hours} h is not a multiple of the analysis step {store_h:g} h")
    return int(stride)


class WindowDataset(Dataset):
    """``(x0, targets)`` windows, ``x0`` ``(history·channel [+ 2·time features], lat, lon)`` and ``targets`` ``(steps, channel, lat, lon)``."""

    def __init__(self, analysis: xr.Dataset, channels: list[str], start: datetime | str, end: datetime | str,
                 steps: int, time_step_hours: int, history: int = 1, time_features: Sequence[str] = ()) -> None:
        if steps < 1 or history < 1:
            raise ValueError(f"steps and history must be ≥ 1, got steps={steps}, history={history}")
        self.channels = list(channels)
        self.steps, self.history = steps, history
        self.stride = time_stride(analysis, time_step_hours)
        period = analysis.sel(time=slice(pd.Timestamp(start), pd.Timestamp(end)))
        self.times = period["time"].values
        self.done = period["done"].values.astype(bool)
        span, back = steps * self.stride, (history - 1) * self.stride
        starts = [i for i in range(back, len(self.times) - span)
                  if all(self.done[i + k * self.stride] for k in range(1 - history, steps + 1))]
        self.index = np.asarray(starts, dtype=np.int64)
        self.time_features = check_time_features(time_features)
        self.clock = torch.from_numpy(clock_values(self.times, self.time_features))  # (time, 2F), appended to x
        names = sorted({v for v in period.data_vars if v not in FLAG_VARIABLES})
        arr = to_channels(period[names], self.channels).values if len(self.times) else np.zeros((0,))
        self.data = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        if self.data.numel() and not torch.isfinite(self.data[torch.from_numpy(self.done)]).all():
            raise DataContractError(f"analysis has non-finite values at done times in {start}..{end}")
        log.info("%d windows of %d steps in %s..%s (%d of %d times done)", len(self.index), steps,
                 pd.Timestamp(start), pd.Timestamp(end), int(self.done.sum()), len(self.times))

    def __len__(self) -> int:
        """Number of complete windows."""
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Window ``i``: the initial state and the ``steps`` states that follow it."""
        j = int(self.index[i])
        stop = j + self.steps * self.stride + 1
        x = self.data[j] if self.history == 1 else self.data[j - (self.history - 1) * self.stride:j + 1:self.stride].flatten(0, 1)
        if self.time_features:
            x = torch.cat([x, self.clock[j][:, None, None].expand(-1, *x.shape[-2:])])
        return x, self.data[j + self.stride:stop:self.stride]

    @property
    def init_times(self) -> np.ndarray:
        """Initial (latest input) times of the windows (datetime64)."""
        return self.times[self.index]

    @property
    def grid_shape(self) -> tuple[int, int]:
        """``(nlat, nlon)`` of the states."""
        return int(self.data.shape[-2]), int(self.data.shape[-1])

    def time_mean(self) -> torch.Tensor:
        """Mean state over the done times of the period (a climatology for relative errors)."""
        rows = np.flatnonzero(self.done)
        if rows.size == 0:
            raise MissingInputError("no done times in the period")
        return streamed_mean(lambda r: self.data[torch.from_numpy(r)], rows)


MEAN_GROUP = 8  # states read and summed at once by streamed_mean


def streamed_mean(read: Callable[[np.ndarray], torch.Tensor], rows: np.ndarray) -> torch.Tensor:
    """Mean over ``rows`` of the states ``read(rows)`` returns, read ``MEAN_GROUP`` at a time, summed in float64.

    Both loaders' climatologies go through here in the same order, so they are bit for bit equal, and the store
    loader never holds more than a group of states (a float32 mean of all rows at once would read them all).
    """
    if rows.size == 0:
        raise MissingInputError("no done times to average")
    total: torch.Tensor | None = None
    for start in range(0, rows.size, MEAN_GROUP):
        part = read(rows[start:start + MEAN_GROUP]).double().sum(dim=0)
        total = part if total is None else total + part
    return (total / rows.size).float()  # type: ignore[operator]


def training_loader(dataset: Dataset, sampler: Sampler, per_rank_batch: int, workers: int,
                    device: torch.device) -> DataLoader:
    """The DataLoader one rank trains from: its sampler's whole batches, pinned for a CUDA device."""
    # Pinned (page-locked) batches let the trainer's ``.to(device, non_blocking=True)`` overlap the copy with
    # compute; on the CPU there is nothing to copy to. Workers are spawned: Zarr's event-loop thread would be
    # inherited locked by a forked child.
    return DataLoader(dataset, batch_size=per_rank_batch, sampler=sampler, drop_last=True, num_workers=workers,
                      multiprocessing_context="spawn" if workers else None, persistent_workers=workers > 0,
                      prefetch_factor=2 if workers else None, pin_memory=device.type == "cuda")
