"""One error shape everywhere: RFC 9457 problem details (``application/problem+json``).

``type`` is ``about:blank`` (the status says it all), ``title`` the status's phrase,
``detail`` what this caller can act on; a 422 adds ``errors``, where and why, never the
rejected value (it may be a password).

Internal error text (a crash's, Temporal's RPC messages, which name addresses) never reaches
the caller: it goes to the log under an error id, and the caller gets a short reason with that
id (``error_id``), which an operator finds in the log.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException

MEDIA_TYPE = "application/problem+json"
log = logging.getLogger("berth.api")


class Problem(Exception):
    """An error with an HTTP status and a message meant for the user."""

    def __init__(
        self,
        status: int,
        detail: str,
        headers: dict[str, str] | None = None,
        errors: list[dict[str, Any]] | None = None,
        error_id: str | None = None,
        limit: LimitOut | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = dict(headers or {})
        self.errors = errors
        self.error_id = error_id
        self.limit = limit
        if limit is not None and limit.resets_at is not None:
            wait = (limit.resets_at - datetime.now(UTC)).total_seconds()
            self.headers.setdefault("Retry-After", str(max(1, math.ceil(wait))))
        if status == 401:
            self.headers.setdefault("WWW-Authenticate", "Bearer")


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class LimitOut(BaseModel):
    """The limit a refusal hit: its setting's name, its value, what is used of it, and
    when it resets (also in Retry-After), if it does by itself."""

    name: str  # the setting, BERTH_<NAME> (an admin may set another per user)
    value: float
    unit: str  # USD, disks, bytes
    used: float
    resets_at: datetime | None = None


class ProblemOut(BaseModel):
    """A problem document (RFC 9457)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[FieldError] | None = None
    error_id: str | None = None  # where the log holds what went wrong inside
    limit: LimitOut | None = None  # a refusal for a limit: which, its value, when it resets


def error_id() -> str:
    return secrets.token_hex(6)


def logged(status: int, reason: str, internal: str) -> Problem:
    """A problem that tells the caller ``reason`` and an error id; the log, under that id,
    the ``internal`` text that the caller is not to see."""
    found = error_id()
    log.warning("error %s: %s", found, internal)
    return Problem(status, f"{reason} (error {found})", error_id=found)


def document(problem: Problem) -> dict[str, Any]:
    body = ProblemOut(
        title=HTTPStatus(problem.status).phrase,
        status=problem.status,
        detail=problem.detail,
        errors=[FieldError.model_validate(e) for e in problem.errors] if problem.errors else None,
        error_id=problem.error_id,
        limit=problem.limit,
    )
    return body.model_dump(mode="json", exclude_none=True)


def response(problem: Problem) -> Response:
    return JSONResponse(
        document(problem), problem.status, headers=problem.headers, media_type=MEDIA_TYPE
    )


def from_validation(exc: RequestValidationError) -> Problem:
    errors = [
        {"loc": [str(p) if not isinstance(p, int) else p for p in e["loc"]], **_why(e)}
        for e in exc.errors()
    ]
    where = ", ".join(".".join(str(p) for p in e["loc"][1:]) or str(e["loc"][0]) for e in errors)
    return Problem(422, f"invalid request: {where}", errors=errors)


def _why(error: Any) -> dict[str, str]:
    return {"msg": str(error.get("msg", "invalid")), "type": str(error.get("type", "invalid"))}


def from_http(exc: HTTPException) -> Problem:
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    return Problem(exc.status_code, detail, headers=dict(exc.headers or {}))


Render = Callable[[Request, Problem], Response]


def install(app: FastAPI, render: Render) -> None:
    """Every error through ``render``: ours, FastAPI's and Starlette's, and crashes."""

    @app.exception_handler(Problem)
    async def problem(request: Request, exc: Problem) -> Response:
        return render(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return render(request, from_validation(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return render(request, from_http(exc))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> Response:
        found = error_id()
        log.exception("error %s: unhandled on %s %s", found, request.method, request.url.path)
        detail = f"internal error; it has been logged (error {found})"
        return render(request, Problem(500, detail, error_id=found))

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route that may answer these errors, for its OpenAPI entry."""
    return {
        status: {
            "description": HTTPStatus(status).phrase,
            "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for status in statuses
    }


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        routes=app.routes,
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    problem = ProblemOut.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(problem.pop("$defs", {}))
    components["Problem"] = problem
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    invalid = problems(422)[422]
    for operation in _operations(schema):
        answers = operation.setdefault("responses", {})
        if "422" in answers:  # FastAPI's own entry names its default body: ours replaces it
            answers["422"] = invalid
    app.openapi_schema = schema
    return schema


def _operations(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return [op for path in schema.get("paths", {}).values() for op in path.values()]
