"""The one error body every route answers with, and its OpenAPI documentation per status code.

Every error is ``{"detail": "<one sentence naming what is wrong>"}`` (see :mod:`serve.app`'s
handlers). Routes declare the codes they can answer with ``responses=error_responses(404, 422)``,
so the OpenAPI documents each status with this schema instead of FastAPI's default 422 body
(a list of validation errors), which the handlers never send.
"""

from __future__ import annotations

import copy
import json
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
    503: "Temporarily unavailable: the run's data, or the server is overloaded or the request timed out "
         "(Retry-After given)",
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


ERROR_REF = "#/components/schemas/ErrorBody"
_DEFAULT_422 = "#/components/schemas/HTTPValidationError"
RUN_EXAMPLES = 3  # newest published runs offered as examples of every ``run`` path parameter


def _error_entry(code: int) -> dict[str, Any]:
    return {"description": DESCRIPTIONS.get(code, "Error"),
            "content": {"application/json": {"schema": {"$ref": ERROR_REF}}}}


def harden(schema: dict[str, Any], run_pattern: str | None = None) -> dict[str, Any]:
    """Post-process a generated OpenAPI document: :class:`ErrorBody` for 4xx/5xx without a body, 422 wherever input is.

    FastAPI documents its own 422 body (``HTTPValidationError``, a list) on every operation with
    parameters; the app's handlers answer ``{"detail": "..."}`` instead, so that schema is replaced;
    every other declared error code keeps its description, and its own body schema if it has one. ``run`` path
    parameters get ``run_pattern``.
    """
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["ErrorBody"] = ErrorBody.model_json_schema()
    for item in schema.get("paths", {}).values():
        for method, op in item.items():
            if method not in {"get", "head", "post", "put", "patch", "delete", "options"}:
                continue
            responses = op.setdefault("responses", {})
            for code, entry in list(responses.items()):
                if str(code).isdigit() and int(code) >= 400 and int(code) != 422:
                    # A route's own error schema (say, a 413 with more fields) is kept; a bare code gets ErrorBody.
                    body = entry.setdefault("content", {}).setdefault("application/json", {})
                    if "schema" not in body or body["schema"].get("$ref") == _DEFAULT_422:
                        body["schema"] = {"$ref": ERROR_REF}
            if op.get("parameters") or op.get("requestBody") or "422" in responses:
                responses["422"] = _error_entry(422)
            # The request timeout and uvicorn's concurrency limit can answer 503 on any route.
            responses.setdefault("503", _error_entry(503))
            for param in op.get("parameters", []):
                if param.get("in") == "path" and param.get("name") == "run" and run_pattern:
                    param.setdefault("schema", {})["pattern"] = run_pattern
    # FastAPI's validation-error schemas stay only if something other than each other still uses them.
    used = json.dumps({k: v for k, v in schema.items() if k != "components"})
    for name in ("HTTPValidationError", "ValidationError"):
        if f'"#/components/schemas/{name}"' not in used:
            components.pop(name, None)
    return schema


def with_run_examples(schema: dict[str, Any], runs: list[str]) -> dict[str, Any]:
    """A copy of the document whose ``run`` path parameters offer the given published run names as examples."""
    if not runs:
        return schema
    out = copy.deepcopy(schema)
    for item in out.get("paths", {}).values():
        for op in item.values():
            for param in op.get("parameters", []) if isinstance(op, dict) else []:
                if param.get("in") == "path" and param.get("name") == "run":
                    param.setdefault("schema", {})["examples"] = list(runs)
                    param["examples"] = {run: {"value": run} for run in runs}
                    param.pop("example", None)
    return out


def install_openapi(app: Any) -> None:
    """Make ``app.openapi()`` the hardened document (see :func:`harden`), with the newest runs as examples."""
    from fastapi import FastAPI

    from serve.catalog import RUN_PATTERN, Catalog

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = harden(FastAPI.openapi(app), RUN_PATTERN)
        runs = Catalog(app.state.settings.forecasts_dir).run_names()[-RUN_EXAMPLES:][::-1]
        return with_run_examples(app.openapi_schema, runs)

    app.openapi = openapi
