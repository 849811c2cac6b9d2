"""Data sets: ``POST /v1/datasets`` uploads a team's evaluation set (an ``.npz`` or an image-folder
archive) as the next version of its name; ``GET`` lists the hosted sets and the team's own and
shows a card; ``DELETE`` removes one version. Jobs name a slice as
``{"dataset": "name@version:split", "offset": .., "limit": ..}``. A team sees only its own sets
(and the hosted ones); another team's set answers 404 like one that does not exist.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from models.datasets import (
    HOSTED_SETS,
    DataCatalog,
    DatasetCard,
    InvalidReferenceError,
    UnknownDatasetError,
    class_counts,
    now,
    pack,
)
from models.manifest import parse_ref
from service.dataset_upload import DatasetUploadSpec, UploadLimits, parse_upload
from service.deps import DataCatalogDep, SettingsDep, TeamDep
from service.errors import Problem, invalid
from service.forms import exact_version, parse_json_field, read_form
from service.settings import Settings

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

# The schema that OPENAPI_BODY refers to, published under components/schemas by the app.
OPENAPI_SCHEMAS: dict[str, Any] = {"DatasetUploadSpec": DatasetUploadSpec.model_json_schema(
    ref_template="#/components/schemas/{model}")}
OPENAPI_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["spec", "data"],
                    "properties": {
                        "spec": {"$ref": "#/components/schemas/DatasetUploadSpec"},
                        "data": {"type": "string", "format": "binary", "description":
                                 ".npz with x (uint8 NCHW/NHWC/NHW, or float32 in [0, 1]) and y (integer "
                                 "labels), or a .zip/.tar/.tar.gz of <class>/<image>.png|jpg"},
                    },
                    "additionalProperties": False,
                },
                "encoding": {"spec": {"contentType": "application/json"}},
            }
        },
    }
}


def _unknown(ref: str) -> Problem:
    return Problem(404, f"dataset: expected a hosted data set ({', '.join(HOSTED_SETS)}) or one of your "
                        f"sets (GET /v1/datasets), got {ref!r}", field="dataset", code="unknown-dataset")


def _view(card: DatasetCard, catalog: DataCatalog) -> dict[str, Any]:
    return {**card.model_dump(mode="json"), "hosted": False, "references": card.references(),
            "versions": catalog.index.versions(card.name)}


def _limits(settings: Settings) -> UploadLimits:
    return UploadLimits(max_bytes=settings.max_dataset_bytes, max_files=settings.max_dataset_files,
                        max_samples=settings.max_dataset_samples,
                        max_image_pixels=settings.max_dataset_image_pixels,
                        max_ratio=settings.max_dataset_ratio)


async def _form(request: Request) -> tuple[DatasetUploadSpec, UploadFile]:
    form = await read_form(request, "spec", ("data",), 1, "a `spec` field and a `data` file")
    spec = parse_json_field(form, "spec", DatasetUploadSpec, "the data set's name")
    item = form.get("data")
    if not isinstance(item, UploadFile):
        raise invalid("data", "expected a file field 'data': an .npz, .zip, .tar or .tar.gz", status=400)
    return spec, item


def _check_name(spec: DatasetUploadSpec, catalog: DataCatalog, team: str) -> None:
    if spec.name in HOSTED_SETS:
        raise Problem(409, f"spec.name: expected a new name or one of your sets, got {spec.name!r}, which "
                           f"is a hosted data set", field="spec.name", code="name-taken")
    existing = catalog.index.card(spec.name)
    if existing is not None and existing.team != team:
        raise Problem(409, f"spec.name: expected a new name or one of your sets, got {spec.name!r}, which "
                           f"is taken", field="spec.name", code="name-taken")


def _check_quota(catalog: DataCatalog, settings: Settings, team: str) -> None:
    held = sum(1 for _ in catalog.versions(team))
    if held >= settings.max_datasets_per_team:
        raise Problem(429, f"expected at most {settings.max_datasets_per_team} data-set versions per team, "
                           f"your team holds {held}: delete some (DELETE /v1/datasets/{{name}}@{{version}})",
                      code="quota-datasets")


@router.post("", status_code=201, openapi_extra=OPENAPI_BODY,
             responses={201: {"description": "published; Location points to the new version"}})
async def upload_dataset(request: Request, response: Response, settings: SettingsDep,
                         catalog: DataCatalogDep, team: TeamDep) -> dict[str, Any]:
    """Upload an evaluation set as the next version of `name` (multipart: `spec` JSON and one `data`
    file). `.npz`: `x` uint8 (NCHW, NHWC or NHW) or float32 in [0, 1], `y` integer labels in
    [0, len(classes)); pickles are refused. Archive (`.zip`, `.tar`, `.tar.gz`): one folder per
    class of PNG/JPEG images of one size, classes = the sorted folder names unless `classes` is
    given; samples in (class, path) order. Stored once by content; answers 201 with the card, whose
    `references` are what jobs name (`{"dataset": "name@1:all"}`)."""
    spec, item = await _form(request)
    _check_name(spec, catalog, team)
    _check_quota(catalog, settings, team)
    data = await item.read()
    parsed = await run_in_threadpool(parse_upload, item.filename or "data", data, spec, _limits(settings))
    blob = await run_in_threadpool(pack, spec.split, parsed.x, parsed.y)
    n, c, h, w = (int(d) for d in parsed.x.shape)
    draft = DatasetCard(
        name=spec.name, version=1, team=team, input_shape=(c, h, w), classes=parsed.classes,
        splits={spec.split: n}, class_counts={spec.split: class_counts(parsed.y, len(parsed.classes))},
        sha256=hashlib.sha256(blob).hexdigest(), dtype="uint8" if parsed.x.dtype == np.uint8 else "float32",
        bytes=len(blob), format=parsed.format, created=now(), description=spec.description,
    )
    card = await run_in_threadpool(catalog.publish, draft, blob)
    response.headers["Location"] = f"/v1/datasets/{card.ref}"
    return _view(card, catalog)


@router.get("")
def list_datasets(catalog: DataCatalogDep, team: TeamDep) -> dict[str, list[dict[str, Any]]]:
    """The hosted data sets and this team's own (latest version of each)."""
    items: list[dict[str, Any]] = [hosted.listing() for hosted in HOSTED_SETS.values()]
    for card in catalog.cards(team):
        items.append({"name": card.name, "version": card.version, "versions": catalog.index.versions(card.name),
                      "hosted": False, "input_shape": list(card.input_shape), "classes": list(card.classes),
                      "splits": card.splits, "format": card.format, "dtype": card.dtype, "bytes": card.bytes,
                      "created": card.created, "description": card.description,
                      "references": card.references()})
    return {"datasets": items}


