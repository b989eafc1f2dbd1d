"""Everything a training run checks and builds before its first step: data, stats, datasets, model, ``last.pt``.

:func:`prepare` raises a ``ValueError`` — for a store that does not fit the config, missing
statistics, too few windows for a batch, a ``last.pt`` that cannot continue this run, a precision or
compile setting the device cannot do — before anything is written. The training loop
(:mod:`models.train`) starts from the :class:`Setup` it returns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
import xarray as xr

from core.config import Config
from core.errors import ConfigError, DataContractError, MissingInputError
from core.grid import Grid, parse_grid_attr
from models.checkpoint import build_meta
from models.data import WindowDataset, open_analysis
from models.distributed import DistContext, set_threads
from models.normalization import Normalized
from models.poles import measure_pole_modes
from models.recorder import LAST
from models.resume import data_signature, load_resumable
from models.runtime import check_compile, resolve_precision, set_deterministic
from models.sfno import SFNO
from models.statics import static_fields
from models.stats import load_stats
from models.zarr_windows import ZarrWindowDataset

log = logging.getLogger(__name__)

Windows = WindowDataset | ZarrWindowDataset


@dataclass
class Setup:
    """Everything a training run needs, built and checked before the first step."""

    config: Config
    ctx: DistContext
    per_rank_batch: int
    grid: Grid
    stats: xr.Dataset
    dataset_version: str
    train_ds: Windows
    val_ds: Windows
    lead_steps: list[int]
    model: Normalized
    run_dir: Path
    precision: str
    signature: dict[str, Any]
    resume: dict[str, Any] | None  # the checked ``last.pt`` to continue, weights already loaded into ``model``


def build_sfno(config: Config, nlat: int, nlon: int) -> SFNO:
    """The SFNO the config describes: the history stack, clock and static fields in, the task's channels out."""
    n = len(config.task.channels())
    n_in = config.task.history * n + 2 * len(config.task.time_features) + len(config.task.static_fields)
    # The model section's field names are SFNO's keyword arguments: a new option is one field and one kwarg.
    return SFNO(n_in, n, nlat, nlon, **config.model.model_dump())


