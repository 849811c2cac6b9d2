"""``POST /v1/defenses``: validate a defense against the registry and the data, enqueue one job.

The job's output is a new model version in the registry (adversarial training, distillation,
preprocessing, ensemble) or a detector stored with the model it guards (feature squeezing).
"""

from __future__ import annotations

import secrets
import uuid

from fastapi import APIRouter, Request, Response
from rq.job import Job

from contracts.specs import (
    DEFENSE_SUFFIX,
    TRAINING_DEFENSES,
    DatasetInputs,
    DefenseJob,
    DefenseRequest,
    DistillationParams,
    EnsembleParams,
    Evaluation,
    FeatureSqueezingParams,
    FGSMTrainingParams,
    JobView,
    PGDTrainingParams,
    PreprocessingParams,
)
from models.datasets import DataCatalog
from models.manifest import NAME_RE, CardIndex, ModelCard
from service import inputs as inp
from service.deps import DataCatalogDep, QueueDep, RegistryDep, SettingsDep, TeamDep, visible_card
from service.errors import Problem, invalid
from service.own_data import default_data, default_slices
from service.routes.accept import accept, request_digest
from service.settings import Settings

router = APIRouter(prefix="/v1/defenses", tags=["defenses"])


def _members(request: DefenseRequest, index: CardIndex, team: str) -> list[ModelCard]:
    assert isinstance(request.defense, EnsembleParams)
    cards = []
    for i, ref in enumerate(request.defense.members):
        card = index.card(ref)
        if card is None or (card.team is not None and card.team != team):
            raise Problem(404, f"defense.members[{i}]: expected a registered model name, got {ref!r}",
                          field=f"defense.members[{i}]", code="unknown-model")
        cards.append(card)
    for i, card in enumerate(cards[1:], start=1):
        for what in ("input_shape", "bounds", "classes"):
            if getattr(card, what) != getattr(cards[0], what):
                raise invalid(f"defense.members[{i}]", f"expected the same {what} as {cards[0].ref} "
                                                       f"({getattr(cards[0], what)}), got "
                                                       f"{getattr(card, what)} for {card.ref}")
    if len({c.ref for c in cards}) != len(cards):
        raise invalid("defense.members", "expected distinct models")
    return cards


def _check_output(name: str, index: CardIndex, team: str) -> None:
    if not NAME_RE.match(name):
        raise invalid("output", f"expected a lowercase kebab-case name of at most 63 characters, "
                                f"got {name!r}")
    existing = index.card(name)
    if existing is not None and existing.team != team:
        owner = "a hosted model" if existing.team is None else "another team's model"
        raise Problem(409, f"output: expected a new name or one of your models, got {name!r}, "
                           f"which is {owner}", field="output", code="name-taken")


def _check_training_data(field: str, data: str, limit: int | None, card: ModelCard,
                         catalog: DataCatalog, team: str) -> str:
    """The training set fits the model and holds ``limit`` samples; returns its pinned reference."""
    info = inp.describe_dataset(catalog, data, team, field)
    if limit is not None and limit > info.size:
        raise invalid("defense.limit", f"expected at most {info.size} samples of {info.ref}, got {limit}")
    pinned = inp.check_dataset(DatasetInputs(dataset=data, offset=0, limit=min(limit or info.size, info.size)),
                               card, info.size, catalog, team, field=field)
    return pinned.dataset


def _check_evaluation(evaluation: Evaluation, card: ModelCard, catalog: DataCatalog, team: str) -> Evaluation:
    """The test data fits the model (``clean_limit`` is at most: a smaller set is measured whole);
    returns the evaluation with its reference pinned."""
    info = inp.describe_dataset(catalog, evaluation.data, team, "evaluation.data")
    pinned = inp.check_dataset(DatasetInputs(dataset=evaluation.data, offset=0,
                                             limit=min(evaluation.clean_limit, info.size)),
                               card, 100_000, catalog, team, field="evaluation")
    return evaluation.model_copy(update={"data": pinned.dataset})