@router.get("/{ref}")
def get_dataset(ref: str, catalog: DataCatalogDep, team: TeamDep) -> dict[str, Any]:
    """A hosted set, or the card of one of your sets: `name` (latest) or `name@version`, with all
    its versions."""
    if ref in HOSTED_SETS:
        return HOSTED_SETS[ref].listing()
    try:
        name, version = parse_ref(ref)
        return _view(catalog.card(name, version, team), catalog)
    except (ValueError, UnknownDatasetError):
        raise _unknown(ref) from None


@router.delete("/{ref}", status_code=204, response_class=Response,
               responses={204: {"description": "version deleted"}})
def delete_dataset(ref: str, catalog: DataCatalogDep, team: TeamDep) -> Response:
    """Delete one version (`name@version`) of one of your sets. Its number is never reused; jobs
    queued with it fail with an unknown data set. The stored data goes when no version uses it."""
    name = ref.partition("@")[0]
    if name in HOSTED_SETS:
        raise Problem(403, f"dataset: {name} is a hosted data set; expected one of your own",
                      field="dataset", code="hosted-dataset")
    name, version = exact_version(ref, "dataset")
    try:
        catalog.card(name, version, team)
    except (UnknownDatasetError, InvalidReferenceError):
        raise _unknown(ref) from None
    if not catalog.delete(name, version):
        raise _unknown(ref)
    return Response(status_code=204)
