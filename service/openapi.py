"""The OpenAPI document's error answers, in one place: every status each operation can answer, each
with the RFC 9457 problem schema (``service.errors`` makes every one of them), instead of a
``responses=`` on every route.

What an operation can answer follows from its shape (a body, parameters, the API prefix, a queued
job) and, for the few answers that only some routes give, from ``ROUTE_ANSWERS`` below; a new
route of an existing shape is documented without an edit here.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from fastapi import FastAPI

from service.errors import PROBLEM, RETRY_AFTER_S, TITLES

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details",
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "description": "a URI naming the kind of problem"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string", "description": "what was expected and what came"},
        "instance": {"type": "string", "description": "the request path"},
        "field": {"type": "string", "description": "the offending input, when one is to blame"},
        "code": {"type": "string", "description": "a stable machine-readable code"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["field", "message"],
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
}

WHY = {
    400: "malformed body: not JSON, JSON nested too deep, or a broken multipart form",
    401: "missing or unknown API key (when keys are configured)",
    403: "hosted (shared) resources cannot be changed",
    404: "unknown resource, or one of another team",
    409: "conflict: name taken, Idempotency-Key reused with another body, or wrong job state",
    413: "body, upload, input count or team quota too large",
    415: "unsupported content type or file format",
    422: "invalid input; `errors` names each field and what was expected",
    429: "a team limit reached: stored models or data sets, request rate (`ADVERSA_RATE_LIMIT`), "
         "active or queued jobs (`ADVERSA_MAX_ACTIVE_JOBS_PER_TEAM`, `ADVERSA_MAX_QUEUED_JOBS_PER_TEAM`); "
         "`Retry-After` says when to retry a rate or job limit",
    503: f"a dependency (Redis, the history database, a data set's files) is unavailable; "
         f"retry after `Retry-After` seconds ({RETRY_AFTER_S})",
    504: "no worker answered within the prediction timeout",
}

# The Open Inference Protocol's error body (``service.routes.oip`` rewrites problems under /v2).
OIP_PREFIX = "/v2"
OIP_ERROR_SCHEMA: dict[str, Any] = {
    "title": "InferenceError",
    "description": "Open Inference Protocol error",
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

QUEUE_DOWN = 503
JOB_CREATED = "202"
INFER = {409, 413, QUEUE_DOWN, 504}
# Answers only some routes give (beyond what their shape implies), by (method, path).
ROUTE_ANSWERS: dict[tuple[str, str], set[int]] = {
    ("get", "/readyz"): {503},
    ("get", "/v2/health/ready"): {QUEUE_DOWN},
    ("get", "/v2/models/{name}/ready"): {QUEUE_DOWN},
    ("get", "/v2/models/{name}/versions/{version}/ready"): {QUEUE_DOWN},
    ("post", "/v2/models/{name}/infer"): INFER,
    ("post", "/v2/models/{name}/versions/{version}/infer"): INFER,
    ("post", "/v1/models"): {409, 429},
    ("delete", "/v1/models/{ref}"): {403},
    ("post", "/v1/datasets"): {409, 429},
    ("delete", "/v1/datasets/{ref}"): {403},
    ("delete", "/v1/attacks/generators/{ref}"): {403},
    ("get", "/v1/jobs"): {QUEUE_DOWN},
    ("get", "/v1/jobs/{job_id}"): {QUEUE_DOWN},
    ("delete", "/v1/jobs/{job_id}"): {409, QUEUE_DOWN},
    ("get", "/v1/jobs/{job_id}/artifacts/{name}"): {409, QUEUE_DOWN},
    ("get", "/v1/models/{name}/audits"): {503},
    ("get", "/v1/audits/{job_id}/report-link"): {409, QUEUE_DOWN},
}


def answers(method: str, path: str, operation: dict[str, Any]) -> set[int]:
    """The error statuses ``operation`` can answer."""
    statuses = set(ROUTE_ANSWERS.get((method, path), set()))
    params = {p.get("in") for p in operation.get("parameters", [])}
    if "requestBody" in operation:
        statuses |= {400, 413, 415, 422}
    if params:
        statuses.add(422)
    if "path" in params:
        statuses.add(404)
    if path.startswith(("/v1/", "/v2/")):
        statuses |= {401, 429}  # the caller's team: its key, and its request rate (service/limits.py)
    if JOB_CREATED in operation.get("responses", {}) and method == "post":
        # validated against registry and data (404, 503 for a hosted set's missing files), then
        # queued under an optional Idempotency-Key (409) on Redis (503)
        statuses |= {404, 409, QUEUE_DOWN}
    return statuses


# Successful answers that are not JSON, by (method, path), for routes that return a bare Response.
CONTENT: dict[tuple[str, str], str] = {("get", "/metrics"): "text/plain"}


def _response(status: int, path: str) -> dict[str, Any]:
    oip = path.startswith(OIP_PREFIX)
    media, name = ("application/json", "InferenceError") if oip else (PROBLEM, "Problem")
    content = {media: {"schema": {"$ref": f"#/components/schemas/{name}"}}}
    response: dict[str, Any] = {"description": WHY.get(status, TITLES.get(status, "error")), "content": content}
    if status in (429, 503):
        response["headers"] = {"Retry-After": {"description": "seconds to wait before retrying",
                                               "schema": {"type": "integer"}}}
    if status == 401:
        response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    return response


def add_problems(schema: dict[str, Any]) -> None:
    """Document every error answer of every operation of ``schema`` as a problem (in place)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = PROBLEM_SCHEMA
    components["InferenceError"] = OIP_ERROR_SCHEMA
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = operation["responses"]
            media = CONTENT.get((method, path))
            if media is not None:
                responses["200"]["content"] = {media: {"schema": {"type": "string"}}}
            declared = {int(code) for code in responses if code.isdigit() and int(code) >= 400}
            for status in sorted(declared | answers(method, path, operation)):
                described = responses.get(str(status), {}).get("description")
                responses[str(status)] = _response(status, path)
                if described and status not in (422,):  # a route's own words win, FastAPI's do not
                    responses[str(status)]["description"] = described
    # FastAPI's own 422 schemas are replaced by the problem above: drop them once unreferenced.
    for name in ("HTTPValidationError", "ValidationError"):
        body = json.dumps({k: v for k, v in schema.items() if k != "components"})
        others = json.dumps({k: v for k, v in components.items() if k != name})
        if f'"#/components/schemas/{name}"' not in body + others:
            components.pop(name, None)


@lru_cache(maxsize=256)
def _template(path: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(path)))


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods the document lists for ``path`` (every route that matches it), for ``Allow``."""
    methods = {method.upper() for template, operations in app.openapi().get("paths", {}).items()
               if _template(template).fullmatch(path) for method in operations if method in METHODS}
    return sorted(methods)


def path_template(app: FastAPI, path: str) -> str | None:
    """The document's template that ``path`` falls under (the most literal one when several do),
    or None."""
    matches = [template for template in app.openapi().get("paths", {}) if _template(template).fullmatch(path)]
    return min(matches, key=lambda template: (template.count("{"), template)) if matches else None


def document_problems(app: FastAPI) -> None:
    """Post-process ``app.openapi()`` with ``add_problems``, once."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        add_problems(schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
