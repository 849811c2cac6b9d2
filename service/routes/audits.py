"""``POST /v1/audits``: validate an audit, store its inputs, and enqueue one job per chunk of samples
plus a merge job that depends on all of them. The audit's id is the merge job's id."""

from __future__ import annotations

import contextlib
import io
import secrets
import uuid

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from redis.exceptions import RedisError
from rq.job import Dependency, Job

from contracts.attacks import ATTACKS
from contracts.gate import GateError, eps_key, match_eps, parse_gate
from contracts.specs import (
    DEFAULT_CHECK_EPS,
    DEFAULT_GRIDS,
    ArrayInputs,
    AttackRequest,
    AuditChunkJob,
    AuditMergeJob,
    AuditRequest,
    AuditSpec,
    DatasetInputs,
    ImageInputs,
    InputRef,
    JobView,
    SquareParams,
)
from models.manifest import CardIndex, ModelCard
from service import inputs as inp
from service.baselines import data_label, resolve
from service.deps import DataCatalogDep, QueueDep, RegistryDep, SettingsDep, StoreDep, TeamDep, visible_card
from service.errors import Problem, invalid
from service.routes.accept import accept, request_digest
from service.routes.attacks import check_attack
from service.routes.history import HistoryDep
from service.settings import Settings

router = APIRouter(prefix="/v1/audits", tags=["audits"])
MAX_GRID = 20


def _grids(body: AuditRequest, card: ModelCard, suite: str) -> dict[str, list[float]]:
    norms = body.norms or (list(body.eps) if body.eps else (["l2"] if suite == "minimal" else ["linf"]))
    grids: dict[str, list[float]] = {}
    for norm in norms:
        # The default grids are for inputs in [0, 1]: other bounds scale them with the range.
        scale = card.bounds[1] - card.bounds[0]
        grid = sorted(set((body.eps or {}).get(norm) or [e * scale for e in DEFAULT_GRIDS[norm]]))
        if len(grid) > MAX_GRID:
            raise invalid(f"eps.{norm}", f"expected at most {MAX_GRID} values, got {len(grid)}")
        limit = inp.max_eps(card, norm)
        too_big = [e for e in grid if e > limit]
        if too_big:
            raise invalid(f"eps.{norm}", f"expected 0 < eps <= {limit:g} on inputs in {list(card.bounds)}, "
                                         f"got {too_big[0]:g}")
        grids[norm] = grid
    for norm in body.eps or {}:
        if norm not in grids:
            raise invalid("eps", f"expected grids only for the audited norms {sorted(grids)}, got {norm}")
    return grids


def _surrogates(body: AuditRequest, card: ModelCard, index: CardIndex, team: str) -> list[str]:
    refs = []
    for i, ref in enumerate(body.surrogates):
        surrogate = index.card(ref)
        if surrogate is None or (surrogate.team is not None and surrogate.team != team):
            raise Problem(404, f"surrogates[{i}]: expected a registered model name, got {ref!r}",
                          field=f"surrogates[{i}]", code="unknown-model")
        for what in ("input_shape", "bounds", "num_classes"):
            if getattr(surrogate, what) != getattr(card, what):
                raise invalid(f"surrogates[{i}]", f"expected the same {what} as {card.ref}, got "
                                                  f"{getattr(surrogate, what)} for {surrogate.ref}")
        refs.append(surrogate.ref)
    return refs


def _check_gate(body: AuditRequest, grids: dict[str, list[float]], transfer_eps: float | None) -> None:
    """Every gate line parses and names a budget the audit measures: the grid of its norm, or for
    ``transfer_success_rate`` the transfer attack's (Linf) eps. Budgets match by value
    (``match_eps``), and are named as the result will name them (``eps_key``)."""
    try:
        lines = parse_gate(body.thresholds)
    except GateError as exc:
        raise invalid(f"thresholds[{exc.index}]", exc.message) from None
    for i, line in enumerate(lines):
        if line.eps is None or line.norm is None:
            continue
        field = f"thresholds[{i}]"
        if line.metric == "transfer_success_rate":
            if transfer_eps is None:
                raise invalid(field, "expected surrogates for a transfer line (the transfer attack runs "
                                     "on `surrogates`), got none")
            if line.norm != "linf":
                raise invalid(field, f"expected linf (the transfer attack is Linf PGD), got {line.norm}")
            if match_eps(line.eps, [transfer_eps]) is None:
                raise invalid(field, f"expected the transfer eps {eps_key('linf', transfer_eps)}, got "
                                     f"{eps_key(line.norm, line.eps)}")
            continue
        grid = grids.get(line.norm, [])
        if match_eps(line.eps, grid) is None:
            raise invalid(field, f"expected an eps of the {line.norm} grid "
                                 f"[{', '.join(eps_key(line.norm, e) for e in grid)}], "
                                 f"got {eps_key(line.norm, line.eps)}")


