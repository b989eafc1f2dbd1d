"""Settings of the HTTP service, behind a dependency that tests override (FastAPI "settings" pattern).

:func:`serve.app.create_app` stores the settings on ``app.state``; routes receive them through
:func:`get_settings`, so a test can swap them with ``app.dependency_overrides[get_settings]``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.config import Config, MapBox, check_cors_origins, check_root_path


class ServeSettings(BaseModel):
    """What the service needs to know: where published runs live and how to stream them."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    forecasts_dir: Path
    """Directory holding published forecast runs (``<forecasts>/<YYYYMMDDTHH>/manifest.json``)."""
    chunk_size: int = Field(default=4 << 20, ge=4096)
    """Bytes read per step when sending a file (a few MiB: one thread hop and one send each)."""
    cycle_hours: int = Field(default=6, ge=1)
    """Hours between scheduled forecast cycles; ``/health`` judges the newest run's age against it."""
    wait_minutes: float = Field(default=0.0, ge=0)
    """How long a cycle may wait for its initial conditions, allowed on top of ``cycle_hours``."""
    verification_dir: Path | None = None
    """Deferred verification's output (``<verification>/<run>/scores.json``); ``None``: no scores are shown."""
    runs_dir: Path | None = None
    """Training runs and the checkpoint registry, for a run's lineage; ``None``: no lineage is shown."""
    subset_max_bytes: int = Field(default=1 << 30, ge=1)
    """Largest estimated (uncompressed) subset a request may ask for; larger answers 413 with the estimate."""
    area_max_points: int = Field(default=1_000_000, ge=1)
    """Most values (points × parameters × times) one EDR area query may return; more answers 413."""
    root_path: str = ""
    """URL prefix the app is served under behind a reverse proxy that strips it (``/spherecast``); '' for none."""
    cors_origins: tuple[str, ...] = ()
    """Browser origins allowed cross-origin (``*`` for any); empty: no CORS headers."""
    catalog_max_age_s: int = Field(default=60, ge=0, le=86_400)
    """``Cache-Control: max-age`` of catalog JSON answers that set no policy of their own; 0: ``no-cache``."""
    request_timeout_s: float | None = Field(default=120.0, gt=0, le=3600)
    """Seconds a request may take to start its answer before it gets 503; ``None``: no limit."""

    map_boxes: tuple[MapBox, ...] = ()
    """User map regions (``render.boxes``): the viewer reads their pixel → lon/lat like the built-in regions'."""

    @field_validator("root_path")
    @classmethod
    def _root_path(cls, value: str) -> str:
        return check_root_path(value)

    @field_validator("cors_origins")
    @classmethod
    def _cors_origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_cors_origins(list(value)))


def settings_from_config(config: Config) -> ServeSettings:
    """Derive the service settings from the project config."""
    serve = config.serve
    return ServeSettings(forecasts_dir=config.paths.forecasts, cycle_hours=config.forecast.cycle_hours,
                         wait_minutes=config.forecast.wait_minutes, verification_dir=config.paths.verification,
                         runs_dir=config.paths.runs, subset_max_bytes=serve.subset_max_bytes,
                         area_max_points=serve.area_max_points, root_path=serve.root_path,
                         cors_origins=tuple(serve.cors_origins), catalog_max_age_s=serve.catalog_max_age_s,
                         request_timeout_s=serve.request_timeout_s, map_boxes=tuple(config.render.boxes))


def get_settings(request: Request) -> ServeSettings:
    """The settings of the app serving this request (override in tests)."""
    return request.app.state.settings
