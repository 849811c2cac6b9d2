"""RQ entry points of audits: one job per chunk of samples (spread over every worker serving the
``audits`` queue), then one merge job that depends on all of them. Orchestration only: the battery
is ``workers.audit.battery``, the merge ``workers.audit.merge``, the report ``workers.audit.report``.

A chunk stores its per-sample arrays as ``audits/<audit id>/chunk-<i>.npz`` in the blob store; the
merge job reads them all, writes ``report.html``, ``samples.csv`` and ``audit.json`` as the audit's
artifacts, evaluates the gate and returns the result.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC
from typing import Any

import numpy as np
import torch
from rq.job import Job

from contracts.attacks import ATTACKS
from contracts.audit_result import check_result
from contracts.gate import evaluate_gate, parse_gate
from workers.artifacts import csv_bytes
from workers.attacks.catalog import kernel_spec
from workers.audit.battery import AuditPlan, Detector, Stage, run_battery
from workers.audit.merge import Chunk, merge, nan_to_none, worst_case_rows
from workers.audit.report import render_report, report_samples
from workers.errors import JobFailure
from workers.jobs import _check_cancel, _progress, context, entry, load_inputs
from workers.liveness import check_audit
from workers.specs import (
    AuditChunkJob,
    AuditMergeJob,
    AuditSpec,
    CarliniWagnerL2Params,
    DeepFoolParams,
)

log = logging.getLogger(__name__)
PROBE = "fgsm"
# The standard and autoattack suites run as AutoAttack does (each attack on the survivors of the
# previous ones) unless per-attack curves are asked for; their more-steps check is then PGD with
# twice APGD's steps and one restart (then the margin loss). On each survivor the suite already
# spends 9 passes of APGD-T (and 9 of FAB-T) and 5000 Square queries, so the check stays a small
# share of the audit; 5x the steps and 3 restarts (the check of the other suites) would cost about
# as much as the suite itself. bench/results/autoattack.md measures the share.
CASCADE_PLAN: dict[str, Any] = {"cascade": True, "more_steps_factor": 2, "more_restarts": 1}


# --- the plan --------------------------------------------------------------------------------

# The built-in suites' bounded attacks, in suite order (the custom suite: the caller's, after the probe).
SUITES: dict[str, tuple[str, ...]] = {
    "quick": ("fgsm", "pgd"),
    "standard": (PROBE, "apgd-ce", "apgd-t", "square"),
    "autoattack": (PROBE, "apgd-ce", "apgd-t", "fab-t", "square"),
}
# What the suites give their bounded attacks besides name, norm and eps (set per grid point);
# every other parameter keeps its Params default.
SUITE_BUDGETS: dict[str, Callable[[AuditSpec], dict[str, Any]]] = {
    "fgsm": lambda spec: {},
    "pgd": lambda spec: {"steps": spec.steps or 20},
    "apgd-ce": lambda spec: {"steps": spec.steps or 100},
    "apgd-t": lambda spec: {"steps": spec.steps or 100, "n_target_classes": spec.n_target_classes},
    "fab-t": lambda spec: {"steps": spec.steps or 100, "n_target_classes": spec.n_target_classes},
    "square": lambda spec: {"max_queries": spec.square_queries},
}


def suite_params(spec: AuditSpec, name: str, norm: str) -> Any:
    """The Params a suite runs ``name`` with in ``norm`` (eps 1.0: replaced per grid point)."""
    return ATTACKS[name].params.model_validate({"name": name, "norm": norm, "eps": 1.0,
                                                **SUITE_BUDGETS[name](spec)})


def bounded_attacks(spec: AuditSpec, norm: str, num_classes: int | None = None) -> list[Any]:
    """The suite's bounded attacks in ``norm`` as Params, in suite order: a built-in suite's with
    its budgets, leaving out those the model has too few classes for (APGD-T's DLR loss is not
    defined on two, ``workers.attacks.apgd.check_dlr_classes``, and targeting the one other class
    is what APGD-CE already does); the custom suite's as the gateway checked them, after the probe."""
    if spec.suite == "custom":
        attacks = [a for a in spec.attacks or []
                   if not ATTACKS[a.name].minimal and ATTACKS[a.name].norm(a) == norm]
        probe = [] if any(a.name == PROBE for a in attacks) else [suite_params(spec, PROBE, norm)]
        return probe + attacks
    return [suite_params(spec, name, norm) for name in SUITES.get(spec.suite, ())
            if num_classes is None or num_classes >= ATTACKS[name].min_classes]