def validation_steps(config: Config) -> list[int]:
    """The validation leads in model steps, sorted; ValueError for a lead that is not a whole number of steps."""
    dt = config.task.time_step_hours
    odd = [h for h in config.train.val_lead_hours if h % dt]
    if odd:
        raise ConfigError(f"train.val_lead_hours {odd} are not multiples of the model step {dt} h")
    return sorted({h // dt for h in config.train.val_lead_hours})


def window_bytes(config: Config, analysis: xr.Dataset) -> int:
    """Bytes the ``memory`` loader would hold per rank: the training and validation periods' fields as float32."""
    t = config.train
    times = pd.DatetimeIndex(analysis["time"].values)
    n = sum(int(times.searchsorted(pd.Timestamp(b), side="right") - times.searchsorted(pd.Timestamp(a)))
            for a, b in ((t.train_start, t.train_end), (t.val_start, t.val_end)))
    return n * len(config.task.channels()) * analysis.sizes["latitude"] * analysis.sizes["longitude"] * 4


def choose_loader(config: Config, analysis: xr.Dataset) -> Literal["memory", "zarr"]:
    """The loader a run uses: ``train.loader``, or for ``auto`` memory below ``train.loader_memory_gib``, else zarr."""
    t = config.train
    if t.loader != "auto":
        return t.loader
    nbytes = window_bytes(config, analysis)
    chosen: Literal["memory", "zarr"] = "memory" if nbytes < t.loader_memory_gib * 2**30 else "zarr"
    log.info("train.loader auto: training + validation fields are %.3f GiB per rank (limit %g GiB): loader %s",
             nbytes / 2**30, t.loader_memory_gib, chosen)
    return chosen


def training_windows(config: Config, analysis: xr.Dataset) -> tuple[Windows, Windows]:
    """The training and validation windows: both in memory, or both read from the store per item (``choose_loader``)."""
    t, task = config.train, config.task
    channels, dt = task.channels(), task.time_step_hours
    lead_steps = max(validation_steps(config))
    if choose_loader(config, analysis) == "zarr":
        def from_store(start: datetime, end: datetime, steps: int) -> Windows:
            return ZarrWindowDataset(config.paths.analysis_store, channels, start, end, steps, dt, task.history,
                                     time_features=task.time_features)
        # Validation windows too: holding the validation period on every rank is what the store loader avoids.
        return from_store(t.train_start, t.train_end, t.rollout_steps), from_store(t.val_start, t.val_end, lead_steps)
    train_ds = WindowDataset(analysis, channels, t.train_start, t.train_end, t.rollout_steps, dt, task.history,
                             task.time_features)
    val_ds = WindowDataset(analysis, channels, t.val_start, t.val_end, lead_steps, dt, task.history, task.time_features)
    return train_ds, val_ds


def prepare(config: Config, ctx: DistContext, batch: int) -> Setup:
    """Open and check data, stats and any ``last.pt`` to resume, build datasets and model; all ValueErrors are here."""
    threads = set_threads(config.train.threads, ctx.world_size)
    t = config.train
    precision = resolve_precision(t.precision, ctx.device)
    if t.compile:
        check_compile(ctx.device)
    analysis = open_analysis(config.paths.analysis_store)
    grid = parse_grid_attr(str(analysis.attrs["grid"]))
    if grid.shape != config.grid.grid().shape:
        raise DataContractError(f"analysis store grid {grid.describe()} does not match config grid {config.grid.preset!r}")
    channels = config.task.channels()
    dt = config.task.time_step_hours
    stats = load_stats(config.paths.stats_file, analysis, channels, dt, (t.val_start, t.val_end))
    lead_steps = validation_steps(config)
    static = static_fields(analysis, config.task.static_fields) if config.task.static_fields else None
    train_ds, val_ds = training_windows(config, analysis)
    if len(train_ds) // ctx.world_size < batch:
        raise MissingInputError(f"{len(train_ds)} complete training windows in {t.train_start}..{t.train_end} "
                                f"cannot fill a batch of {t.batch_size} over {ctx.world_size} ranks")
    if len(val_ds) == 0:
        raise MissingInputError(f"no complete validation windows of {max(lead_steps)} steps in {t.val_start}..{t.val_end}")
    set_deterministic(t.deterministic)
    torch.manual_seed(t.seed)  # same seed on every rank: identical initial weights
    poles = measure_pole_modes(analysis, channels, t.train_start, t.train_end) \
        if config.task.pole_rows == "data" else None
    model = Normalized(build_sfno(config, grid.nlat, grid.nlon), stats["mean"].values, stats["std"].values,
                       stats["diff_std"].values, config.task.history, static, config.task.static_fields,
                       config.task.time_features, dt, poles).to(ctx.device)
    run_dir = config.paths.runs / t.run_name
    dataset_version = str(analysis.attrs["dataset_version"])
    signature = data_signature(config, len(train_ds))
    resumed = None
    if t.resume == "auto":
        expected = build_meta(config, stats, grid, model.core.arch, model.state_dict(), 0, dataset_version, poles)
        resumed = load_resumable(run_dir / LAST, expected, signature, ctx)
        if resumed is not None:
            model.load_state_dict(resumed["model"])
    elif ctx.is_main and (run_dir / LAST).exists():
        log.warning("train.resume=never: starting %s over; its last.pt is replaced at this run's first checkpoint",
                    run_dir)
    if ctx.is_main:
        log.info("training on %s, %d train / %d val windows, batch %d (%d/rank × %d ranks), %d threads/rank, "
                 "%d parameters, %s", grid.describe(), len(train_ds), len(val_ds), t.batch_size, batch,
                 ctx.world_size, threads, sum(p.numel() for p in model.parameters()), precision)
    return Setup(config, ctx, batch, grid, stats, dataset_version, train_ds, val_ds, lead_steps, model, run_dir,
                 precision, signature, resumed["training"] if resumed is not None else None)


def channel_loss_weights(config: Config) -> list[float]:
    """The loss weight of every channel in order; ValueError naming unknown or negative entries."""
    channels = config.task.channels()
    given = config.train.channel_weights
    unknown = sorted(set(given) - set(channels))
    if unknown:
        raise ConfigError(f"train.channel_weights names {unknown}, not channels of this task: {channels}")
    weights = [float(given.get(c, 1.0)) for c in channels]
    if min(weights) < 0 or sum(weights) <= 0:
        raise ConfigError(f"train.channel_weights must be ≥ 0 with a positive sum, got {given}")
    return weights
