"""The one configuration object: toy/demo defaults, overridden by a YAML file and ``SPHERECAST_*``.

Environment overrides use ``__`` between section and field: ``SPHERECAST_TRAIN__BATCH_SIZE=16``.
Values are parsed as YAML, so lists and numbers work (``SPHERECAST_TASK__LEVELS='[500, 850]'``).
Secrets never live here: cdsapi reads ``~/.cdsapirc`` or ``CDSAPI_URL``/``CDSAPI_KEY`` itself.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from core.config_base import Moment, _Section
from core.config_ingest import CdsConfig, FilesConfig, IngestConfig, MirrorConfig, SyntheticConfig
from core.config_model import ModelConfig
from core.config_ops import (
    EnsembleConfig,
    ForecastConfig,
    InitialConditionsConfig,
    OpenDataConfig,
    VerifyConfig,
)
from core.config_train import TrainConfig
from core.errors import ConfigError
from core.grid import Grid, check_scale_factor, get_grid
from core.location import as_location, is_remote, is_url
from core.variables import channel_names, check_level, get_variable

# The ingest, model and train sections live in their own modules; they are re-exported here, the one import path.
__all__ = ["CdsConfig", "Config", "EnsembleConfig", "FilesConfig", "ForecastConfig", "IngestConfig",
           "InitialConditionsConfig", "MirrorConfig", "ModelConfig", "OpenDataConfig", "SyntheticConfig", "TrainConfig",
           "VerifyConfig", "Moment",
           "absolute_paths", "config_from_dict", "deep_merge", "load_config", "dump_config", "channels_of"]

ENV_PREFIX = "SPHERECAST_"
TimeFeature = Literal["day_of_year", "hour_of_day"]  # models.clock computes them


class PathsConfig(_Section):
    root: Path = Path("spherecast-out")
    """Directory every default path below lives in."""
    data_dir: Path | str | None = None
    """Analysis store and stats; default ``<root>/data``. May be an object-store URL (``s3://bucket/data``)."""
    runs_dir: Path | None = None
    """Training runs and checkpoints; default ``<root>/runs``."""
    forecasts_dir: Path | None = None
    """Published forecast runs; default ``<root>/forecasts``."""

    @field_validator("root", "runs_dir", "forecasts_dir", mode="before")
    @classmethod
    def _local(cls, value: object) -> object:
        if is_url(value):
            raise ConfigError(f"{value!r} is a URL: only paths.data_dir (the analysis store and its statistics) "
                              "may be on an object store; runs and forecasts are local directories")
        return value

    @field_validator("data_dir", mode="before")
    @classmethod
    def _path_or_url(cls, value: object) -> object:
        # A URL stays a string (Path would fold "s3://b" into "s3:/b"); a path becomes a Path.
        if value is None:
            return None
        location = as_location(str(value)) if is_url(value) else Path(value)  # type: ignore[arg-type]
        return str(location) if is_remote(location) else location

    @property
    def data(self) -> Path:
        """Resolved data directory: a local Path, or a UPath on an object store."""
        return as_location(self.data_dir) if self.data_dir is not None else self.root / "data"

    @property
    def local_data(self) -> Path:
        """A local directory for what the data directory holds that must stay on this machine (downloads)."""
        return self.root / "data" if is_remote(self.data) else self.data

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

    @property
    def initial_conditions_store(self) -> Path:
        """Path of the live initial-conditions Zarr store (same contract as the analysis, labelled by source)."""
        return self.data / "initial-conditions.zarr"

    @property
    def verification(self) -> Path:
        """Directory of per-run scores, scorecards and the default scores database."""
        return self.root / "verification"


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
    static_fields: list[str] = []
    """Static inputs appended to the model's input: cos/sin_latitude, cos/sin_longitude, or store variables without time."""
    time_features: list[TimeFeature] = []
    """Time inputs, each as cos and sin of its phase at the latest input's valid time: ``day_of_year`` (the season:
    needed for rollouts of months on a planet with seasons) and ``hour_of_day`` (UTC; the diurnal cycle)."""
    pole_rows: Literal["data", "free"] = "data"
    """``data``: training measures the longitudinal form of each channel's pole rows (ERA5: constant; the planet's
    winds: wavenumber 1) and every step keeps it (models/poles.py); ``free``: the pole rows are the network's own."""

    @field_validator("variables")
    @classmethod
    def _vocab(cls, value: list[str]) -> list[str]:
        if not value:
            raise ConfigError("task.variables is empty")
        for name in value:
            get_variable(name)
        return value

    @field_validator("levels")
    @classmethod
    def _levels(cls, value: list[int]) -> list[int]:
        return [check_level(v) for v in value]

    @field_validator("static_fields", "time_features")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ConfigError(f"names a field twice: {value}")
        return value

    @field_validator("time_step_hours", "history")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ConfigError("must be ≥ 1")
        return value

    def channels(self) -> list[str]:
        """Ordered channel names of the task."""
        return channel_names(self.variables, self.levels)


DEFAULT_MAP_REGIONS = ["global", "global_robinson", "europe", "north_america", "arctic", "antarctic"]
_MAP_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,39}\Z")


