"""An audit's ``baseline``: the earlier audit that its regression gate lines
(``robust_accuracy@linf:8/255 >= baseline - 0.01``) compare with.

Resolved once, when the audit is submitted, from the history database: an audit id of the caller's
team, or ``name@version``, whose newest succeeded audit on the same data, suite and eps grid is
used. The figures the gate lines need travel in the audit's spec (``workers.specs.Baseline``), so
the merge evaluates them without a database. Another team's audits are never found: their ids are
404 like ids that do not exist."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from contracts.gate import GateError, GateLine, baseline_metrics, eps_key, match_eps, parse_gate
from contracts.specs import AuditSpec, Baseline, DatasetInputs, JobState, JobView
from history.store import HistoryStore
from models.manifest import CardIndex, parse_ref
from service.errors import Problem, invalid, unavailable
from service.inputs import Decoded

FIELD = "baseline"
EXPECTED = "expected an audit id of your team or a model version name@version"


def data_label(pinned: DatasetInputs | None, decoded: Decoded | None) -> str:
    """What was audited, for comparing audits: ``dataset[offset:stop]`` for a data-set slice (its
    reference pinned to a version), ``sha256:<hex>`` of the inputs' shape and bytes (and labels)
    for inline inputs."""
    if pinned is not None:
        return f"{pinned.dataset}[{pinned.offset}:{pinned.offset + pinned.limit}]"
    assert decoded is not None
    digest = hashlib.sha256()
    for array in (decoded.x, decoded.y):
        if array is not None:
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(array.tobytes())
    return f"sha256:{digest.hexdigest()}"


def _grid_text(grid: Sequence[float], norm: str) -> str:
    return "[" + ", ".join(eps_key(norm, e).split(":", 1)[1] for e in grid) + "]"


def differences(audit: AuditSpec, settings: Any) -> list[str]:
    """How the audit ``audit`` differs from the one whose result holds ``settings`` (its spec as the
    merge recorded it), in data, suite and eps grid; empty when they match."""
    found = settings if isinstance(settings, Mapping) else {}
    differ = []
    data = found.get("data")
    if data is None:
        differ.append(f"data: {audit.data} here, not recorded in the baseline (audited before samples "
                      "were recorded)")
    elif data != audit.data:
        differ.append(f"data: {audit.data} here, {data} in the baseline")
    if found.get("suite") != audit.suite:
        differ.append(f"suite: {audit.suite} here, {found.get('suite')} in the baseline")
    recorded = found.get("grids")
    grids: Mapping[str, Any] = recorded if isinstance(recorded, Mapping) else {}
    for norm in sorted(set(audit.grids) | set(grids)):
        mine, theirs = audit.grids.get(norm) or [], grids.get(norm) or []
        same = len(mine) == len(theirs) and all(match_eps(e, theirs) is not None for e in mine)
        if not same:
            differ.append(f"eps grid {norm}: {_grid_text(mine, norm) if mine else 'none'} here, "
                          f"{_grid_text(theirs, norm) if theirs else 'none'} in the baseline")
    return differ


def _settings(job: JobView) -> Any:
    return (job.result or {}).get("settings")


def _by_id(ref: str, audit: AuditSpec, history: HistoryStore, team: str) -> JobView:
    job = history.job(ref, team)
    if job is None:
        raise Problem(404, f"{FIELD}: {EXPECTED}; no audit {ref!r} of your team is recorded", field=FIELD,
                      code="unknown-baseline")
    if job.kind != "audit":
        raise invalid(FIELD, f"{EXPECTED}, got the id of a {job.kind} job")
    if job.status != JobState.succeeded or job.result is None:
        raise invalid(FIELD, f"expected a succeeded audit, got audit {ref} {job.status.value}")
    if differ := differences(audit, _settings(job)):
        raise invalid(FIELD, f"expected an audit on the same data, suite and eps grid; audit {ref} "
                             f"differs: {'; '.join(differ)}")
    return job


def _by_version(ref: str, audit: AuditSpec, history: HistoryStore, index: CardIndex, team: str) -> JobView:
    try:
        name, version = parse_ref(ref)
    except ValueError:
        raise invalid(FIELD, f"{EXPECTED}, got {ref!r}") from None
    card = index.card(ref)
    if version is None or card is None or (card.team is not None and card.team != team):
        raise Problem(404, f"{FIELD}: {EXPECTED} (GET /v1/models), got {ref!r}", field=FIELD,
                      code="unknown-baseline")
    candidates = history.audit_results(team, name, version)
    if not candidates:
        raise invalid(FIELD, f"expected a model version with a succeeded audit of your team, got {ref}, "
                             "which has none")
    for job in candidates:
        if not differences(audit, _settings(job)):
            return job
    newest = candidates[0]
    raise invalid(FIELD, f"expected {ref} to have an audit on the same data, suite and eps grid; none of "
                         f"its {len(candidates)} audit(s) has, the newest ({newest.id}) differs: "
                         f"{'; '.join(differences(audit, _settings(newest)))}")


def resolve(ref: str | None, audit: AuditSpec, history: HistoryStore, index: CardIndex,
            team: str) -> Baseline | None:
    """The baseline of ``audit`` (its spec with ``data`` filled in) named by ``ref``; None when it
    names none. 422 when a gate line compares with ``baseline`` and none is named, when the
    baseline differs in data, suite or eps grid, or lacks a metric a line compares; 404 for an
    unknown audit id or model (another team's included); 503 when the history does not answer."""
    lines: list[GateLine] = parse_gate(audit.thresholds)  # the gateway checked them already
    if ref is None:
        first = next((i for i, line in enumerate(lines) if line.baseline), None)
        if first is not None:
            raise invalid(f"thresholds[{first}]", f"gate line {lines[first].expression!r} compares with "
                                                  f"`baseline`; expected `baseline` ({EXPECTED}), got none")
        return None
    try:
        if "@" in ref:
            job = _by_version(ref, audit, history, index, team)
        elif ref.isascii() and ref.isalnum() and len(ref) <= 64:
            job = _by_id(ref, audit, history, team)
        else:
            raise invalid(FIELD, f"{EXPECTED}, got {ref!r}")
    except SQLAlchemyError as exc:
        raise unavailable("the history database", exc) from exc
    assert job.result is not None
    try:
        metrics = baseline_metrics(lines, job.result)
    except GateError as exc:
        raise invalid(f"thresholds[{exc.index}]", f"{exc.message} (baseline audit {job.id})") from None
    return Baseline.model_validate({"audit": job.id, "model": job.model or "", "created_at": job.created_at,
                                    "metrics": metrics})