def minimal_key(name: str, norm: str) -> str:
    """The result key of a minimal attack: its name in its usual norm (L2; JSMA's L0), else
    ``<name>-<norm>`` (``deepfool-linf``), so that one attack in two norms gives two entries."""
    return name if norm in ("l2", "l0") else f"{name}-{norm}"


def minimal_attacks(spec: AuditSpec) -> list[tuple[str, str, Any]]:
    """The minimal attacks as (result key, the norm their size is measured in, Params): the minimal
    suite's DeepFool (L2, and Linf with a Linf grid) and C&W L2 with their defaults, the custom
    suite's with the caller's parameters, as the gateway checked them."""
    attacks: list[Any] = []
    if spec.suite == "minimal":
        attacks = [DeepFoolParams(name="deepfool", norm="l2"), CarliniWagnerL2Params(name="carlini-wagner-l2")]
        if "linf" in spec.grids:
            attacks.append(DeepFoolParams(name="deepfool", norm="linf"))
    elif spec.suite == "custom":
        attacks = [a for a in spec.attacks or [] if ATTACKS[a.name].minimal]
    measured = [(a, ATTACKS[a.name].norm(a)) for a in attacks]
    return [(minimal_key(a.name, norm), norm, a) for a, norm in measured]


def stage_names(spec: AuditSpec, num_classes: int | None = None) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Bounded attack names per norm (suite order) and the minimal attacks' result keys -> the
    norm they are measured in (one key per name and norm, see ``minimal_key``): what the merge
    needs of ``build_plan``. ``num_classes``: the model's (see ``bounded_attacks``)."""
    bounded = {norm: [a.name for a in bounded_attacks(spec, norm, num_classes)] for norm in spec.grids}
    return bounded, {key: norm for key, norm, _ in minimal_attacks(spec)}


def build_plan(spec: AuditSpec, detector: Detector | None, surrogates: tuple[Any, ...],
               batch_size: int, num_classes: int | None = None) -> AuditPlan:
    stages = {norm: tuple(Stage(a.name, kernel_spec(a)[1], norm)
                          for a in bounded_attacks(spec, norm, num_classes)) for norm in spec.grids}
    minimal = tuple(Stage(a.name, kernel_spec(a)[1], norm, bounded=False, key=key)
                    for key, norm, a in minimal_attacks(spec))
    return AuditPlan(grids={n: tuple(g) for n, g in spec.grids.items()}, stages=stages, minimal=minimal,
                     check_eps=spec.check_eps, detector=detector, surrogates=surrogates,
                     transfer_eps=spec.transfer_eps if surrogates else None, batch_size=batch_size,
                     **(CASCADE_PLAN if cascades(spec) else {}))


def cascades(spec: AuditSpec) -> bool:
    """Whether the suite runs as a cascade (see ``AuditPlan.cascade``)."""
    return spec.suite in ("standard", "autoattack") and not spec.per_attack_curves


# --- chunks ----------------------------------------------------------------------------------


