"""What the upload routes share: reading a multipart form with a JSON field and files, and the
``name@version`` of a delete. Errors are problems naming the field."""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException

from models.manifest import parse_ref
from service.errors import Problem, invalid, validation_problem

SpecT = TypeVar("SpecT", bound=BaseModel)


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
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise invalid(field, f"expected JSON: {exc}", status=400) from None
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
