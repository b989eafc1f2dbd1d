"""The one configuration object: toy/demo defaults, overridden by a YAML file and ``SPHERECAST_*``.

Environment overrides use ``__`` between section and field: ``SPHERECAST_TRAIN__BATCH_SIZE=16``.
Values are parsed as YAML, so lists and numbers work (``SPHERECAST_TASK__LEVELS='[500, 850]'``).
Secrets never live here: cdsapi reads ``~/.cdsapirc`` or ``CDSAPI_URL``/``CDSAPI_KEY`` itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError, field_validator, model_validator

from core.config_base import Moment, _Section
from core.config_ingest import CdsConfig, FilesConfig, IngestConfig, MirrorConfig, SyntheticConfig
from core.grid import Grid, get_grid
from core.variables import channel_names, check_level, get_variable

# The ingest sections live in core.config_ingest; they are re-exported here, the one import path.
__all__ = ["CdsConfig", "Config", "FilesConfig", "IngestConfig", "MirrorConfig", "SyntheticConfig", "Moment",
           "config_from_dict", "load_config", "dump_config", "channels_of"]

ENV_PREFIX = "SPHERECAST_"


class PathsConfig(_Section):
    root: Path = Path("spherecast-out")
    """Directory every default path below lives in."""
    data_dir: Path | None = None
    """Analysis store and stats; default ``<root>/data``."""
    runs_dir: Path | None = None
    """Training runs and checkpoints; default ``<root>/runs``."""
    forecasts_dir: Path | None = None
    """Published forecast runs; default ``<root>/forecasts``."""

    @property
    def data(self) -> Path:
        """Resolved data directory."""
        return self.data_dir or self.root / "data"

    @property
    def runs(self) -> Path:
        """Resolved runs directory."""
        return self.runs_dir or self.root / "runs"

    @property
    def forecasts(self) -> Path:
        """Resolved forecasts directory."""
        return self.forecasts_dir or self.root / "forecasts"

    @property
    def analysis_store(self) -> Path:
        """Path of the analysis Zarr store."""
        return self.data / "analysis.zarr"

    @property
    def stats_file(self) -> Path:
        """Path of the normalization statistics."""
        return self.data / "stats.nc"


class GridConfig(_Section):
    preset: str = "5.625deg"
    """Grid preset name: tiny, 5.625deg, 2.8125deg, 1.5deg or 0.25deg."""

    @field_validator("preset")
    @classmethod
    def _known(cls, value: str) -> str:
        get_grid(value)
        return value

    def grid(self) -> Grid:
        """The grid object for this preset."""
        return get_grid(self.preset)


class TaskConfig(_Section):
    variables: list[str] = ["geopotential", "u_component_of_wind", "v_component_of_wind"]
    """ERA5 long names of the prognostic variables."""
    levels: list[int] = [500]
    """Pressure levels (hPa) for pressure-level variables."""
    time_step_hours: int = 6
    """Model step and analysis spacing in hours."""
    history: int = 1
    """Number of past analysis times the model sees (1 = the current state only)."""

    @field_validator("variables")
    @classmethod
    def _vocab(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("task.variables is empty")
        for name in value:
            get_variable(name)
        return value

    @field_validator("levels")
    @classmethod
    def _levels(cls, value: list[int]) -> list[int]:
        return [check_level(v) for v in value]

    @field_validator("time_step_hours", "history")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be ≥ 1")
        return value

    def channels(self) -> list[str]:
        """Ordered channel names of the task."""
        return channel_names(self.variables, self.levels)


class ModelConfig(_Section):
    embed_dim: int = 16
    """Width of the SFNO's latent channels."""
    num_layers: int = 4
    """Number of spherical Fourier blocks."""
    mlp_ratio: float = 2.0
    """Hidden width of each block's MLP as a multiple of ``embed_dim``."""
    scale_factor: int = 1
    """Downsampling of the latent grid relative to the data grid (1 = none)."""
    pos_embed: bool = True
    """Add a learned positional embedding (latitude-dependent physics needs it)."""


