"""OGC API-EDR: collections of runs, position and area queries as CoverageJSON or CSV."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["edr"])
