"""The model registry: listing, model cards, uploads of a team's own models, deletion.

``POST /v1/models`` checks everything that needs no torch (the card, the file's format, the ONNX
operators, the safetensors layout, quotas), stages the file in the blob store and queues a
registration job (``workers.registration``) that loads, probes, measures and publishes it.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from rq.job import Job
from starlette.datastructures import UploadFile

from contracts.specs import JobView
from models.catalog_names import NAMES as ARCHITECTURES
from models.catalog_names import check_input
from models.manifest import ModelUpload, RegistrationJob
from models.onnx_check import OnnxFormatError, inspect_onnx
from models.upload_check import UploadFormatError, inspect_safetensors, sniff_pickle
from service.deps import QueueDep, RegistryDep, SettingsDep, StoreDep, TeamDep, visible_card
from service.errors import Problem, invalid
from service.forms import exact_version, parse_json_field, read_form
from service.routes.accept import accept, request_digest
from service.settings import Settings

router = APIRouter(prefix="/v1/models", tags=["models"])

PICKLE_ADVICE = ("Pickled PyTorch files can run arbitrary code when loaded, so they are never read. "
                 "Upload the weights as .safetensors (safetensors.torch.save_file(model.state_dict(), "
                 "'weights.safetensors')) with a catalog `architecture` in the card, or the model as "
                 ".onnx (torch.onnx.export).")
_CARD_SCHEMA = ModelUpload.model_json_schema(ref_template="#/components/schemas/{model}")
# The schemas that UPLOAD_BODY refers to, published under components/schemas by the app.
OPENAPI_SCHEMAS: dict[str, Any] = {**_CARD_SCHEMA.pop("$defs", {}), "ModelUpload": _CARD_SCHEMA}
UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["card"],
                    "oneOf": [{"required": ["model"]}, {"required": ["weights"]}],
                    "properties": {
                        "card": {"$ref": "#/components/schemas/ModelUpload"},
                        "model": {"type": "string", "format": "binary",
                                  "description": "an .onnx graph (or send `weights`)"},
                        "weights": {"type": "string", "format": "binary",
                                    "description": ".safetensors weights of the card's catalog `architecture` "
                                                   "(or send `model`)"},
                    },
                    "additionalProperties": False,
                },
                "encoding": {"card": {"contentType": "application/json"}},
            }
        },
    }
}


@router.get("")
def list_models(index: RegistryDep, team: TeamDep) -> dict[str, list[dict[str, Any]]]:
    """Models this team may use: hosted ones and its own, latest version of each."""
    items = []
    for name in index.names():
        card = index.card(name)
        if card is None or (card.team is not None and card.team != team):
            continue
        items.append({
            "name": card.name,
            "version": card.version,
            "versions": index.versions(name),
            "architecture": card.architecture,
            "input_shape": list(card.input_shape),
            "classes": list(card.classes),
            "metrics": card.metrics,
            "hosted": card.team is None,
            "differentiable": card.differentiable,
        })
    return {"models": items}


@router.get("/{ref}")
def get_model(ref: str, index: RegistryDep, team: TeamDep) -> dict[str, Any]:
    """The model card (manifest) of ``name`` (latest) or ``name@version``."""
    card = visible_card(index, ref, team)
    return {**card.model_dump(mode="json"), "versions": index.versions(card.name),
            "differentiable": card.differentiable}


@router.delete("/{ref}", status_code=204, responses={204: {"description": "version deleted"}})
def delete_model(ref: str, index: RegistryDep, team: TeamDep) -> Response:
    """Delete one version of one of your models (``name@version``); its number is never reused.
    Hosted models cannot be deleted."""
    name, version = exact_version(ref, "model")
    card = visible_card(index, ref, team)
    if card.team is None:
        raise Problem(403, f"{card.ref} is a hosted model: expected one of your own models",
                      code="hosted-model")
    if not index.unpublish(name, version):
        raise Problem(404, f"model: expected a registered model name (GET /v1/models), got {ref!r}",
                      field="model", code="unknown-model")
    return Response(status_code=204)


async def _upload_form(request: Request, settings: Settings) -> tuple[ModelUpload, str, str, bytes]:
    """The card and the one file of an upload: (card, field, filename, bytes)."""
    form = await read_form(request, "card", ("model", "weights"), 2,
                           "a `card` field and a `model` (.onnx) or `weights` (.safetensors) file")
    upload = parse_json_field(form, "card", ModelUpload, "the model card")
    files = [(key, value) for key, value in form.multi_items() if key in ("model", "weights")]
    if len(files) != 1 or not isinstance(files[0][1], UploadFile):
        raise invalid("model", "expected exactly one file: `model` (.onnx) or `weights` (.safetensors)")
    field, item = files[0]
    assert isinstance(item, UploadFile)
    if item.size is not None and item.size > settings.max_model_bytes:
        raise invalid(field, f"expected at most {settings.max_model_bytes} bytes, got {item.size}", status=413)
    data = await item.read()
    if len(data) > settings.max_model_bytes:
        raise invalid(field, f"expected at most {settings.max_model_bytes} bytes, got {len(data)}", status=413)
    return upload, field, item.filename or field, data


def _check_name(upload: ModelUpload, index: RegistryDep, team: str) -> None:
    existing = index.card(upload.name)
    if existing is not None and existing.team != team:
        owner = "a hosted model" if existing.team is None else "another team's model"
        raise Problem(409, f"card.name: expected a new name or one of your models, got {upload.name!r}, "
                           f"which is {owner}", field="card.name", code="name-taken")


def _check_shape(upload: ModelUpload, settings: Settings) -> None:
    c, h, w = upload.input_shape
    if c * h * w > settings.max_input_values:
        raise invalid("card.input_shape", f"expected C x H x W <= {settings.max_input_values}, got "
                                          f"{c * h * w} for {list(upload.input_shape)}")


def _check_quota(index: RegistryDep, settings: Settings, team: str, size: int) -> None:
    """Versions and bytes this team holds in the registry (the var dir or the store), against its
    quotas."""
    count, held = 0, 0
    for card, stored in index.entries():
        if card.team == team:
            count += 1
            held += stored
    if count >= settings.max_models_per_team:
        raise Problem(429, f"expected at most {settings.max_models_per_team} model versions per team, "
                           f"your team holds {count}: delete some (DELETE /v1/models/{{name}}@{{version}})",
                      code="quota-models")
    if held + size > settings.max_model_bytes_per_team:
        raise Problem(413, f"expected at most {settings.max_model_bytes_per_team} bytes of models per team, "
                           f"your team holds {held} and this upload adds {size}", code="quota-bytes")


def check_upload(upload: ModelUpload, field: str, filename: str, data: bytes, settings: Settings
                 ) -> tuple[Literal["safetensors", "onnx"], int, int | None, int | None]:
    """The format checks: (format, parameters, opset, static batch)."""
    why = sniff_pickle(data, filename)
    if why is not None:
        raise Problem(415, f"{field}: got {why}. {PICKLE_ADVICE}", field=field, code="pickle-refused")
    if field == "weights":
        if not filename.lower().endswith(".safetensors"):
            raise Problem(415, f"weights: expected a .safetensors file, got {filename!r}. {PICKLE_ADVICE}",
                          field=field, code="unsupported-format")
        if upload.architecture is None:
            raise invalid("card.architecture", f"expected a catalog architecture for safetensors weights, "
                                               f"one of {', '.join(ARCHITECTURES)}")
        if upload.architecture not in ARCHITECTURES:
            raise invalid("card.architecture", f"expected one of {', '.join(ARCHITECTURES)}, got "
                                               f"{upload.architecture!r}")
        try:
            check_input(upload.architecture, upload.input_shape)
        except ValueError as exc:
            raise invalid("card.input_shape", str(exc)) from None
        try:
            info = inspect_safetensors(data)
        except UploadFormatError as exc:
            raise invalid("weights", str(exc)) from None
        return "safetensors", info.parameters, None, None
    if not filename.lower().endswith(".onnx"):
        raise Problem(415, f"model: expected an .onnx file, got {filename!r}. {PICKLE_ADVICE}",
                      field=field, code="unsupported-format")
    if upload.architecture is not None:
        raise invalid("card.architecture", "expected no architecture for an ONNX model (the graph is the "
                                           "architecture)")
    try:
        onnx = inspect_onnx(data, settings.max_model_bytes)
    except OnnxFormatError as exc:
        raise invalid("model", str(exc)) from None
    if onnx.problem is not None:
        raise Problem(422, f"model: {onnx.problem}", field="model", code="unsupported-operator",
                      errors=[{"field": "model", "message": f"unsupported operator {op}"}
                              for op in onnx.unsupported] or None)
    name, dims = onnx.inputs[0]
    declared = list(dims[1:])
    if len(dims) != 4 or any(isinstance(d, int) and d != e
                             for d, e in zip(declared, upload.input_shape, strict=True)):
        raise invalid("card.input_shape", f"expected the ONNX input {name!r} {list(dims)} to be (N, "
                                          f"{', '.join(map(str, upload.input_shape))}), got a mismatch")
    return "onnx", onnx.parameters, onnx.opset, onnx.static_batch


@router.post("", status_code=202, response_model=JobView, openapi_extra=UPLOAD_BODY,
             responses={202: {"description": "registration job queued; Location points to it"},
                        413: {"description": "file or team quota too large"},
                        415: {"description": "pickle, TorchScript or an unknown format"},
                        429: {"description": "too many model versions for this team"}})
async def register_model(request: Request, response: Response, settings: SettingsDep, queues: QueueDep,
                         index: RegistryDep, store: StoreDep, team: TeamDep) -> JobView:
    """Register a new version of one of your models: multipart with `card` (JSON) and `model`
    (.onnx) or `weights` (.safetensors + `architecture` in the card). Answers 202 with a
    registration job; the version is published when the job succeeds."""
    upload, field, filename, data = await _upload_form(request, settings)
    _check_name(upload, index, team)
    _check_shape(upload, settings)
    fmt, parameters, opset, static_batch = check_upload(upload, field, filename, data, settings)
    if parameters > settings.max_parameters:
        raise invalid(field, f"expected at most {settings.max_parameters} parameters, got {parameters}",
                      status=413)
    _check_quota(index, settings, team, len(data))
    job_id = uuid.uuid4().hex
    sha256 = hashlib.sha256(data).hexdigest()
    key = f"uploads/{job_id}/{'model.onnx' if fmt == 'onnx' else 'weights.safetensors'}"
    job = RegistrationJob(job_id=job_id, team=team, upload=upload, format=fmt, file=key, sha256=sha256,
                          bytes=len(data), parameters=parameters, opset=opset, static_batch=static_batch)
    digest = request_digest(upload, [(filename, data)], {"field": field})

    def enqueue() -> Job:
        store.put(key, data)
        try:
            return queues.enqueue(
                "defenses", "workers.registration.run_registration", job.model_dump(mode="json"),
                job_id=job_id, timeout=settings.registration_timeout_s,
                meta={"kind": "registration", "team": team, "model": upload.name, "progress": 0.0,
                      "format": fmt})
        except BaseException:
            store.delete_prefix(f"uploads/{job_id}")
            raise

    return accept(request, response, queues, team, "registration", job_id, digest, enqueue)