def _nearest(grid: list[float], target: float) -> float:
    return min(grid, key=lambda e: abs(e - target))


def _black_box(body: AuditRequest, card: ModelCard) -> tuple[AuditRequest, list[str]]:
    """A model whose input gradients are zero or unusable (its registration probe said so) is
    audited with score-based black-box attacks only: white-box suites would report robustness
    that is only masked gradients."""
    if card.gradients:
        return body, []
    norms = body.norms or (list(body.eps) if body.eps else ["linf"])
    attacks = [a for a in body.attacks or [] if ATTACKS[a.name].black_box]
    if not attacks:
        attacks = [SquareParams(name="square", norm=norm, eps=1.0, max_queries=body.square_queries)
                   for norm in norms if norm in ("linf", "l2")]
    note = (f"{card.ref} has no usable input gradients (its registration probe found them zero or "
            f"non-finite): audited with black-box attacks only ({', '.join(a.name for a in attacks)}) "
            f"instead of the {body.suite or 'standard'} suite")
    return body.model_copy(update={"suite": "custom", "attacks": attacks, "norms": norms}), [note]


def check_audit(body: AuditRequest, card: ModelCard, n: int, labels: np.ndarray | None, index: CardIndex,
                team: str, settings: Settings) -> AuditSpec:
    if body.attacks is not None and body.suite not in (None, "custom"):
        raise invalid("attacks", f"expected attacks only with the custom suite, got suite {body.suite}")
    if "n_target_classes" not in body.model_fields_set:  # the default 9 fits 10 classes and more
        body = body.model_copy(update={"n_target_classes": max(1, min(body.n_target_classes,
                                                                      card.num_classes - 1))})
    body, notes = _black_box(body, card)
    suite = body.suite or ("custom" if body.attacks else "standard")
    if suite == "custom" and not body.attacks:
        raise invalid("attacks", "expected a list of attack specs for the custom suite")
    for i, attack in enumerate(body.attacks or []):
        if ATTACKS[attack.name].uses_generator:
            raise invalid(f"attacks[{i}].name", "expected an attack that runs at any eps of the grid: a "
                                                "generator is trained for one eps (attack it with "
                                                "POST /v1/attacks instead)")
        if getattr(attack, "targeted", False):
            raise invalid(f"attacks[{i}].targeted", "expected untargeted attacks: an audit measures "
                                                    "robust accuracy")
        try:
            check_attack(AttackRequest(model=card.ref, attack=attack), card, n, labels, settings)
        except Problem as exc:
            raise Problem(exc.status, f"attacks[{i}]: {exc.detail}", field=f"attacks[{i}]",
                          code=exc.code, errors=exc.errors) from None
    names = [(a.name, ATTACKS[a.name].norm(a)) for a in body.attacks or []]
    if len(set(names)) != len(names):
        raise invalid("attacks", "expected each attack (name and norm) at most once")
    grids = _grids(body, card, suite)
    steps = body.steps or (20 if suite == "quick" else 100)
    if body.per_attack_curves and suite not in ("standard", "autoattack"):
        raise invalid("per_attack_curves", f"expected per_attack_curves only with the standard or autoattack "
                                           f"suite (the others have per-attack curves), got suite {suite}")
    if suite in ("standard", "autoattack") and steps * body.n_target_classes > settings.max_steps:
        raise invalid("steps", f"expected steps x n_target_classes <= {settings.max_steps}, got "
                               f"{steps * body.n_target_classes}")
    if steps > settings.max_steps:
        raise invalid("steps", f"expected at most {settings.max_steps}, got {steps}")
    if body.n_target_classes > card.num_classes - 1:
        raise invalid("n_target_classes", f"expected at most {card.num_classes - 1}, "
                                          f"got {body.n_target_classes}")
    if body.adaptive_steps > settings.max_steps:
        raise invalid("adaptive_steps", f"expected at most {settings.max_steps}, got {body.adaptive_steps}")
    if body.square_queries > settings.max_queries:
        raise invalid("square_queries", f"expected at most {settings.max_queries}, "
                                        f"got {body.square_queries}")
    surrogates = _surrogates(body, card, index, team)
    if body.transfer_eps is not None and body.transfer_eps > inp.max_eps(card, "linf"):
        raise invalid("transfer_eps", f"expected at most {inp.max_eps(card, 'linf'):g}, "
                                      f"got {body.transfer_eps:g}")
    scale = card.bounds[1] - card.bounds[0]
    transfer_eps = (body.transfer_eps or 0.1 * scale) if surrogates else None
    _check_gate(body, grids, transfer_eps)
    check_eps = {norm: _nearest(grid, DEFAULT_CHECK_EPS[norm] * scale) for norm, grid in grids.items()}
    return AuditSpec(suite=suite, attacks=body.attacks, grids=grids, check_eps=check_eps, steps=body.steps,
                     n_target_classes=body.n_target_classes, square_queries=body.square_queries,
                     adaptive_steps=body.adaptive_steps,
                     per_attack_curves=body.per_attack_curves, surrogates=surrogates, transfer_eps=transfer_eps,
                     thresholds=body.thresholds, notes=notes)


