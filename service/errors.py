"""The one place that turns domain errors into RFC 9457 ``application/problem+json`` responses."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from contracts.attacks import ATTACKS
from models.store import BlobStoreUnavailable

log = logging.getLogger(__name__)
PROBLEM = "application/problem+json"
# What a client is told to wait when a dependency is down: Redis restarts in seconds (AOF replay
# of a large queue takes longer, and the client simply asks again).
RETRY_AFTER_S = 5
TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class Problem(Exception):
    """A domain error that knows its HTTP status. ``field`` names the offending input."""

    def __init__(self, status: int, detail: str, *, field: str | None = None,
                 code: str | None = None, errors: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.field = field
        self.code = code
        self.errors = errors
        self.headers = headers


def unavailable(what: str, exc: Exception) -> Problem:
    """A dependency (``what``) that does not answer: 503 with ``Retry-After``, which tells clients
    and proxies that the same request may succeed later."""
    return Problem(503, f"{what} is unavailable ({type(exc).__name__}); retry in {RETRY_AFTER_S} s",
                   code="dependency-unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})


def invalid(field: str, detail: str, status: int = 422) -> Problem:
    return Problem(status, f"{field}: {detail}", field=field, code="invalid-input",
                   errors=[{"field": field, "message": detail}])


def problem_response(problem: Problem, instance: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"https://adversa.dev/problems/{problem.code or problem.status}",
        "title": TITLES.get(problem.status, "Error"),
        "status": problem.status,
        "detail": problem.detail,
    }
    if instance:
        body["instance"] = instance
    if problem.field:
        body["field"] = problem.field
    if problem.code:
        body["code"] = problem.code
    if problem.errors:
        body["errors"] = problem.errors
    return JSONResponse(body, status_code=problem.status, media_type=PROBLEM,
                        headers=problem.headers)


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    text = ""
    for part in parts:
        text += f"[{part}]" if part.isdigit() else (f".{part}" if text else part)
    return text or "body"


def validation_problem(errors: list[Any], prefix: tuple[str, ...] = ()) -> Problem:
    """A 422 listing each invalid field with what was expected."""
    items = []
    for err in errors:
        loc = [*prefix, *err.get("loc", ())]
        # Drop pydantic's union tags ("pgd", "dataset", "function-after[...]") from the path.
        loc = [p for p in loc if not (isinstance(p, str) and ("[" in p or p in _TAGS))]
        message = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            message = "unknown parameter"
        elif err.get("type") == "missing":
            message = "required field is missing"
        items.append({"field": _loc(loc), "message": message})
    detail = "; ".join(f"{i['field']}: {i['message']}" for i in items) or "invalid request"
    return Problem(422, detail, field=items[0]["field"] if items else None,
                   code="invalid-request", errors=items)


_TAGS = {*ATTACKS, "dataset", "array", "images"}


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem_response(validation_problem(list(exc.errors())), request.url.path)

    @app.exception_handler(ValidationError)
    async def _validation(request: Request, exc: ValidationError) -> JSONResponse:
        return problem_response(validation_problem(list(exc.errors())), request.url.path)

    from service.openapi import allowed_methods  # imported here: service.openapi imports this module

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # every method of the path, not only those of one route
            methods = allowed_methods(request.app, request.url.path)
            headers["Allow"] = ", ".join(methods) if methods else headers.get("Allow", "")
        return problem_response(Problem(exc.status_code, str(exc.detail), headers=headers), request.url.path)

    # Any Redis failure (refused, reset, timed out, loading, out of memory, read-only) on any route
    # that needs the queue. Handled here, inside the app, so the client gets an answer on an open
    # connection rather than the server's bare 500 and a reset.
    @app.exception_handler(RedisError)
    async def _redis(request: Request, exc: RedisError) -> JSONResponse:
        log.warning("Redis failed on %s: %s", request.url.path, exc)
        return problem_response(unavailable("the job queue (Redis)", exc), request.url.path)

    @app.exception_handler(BlobStoreUnavailable)
    async def _store(request: Request, exc: BlobStoreUnavailable) -> JSONResponse:
        log.warning("blob store failed on %s: %s", request.url.path, exc)
        return problem_response(unavailable("the blob store", exc), request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return problem_response(Problem(500, "internal error; the server log has the details"),
                                request.url.path)
