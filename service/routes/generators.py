"""AdvGAN generators: ``POST /v1/attacks/generators`` trains one (a job), ``GET`` lists them and
shows a card, ``DELETE`` removes one version. The ``advgan`` attack of ``POST /v1/attacks`` runs
them. A team sees and deletes only its own generators.
"""

from __future__ import annotations

import secrets
import uuid
from typing import Any

from fastapi import APIRouter, Request, Response
from rq.job import Job

from contracts.specs import DatasetInputs, GeneratorJob, GeneratorRequest, JobView
from models.datasets import DataCatalog
from models.manifest import NAME_RE, CardIndex, GeneratorIndex, ModelCard
from service import inputs as inp
from service.deps import (
    DataCatalogDep,
    GeneratorsDep,
    QueueDep,
    RegistryDep,
    SettingsDep,
    TeamDep,
    visible_card,
    visible_generator,
)
from service.errors import Problem, invalid
from service.forms import exact_version
from service.own_data import default_data
from service.routes.accept import accept, request_digest
from service.settings import Settings

router = APIRouter(prefix="/v1/attacks/generators", tags=["generators"])
SUFFIX = "advgan"


def _check_data(body: GeneratorRequest, card: ModelCard, settings: Settings, catalog: DataCatalog,
                team: str) -> GeneratorRequest:
    """The training and held-out data fit the target; returns the request with both pinned (a
    request that names neither uses the target's own data: ``service.own_data``)."""
    if "data" not in body.model_fields_set:
        body = body.model_copy(update={"data": default_data(catalog, card, "train", team, "data")})
    if "evaluation" not in body.model_fields_set:
        ref = default_data(catalog, card, "test", team, "evaluation")
        size = catalog.describe(ref, team).size
        evaluation = DatasetInputs(dataset=ref, offset=0, limit=min(1000, size))
        body = body.model_copy(update={"evaluation": evaluation})
    info = inp.describe_dataset(catalog, body.data, team, "data")
    if body.limit is not None and body.limit > info.size:
        raise invalid("limit", f"expected at most {info.size} samples of {info.ref}, got {body.limit}")
    limit = min(body.limit or info.size, info.size)
    data = inp.check_dataset(DatasetInputs(dataset=body.data, offset=0, limit=limit), card, info.size, catalog,
                             team, field="data")
    evaluation = inp.check_dataset(body.evaluation, card, settings.max_inputs, catalog, team,
                                   field="evaluation")
    return body.model_copy(update={"data": data.dataset, "evaluation": evaluation})


def _output(body: GeneratorRequest, card: ModelCard, generators: GeneratorIndex, team: str) -> str:
    output = body.output
    if output is None:
        output = f"{card.name}-{SUFFIX}"[:63].rstrip("-")
        taken = generators.card(output)
        if taken is not None and taken.team != team:  # another team's: say whose this one is
            output = f"{output}-{team}"[:63].rstrip("-").lower()
    if not NAME_RE.match(output):
        raise invalid("output", f"expected a lowercase kebab-case name of at most 63 characters, "
                                f"got {output!r}")
    existing = generators.card(output)
    if existing is not None and existing.team != team:
        raise Problem(409, f"output: expected a new name or one of your generators, got {output!r}, "
                           f"which is taken", field="output", code="name-taken")
    return output


