"""Routes outside the catalog: health and the static web viewer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import FileResponse

from core.retention import run_status
from serve.catalog import Catalog
from serve.settings import ServeSettings, get_settings

STATIC_DIR = Path(__file__).resolve().parent / "static"
VIEWER_HTML = STATIC_DIR / "viewer.html"

router = APIRouter(tags=["site"])


@router.head("/health", include_in_schema=False)
@router.get("/health", summary="Liveness, number of published runs, and the newest run's age against the schedule")
def health(settings: Annotated[ServeSettings, Depends(get_settings)], response: Response) -> dict[str, Any]:
    """Liveness, always 200 while the process answers: ``{"status": "ok", "runs": N, "schedule": {...}}``.

    ``schedule.status`` is ok or late; ``/ready`` turns that judgement into 503 for load balancers.
    """
    response.headers["Cache-Control"] = "no-store"  # a probe must see this moment, never a cached answer
    return {"status": "ok", "runs": len(Catalog(settings.forecasts_dir).run_names()),
            "schedule": run_status(settings.forecasts_dir, settings.cycle_hours, settings.wait_minutes)}


@router.head("/", response_class=FileResponse, include_in_schema=False)
@router.head("/viewer", response_class=FileResponse, include_in_schema=False)
@router.get("/", response_class=FileResponse, include_in_schema=False)
@router.get("/viewer", response_class=FileResponse, summary="Web map viewer")
def viewer() -> FileResponse:
    """The static HTML viewer (run, channel and lead selectors over the map PNGs)."""
    return FileResponse(VIEWER_HTML, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})
