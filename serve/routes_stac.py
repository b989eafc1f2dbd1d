"""A STAC catalog of the published runs, for tools that crawl STAC."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["stac"])