def check_defense(request: DefenseRequest, index: CardIndex, team: str, settings: Settings,
                  catalog: DataCatalog) -> tuple[ModelCard, str | None, DefenseRequest]:
    """Everything that can be checked before queueing; returns the base card, the output name and
    the request with its data references pinned (the job reads the versions checked here)."""
    defense = request.defense
    if isinstance(defense, EnsembleParams):
        if request.model is not None:
            raise invalid("model", "expected no model for an ensemble: name them in defense.members")
        base = _members(request, index, team)[0]
    else:
        if request.model is None:
            raise invalid("model", f"expected the base model of the {defense.name} defense")
        base = visible_card(index, request.model, team)
    if defense.name in TRAINING_DEFENSES:
        assert isinstance(defense, FGSMTrainingParams | PGDTrainingParams | DistillationParams)
        if base.composition is not None:
            raise invalid("model", f"expected a model with weights to train, got the "
                                   f"{base.composition.kind} composition {base.ref}")
        epochs = max(defense.epochs, getattr(defense, "teacher_epochs", None) or 0)
        if epochs > settings.max_epochs:
            raise invalid("defense.epochs", f"expected at most {settings.max_epochs} epochs, got {epochs}")
        data = defense.data if "data" in defense.model_fields_set else default_data(
            catalog, base, "train", team, "defense.data")
        defense = defense.model_copy(update={"data": _check_training_data(
            "defense.data", data, defense.limit, base, catalog, team)})
        eps = getattr(defense, "eps", None)
        if eps is not None and eps > inp.max_eps(base, "linf"):
            raise invalid("defense.eps", f"expected 0 < eps <= {inp.max_eps(base, 'linf'):g} on inputs "
                                         f"in {list(base.bounds)}, got {eps:g}")
        if isinstance(defense, PGDTrainingParams) and defense.step_size is not None and (
            defense.step_size > defense.eps
        ):
            raise invalid("defense.step_size", f"expected at most eps ({defense.eps:g}), got "
                                               f"{defense.step_size:g}")
    if isinstance(defense, PreprocessingParams | FeatureSqueezingParams):
        steps = defense.steps if isinstance(defense, PreprocessingParams) else [
            s for squeezer in defense.squeezers for s in squeezer]
        field = "defense.steps" if isinstance(defense, PreprocessingParams) else "defense.squeezers"
        side = min(base.input_shape[1:])
        for step in steps:
            size = getattr(step, "size", None) or getattr(step, "kernel_size", None) or 1
            if size > side:
                raise invalid(field, f"expected a {step.name} window of at most the input size "
                                     f"{side}, got {size}")
            if step.name == "jpeg" and base.input_shape[0] not in (1, 3):
                raise invalid(field, f"expected 1 or 3 channels for jpeg, got {base.input_shape[0]}")
    if isinstance(defense, FeatureSqueezingParams):
        if request.output is not None:
            raise invalid("output", "expected no output name: a detector is stored with its model")
        slices = ("calibration", "held_out", "attack_inputs")
        if not set(slices) <= defense.model_fields_set:
            own = default_slices(catalog, base, team, "defense.calibration")
            defense = defense.model_copy(update={
                what: own[what] for what in slices if what not in defense.model_fields_set})
        defense = defense.model_copy(update={
            what: inp.check_dataset(getattr(defense, what), base, 100_000, catalog, team,
                                    field=f"defense.{what}")
            for what in slices})
        if defense.eps > inp.max_eps(base, "linf"):
            raise invalid("defense.eps", f"expected 0 < eps <= {inp.max_eps(base, 'linf'):g}, "
                                         f"got {defense.eps:g}")
        return base, None, request.model_copy(update={"defense": defense})
    evaluation = request.evaluation
    if "data" not in evaluation.model_fields_set:
        evaluation = evaluation.model_copy(update={"data": default_data(
            catalog, base, "test", team, "evaluation.data")})
    evaluation = _check_evaluation(evaluation, base, catalog, team)
    if evaluation.robust_limit > min(evaluation.clean_limit, settings.max_inputs):
        raise invalid("evaluation.robust_limit", f"expected at most clean_limit and "
                                                 f"{settings.max_inputs}, got {evaluation.robust_limit}")
    if evaluation.steps > settings.max_steps:
        raise invalid("evaluation.steps", f"expected at most {settings.max_steps}, got {evaluation.steps}")
    output = request.output
    if output is None:
        stem = base.name if not isinstance(defense, EnsembleParams) else "-".join(
            sorted({c.name for c in _members(request, index, team)}))
        output = f"{stem}-{DEFENSE_SUFFIX[defense.name]}"[:63].rstrip("-")
        taken = index.card(output)
        if taken is not None and taken.team != team:  # a hosted model's name: say whose this is
            output = f"{output}-{team}"[:63].rstrip("-").lower()
    _check_output(output, index, team)
    return base, output, request.model_copy(update={"defense": defense, "evaluation": evaluation})


@router.post("", status_code=202, response_model=JobView,
             responses={202: {"description": "job queued; Location points to it"}})
async def create_defense(body: DefenseRequest, request: Request, response: Response,
                         settings: SettingsDep, queues: QueueDep, index: RegistryDep,
                         data: DataCatalogDep, team: TeamDep) -> JobView:
    """Queue a defense job. Its result is a new model version (with lineage and measured metrics
    in its card) or, for `feature-squeezing`, a calibrated detector stored with the model."""
    base, output, pinned = check_defense(body, index, team, settings, data)
    job_id = uuid.uuid4().hex
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    model_ref = None if isinstance(body.defense, EnsembleParams) else base.ref
    digest = request_digest(body)
    body = pinned
    if isinstance(body.defense, EnsembleParams):
        body = body.model_copy(update={"defense": body.defense.model_copy(update={
            "members": [c.ref for c in _members(body, index, team)]})})
    job = DefenseJob(job_id=job_id, team=team, model=model_ref, defense=body.defense, output=output,
                     seed=seed, evaluation=body.evaluation)

    def enqueue() -> Job:
        return queues.enqueue(
            "defenses", "workers.defense_jobs.run_defense", job.model_dump(mode="json"), job_id=job_id,
            meta={"kind": "defense", "team": team, "model": model_ref or base.ref, "progress": 0.0,
                  "defense": body.defense.name, "output": output},
            timeout=settings.defense_timeout_s,
        )

    return accept(request, response, queues, team, "defense", job_id, digest, enqueue)
