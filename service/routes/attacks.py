"""``POST /v1/attacks``: validate everything, store the inputs, enqueue one attack job."""

from __future__ import annotations

import io
import json
import secrets
import uuid
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import ValidationError
from rq.job import Job
from starlette.datastructures import UploadFile

from contracts.attacks import AttackInvalid, entry_for
from contracts.specs import (
    AdvGANParams,
    ArrayInputs,
    AttackJob,
    AttackRequest,
    DatasetInputs,
    ImageInputs,
    InputRef,
    JobView,
)
from models.manifest import CardIndex, GeneratorCard, GeneratorIndex, ModelCard
from service import inputs as inp
from service.deps import (
    DataCatalogDep,
    GeneratorsDep,
    QueueDep,
    RegistryDep,
    SettingsDep,
    StoreDep,
    TeamDep,
    visible_card,
    visible_generator,
)
from service.errors import Problem, invalid, validation_problem
from service.forms import load_json
from service.routes.accept import accept, request_digest
from service.settings import Settings

router = APIRouter(prefix="/v1/attacks", tags=["attacks"])

_SCHEMA = AttackRequest.model_json_schema(ref_template="#/components/schemas/{model}")
_DEFS = _SCHEMA.pop("$defs", {})
_SPEC_PROPERTIES = {name: value for name, value in _SCHEMA["properties"].items() if name != "inputs"}
# The schemas that OPENAPI_BODY refers to, published under components/schemas by the app: the JSON
# body must carry inputs (a data-set slice, an array or images); a multipart `spec` must not.
OPENAPI_SCHEMAS: dict[str, Any] = {
    **_DEFS,
    "AttackRequest": {
        **_SCHEMA,
        "description": "`POST /v1/attacks` as JSON: the model, the attack and the inputs",
        "properties": {**_SCHEMA["properties"], "inputs": {
            **_SCHEMA["properties"]["inputs"]["anyOf"][0],
            "description": "a hosted or uploaded data-set slice, an inline array or inline images"}},
        "required": [*_SCHEMA["required"], "inputs"],
    },
    "AttackSpec": {
        **_SCHEMA,
        "title": "AttackSpec",
        "description": "the `spec` field of a multipart `POST /v1/attacks`: the JSON body without `inputs` "
                       "(the inputs are the uploaded `files`)",
        "properties": _SPEC_PROPERTIES,
    },
}
OPENAPI_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/AttackRequest"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["spec", "files"],
                    "properties": {
                        "spec": {"$ref": "#/components/schemas/AttackSpec"},
                        "files": {"type": "array", "minItems": 1,
                                  "items": {"type": "string", "format": "binary"},
                                  "description": "one .npy array (float32 NCHW in [0, 1], or uint8 NHWC/NHW), "
                                                 "or PNG/JPEG images, one part each"},
                        "labels": {"type": "string", "contentMediaType": "application/json",
                                   "contentSchema": {"type": "array",
                                                     "items": {"type": "integer", "minimum": 0}},
                                   "examples": ["[9, 2]"],
                                   "description": "JSON list of labels, one per input; without it the "
                                                  "model's clean predictions are the labels"},
                    },
                },
                "encoding": {"spec": {"contentType": "application/json"}},
            },
        },
    }
}


def check_attack(request: AttackRequest, card: ModelCard, n: int, labels: np.ndarray | None,
                 settings: Settings) -> None:
    """Attack parameters that depend on the model, the inputs or the configured limits."""
    attack = request.attack
    entry = entry_for(attack)
    eps = getattr(attack, "eps", None)
    if eps is not None:
        norm = entry.norm(attack)
        limit = inp.max_eps(card, norm)
        if eps > limit:
            raise invalid("attack.eps", f"expected 0 < eps <= {limit:g} for norm {norm} "
                                        f"on inputs in {list(card.bounds)}, got {eps:g}")
    try:
        entry.check(attack, card, settings)
    except AttackInvalid as exc:
        raise invalid(exc.field, exc.message) from None
    targets = getattr(attack, "targets", None)
    if targets is not None:
        if len(targets) != n:
            raise invalid("attack.targets", f"expected {n} targets, one per input, got "
                                            f"{len(targets)}")
        bad = [t for t in targets if t >= card.num_classes]
        if bad:
            raise invalid("attack.targets", f"expected classes in [0, {card.num_classes - 1}], "
                                            f"got {bad[0]}")
        if labels is not None:
            same = np.flatnonzero(np.asarray(targets) == labels)
            if same.size:
                raise invalid("attack.targets", f"expected a target different from the label, "
                                                f"got targets[{same[0]}] == label {labels[same[0]]}")


def check_surrogate(request: AttackRequest, card: ModelCard, index: CardIndex,
                    team: str) -> ModelCard | None:
    """A transfer attack's surrogate: visible, white-box attack, same inputs and classes."""
    if request.surrogate is None:
        return None
    entry = entry_for(request.attack)
    if entry.uses_generator:
        raise invalid("surrogate", f"expected no surrogate for {entry.name}: its generator was trained on a "
                                   "model already (its card's target_model); attack `model` with it directly")
    if entry.black_box:
        raise invalid("surrogate", f"expected a white-box attack for a transfer attack, got "
                                   f"{request.attack.name} (it queries the target directly)")
    surrogate = index.card(request.surrogate)
    if surrogate is None or (surrogate.team is not None and surrogate.team != team):
        raise Problem(404, f"surrogate: expected a registered model name, got {request.surrogate!r}",
                      field="surrogate", code="unknown-model")
    for what in ("input_shape", "bounds", "num_classes"):
        if getattr(surrogate, what) != getattr(card, what):
            raise invalid("surrogate", f"expected the same {what} as {card.ref} "
                                       f"({getattr(card, what)}), got {getattr(surrogate, what)} "
                                       f"for {surrogate.ref}")
    return surrogate