def check_generator_request(body: GeneratorRequest, index: CardIndex, generators: GeneratorIndex,
                            team: str, settings: Settings, catalog: DataCatalog
                            ) -> tuple[ModelCard, str, GeneratorRequest]:
    """Everything that can be checked before queueing; returns the target's card, the output name and
    the request with its data references pinned (the job reads the versions checked here)."""
    card = visible_card(index, body.model, team)
    limit = inp.max_eps(card, "linf")
    if body.eps > limit:
        raise invalid("eps", f"expected 0 < eps <= {limit:g} (Linf) on inputs in {list(card.bounds)}, "
                             f"got {body.eps:g}")
    if body.targeted and body.target_class is None:
        raise invalid("target_class", f"expected the class a targeted generator aims at, in "
                                      f"[0, {card.num_classes - 1}]")
    if not body.targeted and body.target_class is not None:
        raise invalid("targeted", f"expected targeted=true with target_class {body.target_class} "
                                  f"(or no target_class for an untargeted generator)")
    if body.target_class is not None and body.target_class >= card.num_classes:
        raise invalid("target_class", f"expected a class in [0, {card.num_classes - 1}] of {card.ref}, "
                                      f"got {body.target_class}")
    if body.epochs > settings.max_epochs:
        raise invalid("epochs", f"expected at most {settings.max_epochs} epochs, got {body.epochs}")
    if body.mode == "semi-white-box" and not card.differentiable:
        raise invalid("mode", f"expected black-box for {card.ref}: its gradients are useless "
                              f"(a non-differentiable composition)")
    pinned = _check_data(body, card, settings, catalog, team)
    return card, _output(body, card, generators, team), pinned


@router.post("", status_code=202, response_model=JobView,
             responses={202: {"description": "job queued; Location points to it"}})
async def create_generator(body: GeneratorRequest, request: Request, response: Response,
                           settings: SettingsDep, queues: QueueDep, index: RegistryDep,
                           generators: GeneratorsDep, data: DataCatalogDep, team: TeamDep) -> JobView:
    """Queue the training of an AdvGAN generator against `model`. Progress (`stage`: epoch,
    batch, loss_g, loss_d, success, queries) shows in `GET /v1/jobs/{id}`; `DELETE` cancels. At
    the end the generator is measured on held-out data and published (card with lineage and
    metrics, `GET /v1/attacks/generators/{name}`); attack with `{"name": "advgan", "generator":
    name}` in `POST /v1/attacks`."""
    card, output, pinned = check_generator_request(body, index, generators, team, settings, data)
    job_id = uuid.uuid4().hex
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    digest = request_digest(body)
    body = pinned
    job = GeneratorJob(**body.model_dump(exclude={"model", "output", "seed"}), job_id=job_id, team=team,
                       model=card.ref, output=output, seed=seed)

    def enqueue() -> Job:
        return queues.enqueue(
            "defenses", "workers.generator_jobs.run_generator", job.model_dump(mode="json"), job_id=job_id,
            meta={"kind": "generator", "team": team, "model": card.ref, "progress": 0.0, "output": output},
            timeout=settings.defense_timeout_s,
        )

    return accept(request, response, queues, team, "generator", job_id, digest, enqueue)


@router.get("")
def list_generators(generators: GeneratorsDep, team: TeamDep) -> dict[str, list[dict[str, Any]]]:
    """This team's generators, latest version of each."""
    items = []
    for name in generators.names():
        card = generators.card(name)
        if card is None or not card.visible_to(team):
            continue
        items.append({
            "name": card.name, "version": card.version, "versions": generators.versions(name),
            "target_model": card.target_model, "mode": card.mode, "eps": card.eps,
            "targeted": card.targeted, "target_class": card.target_class, "metrics": card.metrics,
        })
    return {"generators": items}


@router.get("/{ref}")
def get_generator(ref: str, generators: GeneratorsDep, team: TeamDep) -> dict[str, Any]:
    """The card of generator ``name`` (latest) or ``name@version``: target model, eps, targeting,
    mode, metrics on held-out data, lineage."""
    card = visible_generator(generators, ref, team)
    return {**card.model_dump(mode="json"), "versions": generators.versions(card.name)}


@router.delete("/{ref}", status_code=204, response_class=Response)
def delete_generator(ref: str, generators: GeneratorsDep, team: TeamDep) -> Response:
    """Delete one version, ``name@version``, of one of your generators. Its number is never
    reused; attacks queued with it fail with ``unknown-generator``."""
    name, version = exact_version(ref, "generator")
    card = visible_generator(generators, ref, team)
    if card.team != team:
        raise Problem(403, f"generator: {card.ref} is hosted; only its owner can delete it",
                      field="generator", code="forbidden")
    if not generators.unpublish(name, version):
        raise Problem(404, f"generator: expected a trained generator, got {ref!r} (deleted meanwhile)",
                      field="generator", code="unknown-generator")
    return Response(status_code=204)
