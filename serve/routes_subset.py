"""Subsetting at download time: a run cut by bbox, variables, levels and leads, converted and streamed."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["subset"])