class TrainConfig(_Section):
    run_name: str = "sfno-demo"
    """Name of the run directory under ``paths.runs``."""
    train_start: Moment = datetime(2000, 1, 1)
    """First analysis time used for training (and statistics)."""
    train_end: Moment = datetime(2000, 3, 5, 18)
    """Last analysis time used for training (and statistics)."""
    val_start: Moment = datetime(2000, 3, 6)
    """First validation time (must come after ``train_end``)."""
    val_end: Moment = datetime(2000, 3, 15, 18)
    """Last validation time."""
    budget_minutes: float = 5.0
    """Wall-clock training budget; training stops at the first step past it."""
    max_steps: int | None = None
    """Optional hard cap on optimizer steps (tests use it for determinism)."""
    batch_size: int = 8
    """Global batch size (split evenly over ranks)."""
    lr: float = 2e-3
    """Peak learning rate (cosine decay over the budget)."""
    rollout_steps: int = 2
    """Autoregressive steps in the multistep loss at the end of the curriculum (its maximum)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Forward-pass precision: bf16 autocast (CPU or CUDA; SHTs stay fp32), fp32, or auto (bf16 on CUDA only)."""
    tensorboard: bool = True
    """Write TensorBoard event files to ``<run>/tensorboard`` (loss, lr, grad norm, throughput, memory, val RMSE)."""
    activation_checkpointing: bool = False
    """Recompute SFNO blocks in the backward pass instead of storing activations (less memory, more compute)."""
    channel_weights: dict[str, float] = {}
    """Loss weight per channel name (e.g. ``{geopotential_500: 2.0}``); channels not listed weigh 1."""
    rollout_start: int = 1
    """Autoregressive steps at the start of training."""
    rollout_increment: int = 1
    """Steps added at each stage of the curriculum."""
    rollout_ramp: float = 0.3
    """Fraction of the budget over which the rollout grows from ``rollout_start`` to ``rollout_steps``."""
    seed: int = 0
    """Seed of weights and data order."""
    threads: int = 0
    """torch intra-op threads per rank (0 = cores / ranks)."""
    nproc_per_node: int = 1
    """Ranks torchrun starts on this machine (GPUs per node, or CPU processes)."""
    nnodes: int = 1
    """Number of nodes in the torchrun rendezvous."""
    rdzv_endpoint: str | None = None
    """host:port of the rendezvous for multi-node runs (None = standalone on this machine)."""
    max_nonfinite_steps: int = 5
    """Steps with a NaN/Inf loss or gradient are skipped and counted; this many in a row stop the run."""
    comm_hook: Literal["none", "powersgd", "signsgd"] = "none"
    """DDP gradient communication: plain all-reduce, PowerSGD low-rank, or 1-bit signSGD with majority vote."""
    powersgd_rank: int = 2
    """Rank of PowerSGD's low-rank approximation of each gradient matrix (smaller = stronger compression)."""
    powersgd_start_iter: int = 10
    """Steps of plain all-reduce before PowerSGD starts compressing (≥ 2: DDP rebuilds its buckets after step 1)."""
    signsgd_error_feedback: bool = True
    """Carry each rank's compression residual into its next gradient (what makes signSGD converge reliably)."""

    @model_validator(mode="after")
    def _periods(self) -> TrainConfig:
        if self.train_end < self.train_start:
            raise ValueError(f"train_end {self.train_end} is before train_start {self.train_start}")
        if self.val_start <= self.train_end:
            raise ValueError(f"val_start {self.val_start} must come after train_end {self.train_end}")
        if self.val_end < self.val_start:
            raise ValueError(f"val_end {self.val_end} is before val_start {self.val_start}")
        if self.batch_size < 1 or self.rollout_steps < 1:
            raise ValueError("batch_size and rollout_steps must be ≥ 1")
        if not 1 <= self.rollout_start <= self.rollout_steps or self.rollout_increment < 1:
            raise ValueError(f"rollout_start {self.rollout_start} must be in 1..rollout_steps ({self.rollout_steps}) "
                             f"and rollout_increment {self.rollout_increment} ≥ 1")
        if not 0 < self.rollout_ramp <= 1:
            raise ValueError(f"rollout_ramp {self.rollout_ramp} must be in (0, 1]")
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps {self.max_nonfinite_steps} must be ≥ 1")
        if self.powersgd_rank < 1:
            raise ValueError(f"powersgd_rank {self.powersgd_rank} must be ≥ 1")
        if self.powersgd_start_iter < 2:
            raise ValueError(f"powersgd_start_iter {self.powersgd_start_iter} must be ≥ 2 (DDP rebuilds its "
                             "gradient buckets after the first step)")
        return self