def _save(result: Chunk, minimal_keys: list[str]) -> bytes:
    arrays: dict[str, np.ndarray] = {"labels": result.labels, "clean_pred": result.clean_pred}
    for norm, value in result.robust.items():
        arrays[f"robust.{norm}"] = value
        arrays[f"broken_by.{norm}"] = result.broken_by[norm]
        arrays[f"images.{norm}"] = result.images[norm]
        arrays[f"image_preds.{norm}"] = result.image_preds[norm]
    for norm, value in result.flagged.items():
        arrays[f"flagged.{norm}"] = value
    for norm, value in result.flagged_by_stage.items():
        arrays[f"flagged_by_stage.{norm}"] = value
    for norm, value in result.evaded_adaptive.items():
        arrays[f"evaded_adaptive.{norm}"] = value
    if result.clean_flagged is not None:
        arrays["clean_flagged"] = result.clean_flagged
    if result.clean_images is not None:
        arrays["clean_images"] = result.clean_images
    for i, key in enumerate(minimal_keys):
        arrays[f"minimal.{i}"] = result.minimal[key]
    for i, value in enumerate(result.transfer.values()):
        arrays[f"transfer.{i}"] = value
    meta = {"counters": result.counters, "bpda": result.bpda, "eot": result.eot,
            "minimal": minimal_keys, "transfer": list(result.transfer), "labelled": result.labelled,
            "bounds": result.bounds, "input_shape": result.input_shape, "transfer_eps": result.transfer_eps,
            "started_at": result.started_at}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _load(data: bytes) -> Chunk:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["meta"].tobytes().decode())
    norms = [k.split(".", 1)[1] for k in arrays if k.startswith("robust.")]
    return Chunk(
        labels=arrays["labels"], clean_pred=arrays["clean_pred"],
        robust={n: arrays[f"robust.{n}"] for n in norms},
        broken_by={n: arrays[f"broken_by.{n}"] for n in norms},
        minimal={name: arrays[f"minimal.{i}"] for i, name in enumerate(meta["minimal"])},
        flagged={k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("flagged.")},
        clean_flagged=arrays.get("clean_flagged"),
        transfer={name: arrays[f"transfer.{i}"] for i, name in enumerate(meta["transfer"])},
        counters=meta["counters"], bpda=meta["bpda"], eot=meta["eot"],
        flagged_by_stage={k.split(".", 1)[1]: v for k, v in arrays.items()
                          if k.startswith("flagged_by_stage.")},
        evaded_adaptive={k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("evaded_adaptive.")},
        images={n: arrays[f"images.{n}"] for n in norms},
        image_preds={n: arrays[f"image_preds.{n}"] for n in norms},
        clean_images=arrays.get("clean_images"),
        # chunks saved before these were recorded: labelled, the rest unknown
        labelled=meta.get("labelled", True),
        bounds=None if meta.get("bounds") is None else (float(meta["bounds"][0]), float(meta["bounds"][1])),
        input_shape=None if meta.get("input_shape") is None else tuple(meta["input_shape"]),
        transfer_eps=meta.get("transfer_eps"), started_at=meta.get("started_at"))


def run_audit_chunk(payload: dict[str, Any]) -> dict[str, Any]:
    """RQ job: the battery on one chunk of an audit's samples."""
    return entry(payload, AuditChunkJob, _audit_chunk)


def _audit_chunk(spec: AuditChunkJob, job: Job | None) -> dict[str, Any]:
    started, started_at = time.perf_counter(), time.time()
    _check_audit(job, spec.audit_id)
    ctx = context()
    card, model = ctx.cache.get(spec.model)
    surrogates = tuple(ctx.cache.get(ref)[1] for ref in spec.audit.surrogates)
    x_np, y_np = load_inputs(spec, ctx.store, ctx.data, card)  # type: ignore[arg-type]
    if spec.inputs.kind == "blob":  # a dataset chunk's InputRef is the chunk's own slice already
        x_np, y_np = x_np[spec.start:spec.stop], None if y_np is None else y_np[spec.start:spec.stop]
    x = torch.from_numpy(np.ascontiguousarray(x_np)).to(model.device)
    batch = ctx.cache.batch_size(card, model)
    # Data sets always carry labels; a blob only when the client sent them. Without, the model's
    # own predictions stand in (robust accuracy then measures prediction changes) and the merge
    # reports no clean accuracy.
    labelled = y_np is not None and (spec.inputs.kind == "dataset" or spec.inputs.has_labels)
    y = (torch.from_numpy(y_np).to(model.device) if y_np is not None and labelled
         else model.predict(x, batch).argmax(1))
    found = ctx.cache.index.detector(card, spec.team)
    detector = None if found is None else Detector(found.squeezers, found.threshold, spec.audit.adaptive_steps)
    plan = build_plan(spec.audit, detector, surrogates, batch, card.num_classes)
    generator = torch.Generator(device=model.device).manual_seed(spec.seed + spec.index)
    total = sum(len(s) * len(plan.grids[n]) for n, s in plan.stages.items()) + len(plan.minimal) + 2
    total += 0 if detector is None else sum(len(grid) for grid in plan.grids.values())  # the adaptive attack
    done = [0]

    def on_stage(what: str) -> None:
        _check_cancel(job)
        _check_audit(job, spec.audit_id)
        done[0] += 1
        _progress(job, min(done[0] / total, 0.99), stage={"chunk": spec.index, "doing": what})
        log.info("%s: chunk %d: %s", spec.audit_id, spec.index, what)

    model.reset_counters()
    result = run_battery(model, x, y, plan, generator=generator, on_stage=on_stage)
    result.counters["queries"] = float(model.queries)
    result.counters["gradients"] = float(model.gradients)
    result.labelled, result.started_at = labelled, started_at
    ctx.store.put(f"audits/{spec.audit_id}/chunk-{spec.index}.npz", _save(result, list(result.minimal)))
    return {"audit": spec.audit_id, "chunk": spec.index, "n": int(x.shape[0]),
            "seconds": round(time.perf_counter() - started, 3)}