def check_map_box(name: str, lon_min: float, lon_max: float, lat_min: float, lat_max: float) -> None:
    """Raise ``ValueError`` naming the box unless it is a non-empty, non-reversed lon/lat box on the globe."""
    if not _MAP_NAME_RE.match(name):
        raise ConfigError(f"map region name {name!r} must be lower-case letters, digits and '_' (≤ 40, letter first)")
    if not -90.0 <= lat_min < lat_max <= 90.0:
        raise ConfigError(f"map region {name!r}: latitudes {lat_min}…{lat_max} must satisfy -90 ≤ lat_min < lat_max ≤ 90 "
                          "(a reversed or empty box)")
    if not (-180.0 <= lon_min < lon_max <= 360.0 and lon_max - lon_min <= 360.0):
        raise ConfigError(f"map region {name!r}: longitudes {lon_min}…{lon_max} must satisfy lon_min < lon_max, "
                          "both in -180…360 and at most 360° apart (a reversed or empty box)")


class MapBox(_Section):
    """A user-defined map region: a lon/lat box drawn in PlateCarree or LambertConformal."""

    name: str
    lon_min: float
    lon_max: float
    lat_min: float
    lat_max: float
    projection: Literal["PlateCarree", "LambertConformal"] = "PlateCarree"

    @model_validator(mode="after")
    def _box(self) -> MapBox:
        check_map_box(self.name, self.lon_min, self.lon_max, self.lat_min, self.lat_max)
        return self


class RenderConfig(_Section):
    dpi: int = 80
    """Resolution of the map PNGs."""
    natural_earth_dir: Path | None = None
    """Directory in cartopy's Natural Earth layout; default the copy shipped inside serve/."""
    regions: list[str] = ["global"]
    """Regions to map (built-in names, see docs/maps.md, or names of ``boxes``); spherecast.yaml maps all six
    built-in ones with every core (the demo keeps to the global map, cheap on 2 cores)."""
    boxes: list[MapBox] = []
    """User-defined lon/lat boxes; list a box's name in ``regions`` to draw it."""
    products: list[str] | None = None
    """Products to draw (serve/products.py names); None: every product the run's variables allow."""
    workers: int = Field(default=1, ge=0, le=256)
    """Processes rendering maps in parallel (0: one per CPU core)."""
    animations: bool = True
    """Also write an animated GIF and an MP4 per product and region (one frame per lead)."""

    @model_validator(mode="after")
    def _unique(self) -> RenderConfig:
        names = [b.name for b in self.boxes]
        if len(set(names)) != len(names) or set(names) & set(DEFAULT_MAP_REGIONS):
            raise ConfigError(f"render.boxes names {names} must be unique and differ from the built-in regions")
        return self


_ORIGIN_RE = re.compile(r"https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?\Z")
_ROOT_PATH_RE = re.compile(r"(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)*\Z")


def check_root_path(value: str) -> str:
    """A URL prefix the app is mounted under behind a proxy: empty, or ``/a/b`` (no trailing slash, no query)."""
    if not _ROOT_PATH_RE.match(value):
        raise ConfigError(f"{value!r} is not a URL path prefix: use '' or e.g. '/spherecast' "
                          "(starts with '/', no trailing '/', no query, no spaces)")
    return value


def check_cors_origins(values: list[str]) -> list[str]:
    """Browser origins allowed cross-origin: ``*`` alone, or ``scheme://host[:port]`` each (no path)."""
    if "*" in values and len(values) > 1:
        raise ConfigError("'*' allows every origin and cannot be combined with other origins")
    for value in values:
        if value != "*" and not _ORIGIN_RE.match(value):
            raise ConfigError(f"{value!r} is not an origin: use scheme://host[:port], e.g. https://maps.example.org "
                              "(no path, no trailing '/'), or '*'")
    return values