def check_generator(request: AttackRequest, card: ModelCard, generators: GeneratorIndex,
                    team: str) -> GeneratorCard | None:
    """``advgan``: the generator exists, is this team's, and fits the model's inputs and classes."""
    if not isinstance(request.attack, AdvGANParams):
        return None
    generator = visible_generator(generators, request.attack.generator, team, field="attack.generator")
    mismatch = generator.fits(card)
    if mismatch is not None:
        raise invalid("attack.generator", f"{generator.ref}: {mismatch}")
    return generator


async def _parse(request: Request) -> tuple[AttackRequest, list[tuple[str, bytes]] | None,
                                            list[int] | None, bytes]:
    """JSON body, or multipart with ``spec`` (JSON), ``files`` and optional ``labels``."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=100_000, max_fields=10)
        spec_text = form.get("spec")
        if not isinstance(spec_text, str):
            raise invalid("spec", "expected a form field 'spec' with the attack request as JSON",
                          status=400)
        spec_json = load_json("spec", spec_text)
        labels = None
        if isinstance(form.get("labels"), str):
            labels = load_json("labels", str(form.get("labels")), "a JSON list of integers")
            if not isinstance(labels, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in labels
            ):
                raise invalid("labels", "expected a JSON list of integers")
        files = []
        for i, item in enumerate(form.getlist("files")):
            if not isinstance(item, UploadFile):
                raise invalid("files", "expected file uploads")
            files.append((item.filename or str(i), await item.read()))
        try:
            parsed = AttackRequest.model_validate(spec_json)
        except ValidationError as exc:
            raise validation_problem(list(exc.errors()), ("spec",)) from None
        if parsed.inputs is not None:
            raise invalid("spec.inputs", "expected no inputs in spec when files are uploaded")
        return parsed, files, labels, request_digest(parsed, files, {"labels": labels})
    if content_type and not content_type.startswith("application/json"):
        raise Problem(415, f"expected application/json or multipart/form-data, got {content_type}",
                      code="unsupported-media-type")
    body = await request.body()
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Problem(400, f"expected a JSON body: {exc}", code="invalid-json") from None
    try:
        parsed = AttackRequest.model_validate(data)
    except ValidationError as exc:
        raise validation_problem(list(exc.errors())) from None
    if parsed.inputs is None:
        raise invalid("inputs", "expected inputs: a data-set slice, an array or images")
    return parsed, None, None, request_digest(parsed)


@router.post("", status_code=202, response_model=JobView, openapi_extra=OPENAPI_BODY,
             responses={202: {"description": "job queued; Location points to it"}})
async def create_attack(request: Request, response: Response, settings: SettingsDep,
                        queues: QueueDep, index: RegistryDep, generators: GeneratorsDep,
                        store: StoreDep, data: DataCatalogDep, team: TeamDep) -> JobView:
    """Queue an attack job on a registered model. Answers 202 with the job and a Location."""
    parsed, files, labels, digest = await _parse(request)
    card = visible_card(index, parsed.model, team)
    job_id = uuid.uuid4().hex

    if files is not None:
        decoded = inp.decode_files(files, labels, card, settings.max_inputs)
    elif isinstance(parsed.inputs, ArrayInputs | ImageInputs):
        decoded = inp.decode_inline(parsed.inputs, card, settings.max_inputs)
    else:
        decoded = None
    if decoded is not None:
        n = decoded.x.shape[0]
        label_array = decoded.y
        ref = InputRef(kind="blob", n=n, key=f"inputs/{job_id}.npz",
                       has_labels=decoded.y is not None)
    else:
        assert isinstance(parsed.inputs, DatasetInputs)
        # The job reads the version checked here, even if a newer one is uploaded meanwhile.
        pinned = inp.check_dataset(parsed.inputs, card, settings.max_inputs, data, team)
        n = pinned.limit
        label_array = None
        if getattr(parsed.attack, "targets", None) is not None:
            label_array = inp.dataset_labels(data, pinned, team, "inputs.dataset")
        ref = InputRef(kind="dataset", n=n, dataset=pinned.dataset, offset=pinned.offset)
    check_attack(parsed, card, n, label_array, settings)
    surrogate = check_surrogate(parsed, card, index, team)
    generator = check_generator(parsed, card, generators, team)
    # The job runs the generator version seen here, even if a newer one is published meanwhile.
    attack = (parsed.attack if generator is None
              else parsed.attack.model_copy(update={"generator": generator.ref}))

    seed = parsed.seed if parsed.seed is not None else secrets.randbelow(2**31)
    job = AttackJob(job_id=job_id, team=team, model=card.ref, attack=attack, inputs=ref,
                    seed=seed, batch_size=parsed.batch_size,
                    surrogate=surrogate.ref if surrogate is not None else None)

    def enqueue() -> Job:
        if decoded is not None and ref.key is not None:
            buffer = io.BytesIO()
            arrays = {"x": decoded.x} if decoded.y is None else {"x": decoded.x, "y": decoded.y}
            np.savez(buffer, **arrays)  # type: ignore[arg-type]
            store.put(ref.key, buffer.getvalue())
        try:
            return queues.enqueue(
                "attacks", "workers.jobs.run_attack", job.model_dump(mode="json"), job_id=job_id,
                meta={"kind": "attack", "team": team, "model": card.ref, "progress": 0.0},
            )
        except BaseException:  # no job will read them (Redis down): nothing half-stored
            if ref.key is not None:
                store.delete(ref.key)
            raise

    return accept(request, response, queues, team, "attack", job_id, digest, enqueue)
