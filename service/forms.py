"""Reading request bodies: JSON of bounded depth (every JSON body, through ``JsonDepthLimit``, and
every JSON form field, through ``load_json``), a multipart form with a JSON field and files, and the
``name@version`` of a delete. Errors are problems naming the field."""

from __future__ import annotations

import json
from typing import Any, TypeVar

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.manifest import parse_ref
from service.errors import Problem, invalid, problem_response, validation_problem

SpecT = TypeVar("SpecT", bound=BaseModel)

# The deepest request (an infer tensor as nested NCHW lists inside its body) is 7 levels; the JSON
# decoder and the validators recurse per level, and 100000 levels end in a RecursionError.
MAX_JSON_DEPTH = 32
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'[]{}"')))
_CHUNK = 1 << 20


def json_depth(data: bytes | bytearray, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep ``data`` nests arrays and objects (brackets inside strings do not count), counted
    without parsing, in linear time in C (bytes methods and NumPy); stops once past ``limit``."""
    # Escaped backslashes, then escaped quotes, go first (left to right, as a parser pairs them);
    # what is left of interest is brackets and the quotes that open and close strings.
    marks = data.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    depth = deepest = quotes = 0
    for start in range(0, len(marks), _CHUNK):
        chunk = np.frombuffer(marks, dtype=np.uint8, count=min(_CHUNK, len(marks) - start), offset=start)
        quote = chunk == ord('"')
        inside = ((quotes + np.cumsum(quote)) & 1).astype(bool)
        # '[' 0x5b and '{' 0x7b open, ']' 0x5d and '}' 0x7d close: bit 1 tells them apart.
        step = np.where(quote | inside, 0, (chunk & 2).astype(np.int64) - 1)
        running = depth + np.cumsum(step)
        deepest = max(deepest, int(running.max()))
        depth, quotes = int(running[-1]), quotes + int(quote.sum())
        if deepest > limit:
            break
    return deepest


def too_deep(field: str, depth: int) -> Problem:
    return invalid(field, f"expected JSON nested at most {MAX_JSON_DEPTH} levels deep, got {depth}",
                   status=400)


def load_json(field: str, text: str | bytes, what: str = "JSON") -> Any:
    """``text`` parsed, depth first; 400 naming ``field`` when it is not JSON or nests too deep."""
    data = text.encode() if isinstance(text, str) else text
    depth = json_depth(data)
    if depth > MAX_JSON_DEPTH:
        raise too_deep(field, depth)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(field, f"expected {what}: {exc}", status=400) from None


class JsonDepthLimit:
    """Refuse a JSON request body nested deeper than ``MAX_JSON_DEPTH`` with 400 before any route
    parses it. Bodies without a content type count as JSON (the routes read them so); multipart
    fields are checked by ``load_json`` where they are read."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or []) if scope["type"] == "http" else {}
        media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        json_body = not media or media == b"application/json" or media.endswith(b"+json")
        if scope["type"] != "http" or not json_body:
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        body = bytearray()
        while True:  # the body is bounded already: BodyLimit runs outside this
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        # a large body (64 MiB of inline base64 takes 0.2 s) is scanned off the event loop
        depth = await run_in_threadpool(json_depth, bytes(body)) if len(body) > _CHUNK else json_depth(body)
        if depth > MAX_JSON_DEPTH:
            await problem_response(too_deep("body", depth), scope.get("path"))(scope, receive, send)
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


async def read_form(request: Request, json_field: str, file_fields: tuple[str, ...], max_files: int,
                    what: str) -> FormData:
    """The multipart form of an upload; 415 for another content type, 400 for a malformed body or
    a field other than ``json_field`` and ``file_fields``. ``what`` says in words what to send."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise Problem(415, f"expected multipart/form-data with {what}, got {content_type or 'no content type'}",
                      code="unsupported-media-type")
    try:
        form = await request.form(max_files=max_files, max_fields=2)
    except MultiPartException as exc:
        raise Problem(400, f"expected a multipart body with {what}: {exc.message}",
                      code="invalid-multipart") from None
    allowed = (json_field, *file_fields)
    unknown = [key for key, _ in form.multi_items() if key not in allowed]
    if unknown:
        raise invalid(unknown[0], f"expected only the fields {', '.join(allowed)}", status=400)
    return form


def parse_json_field(form: FormData, field: str, schema: type[SpecT], what: str) -> SpecT:
    """The form field ``field``, JSON validated against ``schema``; 400 when it is missing or not
    JSON, 422 naming each invalid member (``field.member``)."""
    text = form.get(field)
    if not isinstance(text, str):
        raise invalid(field, f"expected a form field {field!r} with {what} as JSON", status=400)
    data = load_json(field, text)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise validation_problem(list(exc.errors()), (field,)) from None


def exact_version(ref: str, field: str) -> tuple[str, int]:
    """``name@version`` for a delete (one version at a time); 422 naming ``field`` otherwise."""
    try:
        name, version = parse_ref(ref)
    except ValueError as exc:
        raise invalid(field, str(exc)) from None
    if version is None:
        raise invalid(field, f"expected name@version (one version is deleted at a time), got {ref!r}")
    return name, version