class ForecastConfig(_Section):
    init_time: Moment | Literal["latest"] = datetime(2000, 3, 20)
    """Initial time of the forecast, or ``latest`` complete analysis."""
    lead_hours: int = 120
    """Forecast length in hours (a multiple of the task's time step)."""
    checkpoint: Path | None = None
    """Checkpoint to run; default ``<runs>/<train.run_name>/checkpoint.pt``."""


class RenderConfig(_Section):
    dpi: int = 80
    """Resolution of the map PNGs."""
    natural_earth_dir: Path | None = None
    """Directory in cartopy's Natural Earth layout; default the copy shipped inside serve/."""


class ServeConfig(_Section):
    host: str = "127.0.0.1"
    """Interface the HTTP server binds to."""
    port: int = 8000
    """Port of the HTTP server."""


class Config(_Section):
    """Everything spherecast needs to run; defaults are the offline demo."""

    paths: PathsConfig = PathsConfig()
    """Where files live."""
    grid: GridConfig = GridConfig()
    """The data and model grid."""
    task: TaskConfig = TaskConfig()
    """What is predicted."""
    model: ModelConfig = ModelConfig()
    """SFNO architecture."""
    train: TrainConfig = TrainConfig()
    """Training run."""
    ingest: IngestConfig = IngestConfig()
    """Analysis ingest."""
    forecast: ForecastConfig = ForecastConfig()
    """Forecast runs."""
    render: RenderConfig = RenderConfig()
    """Maps."""
    serve: ServeConfig = ServeConfig()
    """HTTP server."""

    def checkpoint_path(self) -> Path:
        """The checkpoint the forecast uses."""
        return self.forecast.checkpoint or self.paths.runs / self.train.run_name / "checkpoint.pt"


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        parts = key[len(ENV_PREFIX):].lower().split("__")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else raw
    return out


def _format_error(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key {where!r}")
        else:
            lines.append(f"{where}: {err['msg']}")
    return f"invalid config ({origin}): " + "; ".join(lines)


def config_from_dict(data: Mapping[str, Any], origin: str = "dict") -> Config:
    """Validate a nested mapping into a ``Config``; raise ``ValueError`` naming each bad key."""
    try:
        return Config.model_validate(dict(data))
    except ValidationError as exc:
        raise ValueError(_format_error(exc, origin)) from None


def load_config(path: Path | str | None = None, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Build the config from defaults, a YAML file, ``SPHERECAST_*`` variables, then ``overrides``."""
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping, not {type(loaded).__name__}")
        data = loaded
        origin = str(path)
    from_env = _env_overrides(os.environ if env is None else env)
    if from_env:
        origin += " + SPHERECAST_* environment"
        data = _deep_merge(data, from_env)
    if overrides:
        origin += " + parameters"
        data = _deep_merge(data, overrides)
    return config_from_dict(data, origin)


def dump_config(config: Config) -> dict[str, Any]:
    """The config as plain JSON/YAML-able data (paths and times as strings)."""
    return config.model_dump(mode="json")


def channels_of(config: Config) -> list[str]:
    """Ordered channels of a config's task (shortcut used by every stage)."""
    return config.task.channels()