def _check_audit(job: Job | None, audit_id: str) -> None:
    """Stop when another chunk of the audit failed for good: the audit is reported failed."""
    if job is not None:
        check_audit(job.connection, audit_id)


# --- merge -----------------------------------------------------------------------------------


def run_audit_merge(payload: dict[str, Any]) -> dict[str, Any]:
    """RQ job: merge the chunks, evaluate the gate, write the report; returns the audit result."""
    return entry(payload, AuditMergeJob, _audit_merge)


def _audit_merge(spec: AuditMergeJob, job: Job | None) -> dict[str, Any]:
    started = time.perf_counter()
    ctx = context()
    card = ctx.cache.resolve(spec.model)
    chunk_jobs: list[Job | None] = []
    if job is not None:
        chunk_jobs = Job.fetch_many(spec.chunk_ids, connection=job.connection, serializer=job.serializer)
        failed = [cid for cid, dep in zip(spec.chunk_ids, chunk_jobs, strict=True)
                  if dep is None or dep.get_status() != "finished"]
        if failed:
            first = next(dep for cid, dep in zip(spec.chunk_ids, chunk_jobs, strict=True) if cid == failed[0])
            cause = (first.meta.get("error") or {}).get("message", "no error recorded") if first else "expired"
            raise JobFailure(f"{len(failed)} of {len(spec.chunk_ids)} chunk jobs did not finish "
                             f"(first: {failed[0]}: {cause})", "chunk-failed")
    chunks = [_load(ctx.store.get(f"audits/{spec.audit_id}/chunk-{i}.npz")) for i in range(len(spec.chunk_ids))]
    bounded, minimal = stage_names(spec.audit, card.num_classes)
    found = ctx.cache.index.detector(card, spec.team)
    detector = None if found is None else {"threshold": found.threshold, "fpr": found.fpr,
                                           "model": found.model, "adaptive_steps": spec.audit.adaptive_steps}
    result = merge(chunks, spec.audit.grids, bounded, minimal, card.classes, detector=detector)
    result = nan_to_none(result)
    result.update({"model": card.ref, "suite": spec.audit.suite, "seed": spec.seed,
                   "settings": spec.audit.model_dump(mode="json", exclude={"attacks"}),
                   "attacks": bounded, "minimal_attacks": list(minimal), "notes": spec.audit.notes})
    gate = parse_gate(spec.audit.thresholds)
    baseline = None if spec.audit.baseline is None else spec.audit.baseline.model_dump(mode="json")
    result["baseline"] = None if baseline is None else {
        k: baseline[k] for k in ("audit", "model", "created_at")}
    result["gate"] = evaluate_gate(gate, result, baseline) if gate else None
    samples = report_samples(chunks, result, spec.audit.grids, spec.audit.check_eps, card.bounds)
    header, rows = worst_case_rows(chunks, spec.audit.grids, bounded)
    result["artifacts"] = ["report.html", "samples.csv", "audit.json"]
    ctx.store.put(f"jobs/{spec.audit_id}/samples.csv", csv_bytes(header, rows))
    # The audit's time runs from its first chunk's start (on whichever worker) to the end of the
    # merge; what is left after this is rendering the report and writing two blobs.
    result["merge_seconds"] = round(time.perf_counter() - started, 3)
    first_start = _first_start(chunks, chunk_jobs)
    result["seconds"] = result["merge_seconds"] if first_start is None else max(
        round(time.time() - first_start, 3), result["merge_seconds"])
    # The result's schema (contracts.audit_result) is the contract with the gate, the report and the
    # CLI: a result that does not fit it is a bug here, never stored or returned.
    check_result(result)
    ctx.store.put(f"jobs/{spec.audit_id}/audit.json", json.dumps(result, indent=2).encode())
    ctx.store.put(f"jobs/{spec.audit_id}/report.html",
                  render_report(result, samples, card.classes).encode())
    return result


def _first_start(chunks: list[Chunk], chunk_jobs: list[Job | None]) -> float | None:
    """Unix time the audit's first chunk started: as each chunk recorded it, else (a chunk stored
    by an older worker) as RQ did; None if neither knows."""
    starts = [c.started_at for c in chunks if c.started_at is not None]
    starts += [dep.started_at.replace(tzinfo=UTC).timestamp() for dep in chunk_jobs
               if dep is not None and dep.started_at is not None]
    return min(starts, default=None)
