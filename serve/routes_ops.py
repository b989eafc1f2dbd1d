"""Operations: Prometheus metrics, readiness, offline API docs."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["ops"])