class ServeConfig(_Section):
    host: str = "127.0.0.1"
    """Interface the HTTP server binds to."""
    port: int = Field(default=8000, ge=0, le=65535)
    """Port of the HTTP server (0: any free port)."""
    workers: int = Field(default=1, ge=1, le=64)
    """Server processes (uvicorn workers); more than one shares the port and aggregates /metrics across them."""
    root_path: str = ""
    """URL prefix the app is served under behind a reverse proxy that strips it (e.g. ``/spherecast``)."""
    cors_origins: list[str] = []
    """Browser origins allowed to call the API cross-origin; empty: no CORS headers at all."""
    catalog_max_age_s: int = Field(default=60, ge=0, le=86_400)
    """``Cache-Control: max-age`` of catalog JSON answers (run files keep ``no-cache`` with their ETag); 0: no-cache."""
    request_timeout_s: float | None = Field(default=120.0, gt=0, le=3600)
    """A request whose answer has not started within this many seconds gets 503 (a started stream is never cut); None: no limit."""
    timeout_keep_alive_s: int = Field(default=5, ge=1, le=300)
    """Seconds an idle keep-alive connection stays open."""
    limit_concurrency: int | None = Field(default=256, ge=1, le=100_000)
    """Connections and tasks one worker serves at once before answering 503; None: unlimited."""
    shutdown_timeout_s: float = Field(default=10.0, ge=0, le=600)
    """On SIGINT/SIGTERM, seconds open requests (long downloads) may finish before they are closed."""
    subset_max_bytes: int = Field(default=1 << 30, ge=1)
    """Largest estimated (uncompressed) download subset; larger answers 413 with the estimate."""
    area_max_points: int = Field(default=1_000_000, ge=1)
    """Most values (points × parameters × times) one EDR area query may return; more answers 413."""

    @field_validator("root_path")
    @classmethod
    def _root_path(cls, value: str) -> str:
        return check_root_path(value)

    @field_validator("cors_origins")
    @classmethod
    def _cors_origins(cls, value: list[str]) -> list[str]:
        return check_cors_origins(value)


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
    initial_conditions: InitialConditionsConfig = InitialConditionsConfig()
    """Live initial conditions for forecast cycles."""
    forecast: ForecastConfig = ForecastConfig()
    """Forecast runs."""
    verify: VerifyConfig = VerifyConfig()
    """Deferred verification."""
    render: RenderConfig = RenderConfig()
    """Maps."""
    serve: ServeConfig = ServeConfig()
    """HTTP server."""

    @model_validator(mode="after")
    def _model_fits_grid(self) -> Config:
        # Checked here as well as in the model so a bad pair stops before any data is ingested.
        try:
            check_scale_factor(*self.grid.grid().shape, self.model.scale_factor)
        except ValueError as exc:
            raise ConfigError(f"model.scale_factor does not fit grid.preset {self.grid.preset!r}: {exc}") from None
        return self

    def checkpoint_path(self) -> Path:
        """The checkpoint the forecast uses: ``forecast.checkpoint``, else the promoted model, else the run's own."""
        if self.forecast.checkpoint is not None:
            return self.forecast.checkpoint
        from core.lineage import current_checkpoint  # core.lineage imports this module

        # current.json is replaced atomically by a promotion, so this read sees the old or the new model, whole.
        return current_checkpoint(self.paths.runs) or self.paths.runs / self.train.run_name / "checkpoint.pt"


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, recursively for nested mappings (``extra`` wins)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
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
        raise ConfigError(_format_error(exc, origin)) from None


def load_config(path: Path | str | None = None, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Build the config from defaults, a YAML file, ``SPHERECAST_*`` variables, then ``overrides``."""
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping, not {type(loaded).__name__}")
        data = loaded
        origin = str(path)
    from_env = _env_overrides(os.environ if env is None else env)
    if from_env:
        origin += " + SPHERECAST_* environment"
        data = deep_merge(data, from_env)
    if overrides:
        origin += " + parameters"
        data = deep_merge(data, overrides)
    return config_from_dict(data, origin)


def dump_config(config: Config) -> dict[str, Any]:
    """The config as plain JSON/YAML-able data (paths and times as strings)."""
    return config.model_dump(mode="json")


def channels_of(config: Config) -> list[str]:
    """Ordered channels of a config's task (shortcut used by every stage)."""
    return config.task.channels()


def _absolute(path: Path, cwd: Path) -> Path:
    # ``absolute``, not ``resolve``: a symlinked data directory keeps the name an operator gave it.
    path = path.expanduser()
    return path if path.is_absolute() else cwd / path


def _absolute_glob(value: str, cwd: Path) -> str:
    return value if "://" in value else str(_absolute(Path(value), cwd))


def absolute_paths(config: Config, cwd: Path | None = None) -> Config:
    """The config with every relative filesystem path made absolute against ``cwd`` (default: this process's)."""
    # A job sent to a Dask worker runs in the worker's own working directory, on its own host:
    # a relative path there names another place. URLs (``gs://…``) are left as they are.
    cwd = Path.cwd() if cwd is None else Path(cwd)
    p, ing = config.paths, config.ingest
    paths = p.model_copy(update={name: _absolute(getattr(p, name), cwd)
                                 for name in ("root", "data_dir", "runs_dir", "forecasts_dir")
                                 if getattr(p, name) is not None and not is_url(getattr(p, name))})
    ingest = ing.model_copy(update={
        "files": ing.files.model_copy(update={"paths": [_absolute_glob(v, cwd) for v in ing.files.paths]}),
        "cds": ing.cds.model_copy(update={"download_dir": None if ing.cds.download_dir is None
                                           else _absolute(ing.cds.download_dir, cwd)}),
        "mirror": ing.mirror.model_copy(update={"url": _absolute_glob(ing.mirror.url, cwd)}),
    })
    return config.model_copy(update={"paths": paths, "ingest": ingest})