@router.post("", status_code=202, response_model=JobView,
             responses={202: {"description": "audit queued; Location points to it"}})
async def create_audit(body: AuditRequest, request: Request, response: Response, settings: SettingsDep,
                       queues: QueueDep, index: RegistryDep, store: StoreDep, data: DataCatalogDep,
                       team: TeamDep, history: HistoryDep) -> JobView:
    """Queue a robustness audit: the suite over the eps grid on the sample, split into chunk jobs
    that any worker can take, merged by a final job whose result carries the verdict."""
    card = visible_card(index, body.model, team)
    audit_id = uuid.uuid4().hex
    pinned: DatasetInputs | None = None
    if isinstance(body.inputs, ArrayInputs | ImageInputs):
        decoded = inp.decode_inline(body.inputs, card, settings.max_inputs)
        n, labels = decoded.x.shape[0], decoded.y
    else:
        assert isinstance(body.inputs, DatasetInputs)
        decoded = None
        pinned = inp.check_dataset(body.inputs, card, settings.max_inputs, data, team)
        n = pinned.limit
        labels = None
    audit = check_audit(body, card, n, labels, index, team, settings)
    audit = audit.model_copy(update={"data": data_label(pinned, decoded)})
    # the history database is synchronous: off the event loop
    baseline = await run_in_threadpool(resolve, body.baseline, audit, history, index, team)
    audit = audit.model_copy(update={"baseline": baseline})
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    digest = request_digest(body)
    bounds = list(range(0, n, body.chunk_size)) + [n]
    meta_base = {"team": team, "model": card.ref, "progress": 0.0, "audit": audit_id}

    def enqueue() -> Job:
        if decoded is not None:
            buffer = io.BytesIO()
            arrays = {"x": decoded.x} if decoded.y is None else {"x": decoded.x, "y": decoded.y}
            np.savez(buffer, **arrays)  # type: ignore[arg-type]
            store.put(f"inputs/{audit_id}.npz", buffer.getvalue())
        chunk_ids: list[str] = []
        try:
            for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
                if decoded is not None:
                    ref = InputRef(kind="blob", n=n, key=f"inputs/{audit_id}.npz",
                                   has_labels=decoded.y is not None)
                else:
                    assert pinned is not None
                    ref = InputRef(kind="dataset", n=stop - start, dataset=pinned.dataset,
                                   offset=pinned.offset + start)
                chunk_id = f"{audit_id}c{i}"
                chunk = AuditChunkJob(job_id=chunk_id, audit_id=audit_id, team=team, model=card.ref, inputs=ref,
                                      start=start, stop=stop, index=i, seed=seed, audit=audit)
                queues.enqueue("audits", "workers.audit_jobs.run_audit_chunk", chunk.model_dump(mode="json"),
                               job_id=chunk_id, meta={**meta_base, "kind": "audit-chunk", "chunk": i})
                chunk_ids.append(chunk_id)
            merge = AuditMergeJob(job_id=audit_id, audit_id=audit_id, team=team, model=card.ref,
                                  chunk_ids=chunk_ids, seed=seed, audit=audit)
            return queues.enqueue(
                "audits", "workers.audit_jobs.run_audit_merge", merge.model_dump(mode="json"), job_id=audit_id,
                meta={**meta_base, "kind": "audit", "chunks": chunk_ids, "suite": audit.suite},
                depends_on=Dependency(jobs=chunk_ids, allow_failure=True))
        except BaseException:
            with contextlib.suppress(RedisError):  # Redis down: the chunks went nowhere
                for chunk_id in chunk_ids:
                    job = queues.fetch(chunk_id)
                    if job is not None:
                        queues.cancel(job)
            if decoded is not None:  # no job will read them: nothing half-stored
                store.delete(f"inputs/{audit_id}.npz")
            raise

    return accept(request, response, queues, team, "audit", audit_id, digest, enqueue)
