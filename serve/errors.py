"""The one error body every route answers with, and its OpenAPI documentation per status code.

Every error is ``{"detail": "<one sentence naming what is wrong>"}`` (see :mod:`serve.app`'s
handlers). Routes declare the codes they can answer with ``responses=error_responses(404, 422)``,
so the OpenAPI documents each status with this schema instead of FastAPI's default 422 body
(a list of validation errors), which the handlers never send.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorBody(BaseModel):
    """An error: one sentence naming the offending parameter or the reason."""

    detail: str


DESCRIPTIONS = {
    304: "Not modified (the If-None-Match ETag matches)",
    400: "Malformed request",
    404: "No such run, file, collection, map or parameter value",
    413: "The answer would exceed the size cap; the body gives the estimated size",
    416: "Range not satisfiable",
    422: "Invalid parameter (the body names it)",
    503: "The run's data is temporarily unavailable (Retry-After given)",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given error status codes, all with :class:`ErrorBody`."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"description": DESCRIPTIONS.get(code, "Error")}
        if code != 304:
            entry["model"] = ErrorBody
        out[code] = entry
    return out


def install_openapi(app: Any) -> None:
    """Make the app's OpenAPI document every error status with :class:`ErrorBody` (filled in with the routes)."""
