"""The operational sections of the config: forecast cycles and ensembles, live initial conditions, verification."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import field_validator, model_validator

from core.config_base import Moment, _Section
from core.errors import ConfigError

# Ensemble defaults, tuned on the shallow-water planet with benches/ensemble.py (docs/benchmarks.md).
IC_SCALE = 1.0
RESIDUAL_SCALE = 0.9


class EnsembleConfig(_Section):
    """Initial-condition perturbations and stochastic residuals of an ensemble run (``members`` > 1; docs/ensembles.md)."""

    members: int = 1
    """Forecasts per initial time, the unperturbed control (member 0) included; 1 = the deterministic run alone."""
    seed: int = 0
    """Seed of the perturbations (≥ 0): the same seed, init time and member give the same forecast."""
    ic_scale: float = IC_SCALE
    """Initial-condition perturbation rms as a fraction of each channel's 6 h tendency standard deviation."""
    ic_lmax: int = 24
    """Highest spherical-harmonic degree of the initial-condition perturbations (large scales only)."""
    residual_scale: float = RESIDUAL_SCALE
    """Residual added each step to each perturbed member, as a fraction of the model's measured one-step residual
    (``models.noise``; 0 = initial perturbations only). Tuned on the planet (docs/benchmarks.md)."""

    @field_validator("members")
    @classmethod
    def _members(cls, value: int) -> int:
        if value < 1:
            raise ConfigError(f"forecast.ensemble.members must be ≥ 1, got {value}")
        return value

    @model_validator(mode="after")
    def _scales(self) -> EnsembleConfig:
        if self.ic_scale < 0 or self.residual_scale < 0 or self.ic_lmax < 1 or self.seed < 0:
            raise ConfigError("forecast.ensemble.ic_scale, residual_scale and seed must be ≥ 0, ic_lmax ≥ 1")
        return self


class ForecastConfig(_Section):
    init_time: Moment | Literal["latest"] = datetime(2000, 3, 20)
    """Initial time of the forecast, or ``latest`` complete cycle of either store (analysis or initial conditions)."""
    lead_hours: int = 120
    """Forecast length in hours (a multiple of the task's time step)."""
    checkpoint: Path | None = None
    """Checkpoint to run; default the promoted ("current") model, else ``<runs>/<train.run_name>/checkpoint.pt``."""
    source: Literal["auto", "analysis", "initial_conditions"] = "auto"
    """Store the initial state comes from; auto = the one holding the newest complete cycle (initial conditions on a tie)."""
    grid: str | None = None
    """Grid preset to run on (resolution transfer: the same weights, the initial state regridded); default the store's."""
    formats: list[Literal["netcdf", "grib2"]] = ["netcdf", "grib2"]
    """Files written next to ``forecast.zarr``."""
    wait_minutes: float = 90.0
    """How long a cycle waits for its initial conditions to be complete before it fails."""
    poll_seconds: float = 60.0
    """Pause between checks while waiting for initial conditions."""
    max_age_hours: float = 24.0
    """Late-run policy: a scheduled cycle whose init time is older than this is skipped (only the newest missed runs)."""
    cycle_hours: int = 6
    """Hours between scheduled cycles (00/06/12/18 UTC); the newest run's age is judged against it."""
    ic_lag_hours: float = 0.0
    """Hours after its nominal time a cycle's live initial conditions usually appear (ECMWF open data: about 7);
    a scheduled run waits for the cycle of ``now − ic_lag_hours``."""
    keep_runs: int = 28
    """Retention: published runs kept (newest first); the served run and the promoted model's are never removed."""
    ensemble: EnsembleConfig = EnsembleConfig()
    """Ensemble members and perturbations."""

    @model_validator(mode="after")
    def _limits(self) -> ForecastConfig:
        if self.lead_hours < 0:
            raise ConfigError(f"forecast.lead_hours must be ≥ 0, got {self.lead_hours}")
        if self.wait_minutes < 0 or self.poll_seconds <= 0 or self.max_age_hours <= 0 or self.ic_lag_hours < 0:
            raise ConfigError("forecast.wait_minutes and ic_lag_hours must be ≥ 0, poll_seconds and max_age_hours > 0")
        if self.cycle_hours < 1 or self.keep_runs < 1:
            raise ConfigError("forecast.cycle_hours and forecast.keep_runs must be ≥ 1")
        if self.grid is not None:
            from core.grid import get_grid

            get_grid(self.grid)
        return self


class OpenDataConfig(_Section):
    """ECMWF open real-time data (``ecmwf-opendata``): the IFS analysis, step 0 of each 6-hourly run."""

    url: str = "https://data.ecmwf.int/forecasts"
    """Root of the portal (``{date}/{HH}z/ifs/0p25/oper/…``); a mirror or a local server for tests."""
    model: Literal["ifs"] = "ifs"
    """The model whose analysis is taken."""
    resol: Literal["0p25"] = "0p25"
    """Resolution of the files (0.25°)."""
    timeout: float = 60.0
    """Seconds a single HTTP read may stall before it counts as a failed attempt."""
    retries: int = 3
    """Attempts per request (index or byte ranges) on a 5xx or a dropped connection before the cycle fails."""


class InitialConditionsConfig(_Section):
    """Live initial conditions: a store next to the ERA5 analysis, under the same contract, labelled by source."""

    source: Literal["none", "opendata", "synthetic"] = "none"
    """none: forecasts start from the analysis store; opendata: ECMWF open data; synthetic: the planet, as if live."""
    keep_cycles: int = 20
    """Newest cycles kept in the initial-conditions store."""
    opendata: OpenDataConfig = OpenDataConfig()
    """Source ``opendata``."""

    @field_validator("keep_cycles")
    @classmethod
    def _keep(cls, value: int) -> int:
        if value < 1:
            raise ConfigError("initial_conditions.keep_cycles must be ≥ 1")
        return value


class VerifyConfig(_Section):
    """Deferred verification of published runs once their truth exists."""

    database_url: str | None = None
    """SQLAlchemy URL of the scores table; default SQLite at ``<root>/verification/scores.sqlite``."""
    aggregate_runs: int = 20
    """Newest scored runs averaged in the aggregate scorecard."""
    climatology_window_days: int = 15
    """Half-width in days of the day-of-year smoothing of the climatology (per hour of day)."""

    @model_validator(mode="after")
    def _limits(self) -> VerifyConfig:
        if self.aggregate_runs < 1 or self.climatology_window_days < 0:
            raise ConfigError("verify.aggregate_runs must be ≥ 1 and climatology_window_days ≥ 0")
        return self
