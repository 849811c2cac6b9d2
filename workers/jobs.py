"""RQ entry points. Orchestration only: validate the payload, load model and inputs, run the kernel
chunk by chunk (progress and cancel checks between chunks), score, store artifacts.

Jobs are enqueued by string reference (``"workers.jobs.run_attack"``) with the JSON serializer.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from pydantic import BaseModel, ValidationError
from rq import get_current_job
from rq.job import Job

from contracts import telemetry
from contracts.attacks import ATTACKS
from contracts.specs import PREDICT_INPUT_KEY
from history.recording import record_finished
from models.datasets import DataCatalog, DataError, DatasetMissingError, to_bounds
from models.manifest import GeneratorCard, ModelCard
from models.registry import ModelLoadError
from models.registry_store import open_registries
from models.store import BlobStore, open_store
from workers.artifacts import csv_bytes, grid_png, npy_bytes
from workers.attacks.base import Norm, project
from workers.attacks.catalog import kernel_spec
from workers.cache import (
    CANDIDATE_BATCHES,
    GeneratorCache,
    ModelCache,
    UnknownGeneratorError,
    UnknownModelError,
)
from workers.classifier import Classifier
from workers.defenses.squeeze import squeeze_logits_and_scores
from workers.device import pick_device
from workers.errors import CANCEL_KEY, InvalidJob, JobCanceled, JobFailure
from workers.liveness import Drained, check_draining, fail_audit
from workers.scores import (
    Evaluation,
    evaluate,
    logits_reusing,
    outside_ball,
    quantize,
    quantize_in_ball,
    rows_equal,
    summarize,
)
from workers.settings import WorkerSettings
from workers.specs import AdvGANParams, AttackJob, PredictJob

log = logging.getLogger(__name__)
SpecT = TypeVar("SpecT", bound=BaseModel)


@dataclass
class Context:
    """What a worker process keeps between jobs."""

    settings: WorkerSettings
    store: BlobStore
    cache: ModelCache
    generators: GeneratorCache
    data: DataCatalog


_context: Context | None = None


def make_context(settings: WorkerSettings) -> Context:
    store = open_store(settings)
    registries = open_registries(settings, store)  # the var dir, or the S3 store
    device = pick_device(settings.device)
    cache = ModelCache(registries.models, device, settings.model_cache_size,
                       settings.var_dir / "batch_sizes.json")
    generators = GeneratorCache(registries.generators, device, settings.model_cache_size)
    data = DataCatalog(settings.data_dir, settings.datasets_root, store, index=registries.datasets)
    return Context(settings, store, cache, generators, data)


def install_context(context: Context) -> None:
    global _context
    _context = context


def context() -> Context:
    global _context
    if _context is None:
        _context = make_context(WorkerSettings())
    return _context


# --- helpers ---------------------------------------------------------------------------------


def _fail_meta(job: Job | None, exc: BaseException) -> None:
    if job is None:
        return
    if isinstance(exc, JobFailure):
        job.meta["error"] = {"code": exc.code, "message": exc.message}
    else:
        job.meta["error"] = {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}
    job.save_meta()


def entry(payload: dict[str, Any], schema: type[SpecT], body: Callable[[SpecT, Job | None], dict[str, Any]]
          ) -> dict[str, Any]:
    """What every RQ entry point does around its work: validate the payload again (the queue is a
    trust boundary too), run ``body``, and store ``{code, message}`` in the job's meta on failure
    before re-raising so that RQ records it. A job canceled before it started (a retry, a chunk of
    a canceled audit) stops at once; a drained one (``workers.liveness``) is requeued unrecorded;
    a failed one is not retried (a retry is for a lost worker), and a failed audit chunk stops
    the audit's other chunks."""
    job = get_current_job()
    start = time.monotonic()
    try:
        _check_cancel(job)
        try:
            spec = schema.model_validate(payload)
        except ValidationError as exc:
            raise InvalidJob(f"invalid job payload: {exc}") from exc
        try:
            result = body(spec, job)
        except UnknownModelError as exc:  # any model a job names that the registry does not hold
            raise JobFailure(str(exc), "unknown-model") from exc
        record_finished(job, result)  # the job's end, in the history database
        _count_end(job, "succeeded", start)
        return result
    except Drained:
        raise
    except BaseException as exc:
        _fail_meta(job, exc)
        if job is not None:
            job.retries_left = 0
            if not isinstance(exc, JobCanceled):  # a canceled audit cancels its chunks itself
                fail_audit(job.connection, job, job.meta["error"], context().settings.result_ttl_s)
        record_finished(job)
        _count_end(job, "canceled" if isinstance(exc, JobCanceled) else "failed", start)
        raise


def _count_end(job: Job | None, outcome: str, start: float) -> None:
    """The job's outcome and duration, for the gateway's /metrics (``contracts.telemetry``)."""
    if job is not None:
        telemetry.record_end(job.connection, telemetry.metrics_key(context().settings.queue_prefix),
                             job, outcome, time.monotonic() - start)


def _check_cancel(job: Job | None) -> None:
    """Between chunks: stop a canceled job, requeue a running one when the worker drains."""
    check_draining()
    if job is not None and job.connection.exists(CANCEL_KEY.format(job.id)):
        raise JobCanceled("canceled by the client")


def _progress(job: Job | None, value: float, **extra: Any) -> None:
    if job is None:
        return
    job.meta["progress"] = round(value, 4)
    job.meta.update(extra)
    job.save_meta()


def load_dataset(data: DataCatalog, ref: str, offset: int, limit: int | None, team: str | None,
                 card: ModelCard, field: str = "inputs.dataset") -> tuple[np.ndarray, np.ndarray]:
    """A data-set slice for ``card``'s model: float32 NCHW in its ``bounds`` (data sets hold
    [0, 1]) and int64 labels, checked again against its input shape and classes (the queue is a
    trust boundary too). A reference that no longer resolves (a deleted version) fails the job."""
    try:
        x, y = data.load(ref, offset, limit, team)
    except DatasetMissingError as exc:
        raise JobFailure(f"{field}: {exc}", "dataset-missing") from exc
    except DataError as exc:
        raise JobFailure(f"{field}: {exc}", "unknown-dataset") from exc
    top = int(y.max()) if y.size else -1
    if tuple(x.shape[1:]) != tuple(card.input_shape) or top >= card.num_classes:
        raise JobFailure(f"{field}: expected inputs of shape {list(card.input_shape)} and labels below "
                         f"{card.num_classes} for {card.ref}, got {ref} with shape {list(x.shape[1:])} and "
                         f"labels up to {top}", "incompatible-data")
    return to_bounds(x, card.bounds), y


def load_inputs(spec: AttackJob, store: BlobStore, data: DataCatalog, card: ModelCard
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """A job's inputs as float32 NCHW in the model's bounds: a data-set slice (scaled from [0, 1])
    or the blob the gateway stored (already in the model's bounds)."""
    ref = spec.inputs
    if ref.kind == "dataset":
        assert ref.dataset is not None
        x, y = load_dataset(data, ref.dataset, ref.offset, ref.n, spec.team, card)
        if x.shape[0] != ref.n:
            raise InvalidJob(f"expected {ref.n} samples from {ref.dataset}, got {x.shape[0]}")
        return x, y
    assert ref.key is not None
    with np.load(io.BytesIO(store.get(ref.key)), allow_pickle=False) as blob:
        x_blob = blob["x"].astype(np.float32, copy=False)
        y_blob = blob["y"].astype(np.int64) if "y" in blob.files else None
    return x_blob, y_blob


def choose_targets(
    attack: Any, clean_logits: torch.Tensor, y: torch.Tensor, num_classes: int,
    generator: torch.Generator,
) -> torch.Tensor | None:
    """Per-sample target classes of a targeted attack (given, random != y, or least likely)."""
    if not getattr(attack, "targeted", False):
        return None
    if attack.targets is not None:
        return torch.tensor(attack.targets, dtype=torch.int64, device=y.device)
    if attack.target_mode == "least-likely":
        return clean_logits.argmin(dim=1)
    shift = torch.randint(1, num_classes, y.shape, generator=generator, device=y.device)
    return (y + shift) % num_classes


@dataclass(frozen=True)
class LoadedAttack:
    """What an attack needs beyond its parameters, loaded by the job: ``spec_fields`` for
    ``kernel_spec``/``craft``, the per-input ``targets`` it implies (None: choose them as usual)
    and the ``generator`` card that it came from."""

    spec_fields: dict[str, Any]
    targets: torch.Tensor | None = None
    generator: GeneratorCard | None = None


def load_attack(attack: Any, ctx: Context, card: ModelCard, y: torch.Tensor) -> LoadedAttack:
    """``advgan``: the trained generator (from the worker's cache, on the model's device), its
    card's eps and targeting, and its one target class for every input. Other attacks: nothing.
    Checks again what the gateway checked (the queue is a trust boundary too)."""
    if not isinstance(attack, AdvGANParams):
        return LoadedAttack({})
    try:
        gen_card, network = ctx.generators.get(attack.generator)
    except UnknownGeneratorError as exc:
        raise JobFailure(f"attack.generator: {exc}", "unknown-generator") from exc
    except ModelLoadError as exc:
        raise JobFailure(f"attack.generator: {exc}", "generator-load-failed") from exc
    mismatch = gen_card.fits(card)
    if mismatch is not None:
        raise JobFailure(f"attack.generator: {mismatch}", "incompatible-generator")
    network = network.to(y.device)
    targets = torch.full_like(y, gen_card.target_class) if gen_card.target_class is not None else None
    fields = {"generator": network, "eps": gen_card.eps, "targeted": gen_card.targeted}
    return LoadedAttack(fields, targets, gen_card)


@dataclass(frozen=True)
class Crafted:
    """What ``craft_chunks`` returns: ``x_adv`` like ``x``, the per-sample ``queries`` and
    ``gradients``, and the model's logits on the rows of ``x_adv`` that the kernel forwarded itself
    (``logits``, meaningful where ``logits_known``; None when the kernel keeps none, see
    ``AttackOutput.logits``)."""

    x_adv: torch.Tensor
    queries: torch.Tensor
    gradients: torch.Tensor
    logits: torch.Tensor | None = None
    logits_known: torch.Tensor | None = None


def craft(
    model: Classifier, x: torch.Tensor, y: torch.Tensor, attack: Any, batch_size: int,
    generator: torch.Generator, targets: torch.Tensor | None = None,
    on_chunk: Callable[[int], None] | None = None, loaded: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``craft_chunks`` without the kernel's logits: ``x_adv``, queries and gradient calls."""
    out = craft_chunks(model, x, y, attack, batch_size, generator, targets, on_chunk, loaded)
    return out.x_adv, out.queries, out.gradients


def craft_chunks(
    model: Classifier, x: torch.Tensor, y: torch.Tensor, attack: Any, batch_size: int,
    generator: torch.Generator, targets: torch.Tensor | None = None,
    on_chunk: Callable[[int], None] | None = None, loaded: Mapping[str, Any] | None = None,
) -> Crafted:
    """Run ``attack`` (its pydantic params) over ``x`` chunk by chunk. ``on_chunk(processed)``
    runs after each chunk; ``loaded``: see ``kernel_spec``."""
    kernel, kspec = kernel_spec(attack, loaded)
    x_adv = torch.empty_like(x)
    queries = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    gradients = torch.zeros_like(queries)
    logits: torch.Tensor | None = None
    for start in range(0, x.shape[0], batch_size):
        stop = min(start + batch_size, x.shape[0])
        chunk_targets = targets[start:stop] if targets is not None else None
        out = kernel(model, x[start:stop], y[start:stop], kspec, targets=chunk_targets,
                     generator=generator)
        x_adv[start:stop] = out.x_adv
        queries[start:stop] = out.queries
        gradients[start:stop] = out.gradients
        if out.logits is not None and (start == 0 or logits is not None):
            if logits is None:
                logits = out.logits.new_empty((x.shape[0], *out.logits.shape[1:]))
            logits[start:stop] = out.logits
        else:
            logits = None  # a chunk without: none (kernels keep them for every chunk or for none)
        if on_chunk is not None:
            on_chunk(stop)
    # Never trust the kernel's own loop: project once more (the caller judges the final tensor).
    raw = x_adv
    eps = getattr(kspec, "eps", None)
    if eps is not None:
        x_adv = project(x_adv, x, eps, getattr(kspec, "norm", "linf"), model.bounds)
    else:
        x_adv = x_adv.clamp(*model.bounds)
    # The kernel's logits stand for the rows the projection left bit for bit as the kernel made them.
    known = rows_equal(x_adv, raw) if logits is not None else None
    return Crafted(x_adv, queries, gradients, logits, known)


# --- attack ----------------------------------------------------------------------------------


def run_attack(payload: dict[str, Any]) -> dict[str, Any]:
    """RQ job: run one attack over the job's inputs and return the scores summary."""
    return entry(payload, AttackJob, _run_attack)


def _run_attack(spec: AttackJob, job: Job | None) -> dict[str, Any]:
    started = time.perf_counter()
    ctx = context()
    card, model = ctx.cache.get(spec.model)
    # Transfer: the attack sees only the surrogate; scores are measured on the target.
    attacker_card, attacker = card, model
    if spec.surrogate is not None:
        attacker_card, attacker = ctx.cache.get(spec.surrogate)
    device = model.device
    x_np, y_np = load_inputs(spec, ctx.store, ctx.data, card)
    x = torch.from_numpy(x_np).to(device)
    batch_size, batch_source = job_batch_size(ctx.cache, attacker_card, attacker, spec.batch_size, job)
    attacker.reset_counters()
    try:
        # Remembered: the kernel's first forward on each chunk is this one (see Classifier.predict).
        clean_logits = model.predict(x, batch_size, remember=attacker is model)
        clean_pred = clean_logits.argmax(dim=1)
        attacker_logits = clean_logits if attacker is model else attacker.predict(x, batch_size, remember=True)
        labels_given = y_np is not None
        y = torch.from_numpy(y_np).to(device) if y_np is not None else clean_pred.clone()
        generator = torch.Generator(device=device).manual_seed(spec.seed)
        loaded = load_attack(spec.attack, ctx, attacker_card, y)
        targets = loaded.targets if loaded.targets is not None else choose_targets(
            spec.attack, attacker_logits, y, card.num_classes, generator)
        log.info("%s: %s on %s (crafted on %s), %d inputs, chunks of %d", spec.job_id,
                 spec.attack.name, card.ref, attacker_card.ref, x.shape[0], batch_size)

        def on_chunk(stop: int) -> None:
            _check_cancel(job)
            _progress(job, stop / x.shape[0], processed=stop, stage={"phase": "attacking"})
            log.info("%s: %d/%d done", spec.job_id, stop, x.shape[0])

        _check_cancel(job)
        _progress(job, 0.0, stage={"phase": "attacking"})
        crafted = craft_chunks(attacker, x, y, spec.attack, batch_size, generator, targets, on_chunk,
                               loaded.spec_fields)
        x_adv, queries, gradients = crafted.x_adv, crafted.queries, crafted.gradients
    finally:
        attacker.forget()
    _progress(job, 1.0, stage={"phase": "scoring"})
    minimal = ATTACKS[spec.attack.name].minimal
    # The images' artifacts are encoded and stored while the scores are computed (PNG and .npy
    # encoding and the store's I/O mostly release the GIL).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"artifacts-{spec.job_id}") as pool:
        images = pool.submit(_write_images, ctx.store, spec.job_id, card, x, x_adv)
        # Rows whose logits a forward pass already gave need none: those the attack left unchanged
        # (the clean pass), those the kernel forwarded itself (when it crafted on this very model),
        # and, 8-bit, those quantizing left unchanged (see logits_reusing).
        unchanged = rows_equal(x_adv, x)
        known_logits, known = clean_logits, unchanged
        if crafted.logits is not None and crafted.logits_known is not None and attacker is model:
            known_logits = torch.where(unchanged[:, None], clean_logits, crafted.logits)
            known = unchanged | crafted.logits_known
        adv_logits = logits_reusing(model, x_adv, batch_size, known_logits, known)
        ev = evaluate(model, x, y, x_adv, clean_pred, targets, batch_size, adv_logits)
        ball = attack_ball(spec.attack, loaded.spec_fields)
        x_q, ball_info = quantize_for_client(x_adv, x, card.bounds, ball)
        ev_q = evaluate(model, x, y, x_q, clean_pred, targets, batch_size,
                        logits_reusing(model, x_q, batch_size, adv_logits, rows_equal(x_q, x_adv)))
        scores = summarize(ev, y, clean_pred, labels_given, minimal)
        scores["gradient_calls"] = float(gradients.double().mean())
        scores["queries"] = float(queries.double().mean())
        scores["quantized"] = {**summarize(ev_q, y, clean_pred, labels_given, minimal), "ball": ball_info}
        if attacker is not model:
            scores["transfer"] = transfer_scores(attacker, attacker_card.ref, x, y, x_adv,
                                                 attacker_logits.argmax(dim=1), clean_pred, targets,
                                                 ev, batch_size)
        table = _write_samples(ctx.store, spec.job_id, y, clean_pred, targets, ev, ev_q, queries,
                               gradients)
        artifacts = [*images.result(), table]
    return {
        "scores": scores,
        "artifacts": artifacts,
        "attack": spec.attack.model_dump(),
        "model": card.ref,
        "surrogate": attacker_card.ref if attacker is not model else None,
        **({"generator": generator_summary(loaded.generator)} if loaded.generator is not None else {}),
        "seed": spec.seed,
        "batch_size": batch_size,
        "batch_size_source": batch_source,
        "seconds": round(time.perf_counter() - started, 3),
    }


def job_batch_size(cache: ModelCache, card: ModelCard, model: Classifier, requested: int | None,
                   job: Job | None) -> tuple[int, str]:
    """The chunk size a job runs ``model`` at, and where it came from: ``job`` (the job asked for
    it), ``remembered`` (chosen at registration or by an earlier calibration of this model version
    on this device, e.g. when the worker preloaded it) or ``calibrated`` (measured now: the job's
    ``stage`` says ``calibrating`` meanwhile, with the candidate size being timed)."""
    if requested is not None:
        return requested, "job"
    known = cache.known_batch_size(card)
    if known is not None:
        return known, "remembered"

    def on_candidate(i: int, size: int) -> None:
        _check_cancel(job)
        _progress(job, 0.0, stage={"phase": "calibrating", "model": card.ref, "batch_size": size,
                                   "candidate": i + 1, "candidates": len(CANDIDATE_BATCHES)})

    if job is not None:
        log.info("%s: calibrating the chunk size of %s on %s", job.id, card.ref, cache.device)
    return cache.batch_size(card, model, on_candidate), "calibrated"


def attack_ball(attack: Any, loaded: Mapping[str, Any] | None = None) -> tuple[float, Norm] | None:
    """The budget ``(eps, norm)`` that ``craft`` projects ``attack``'s examples onto (the kernel
    spec's, so ``advgan`` gets its generator card's eps); None for minimal attacks, which have none."""
    if ATTACKS[attack.name].minimal:
        return None
    _, kspec = kernel_spec(attack, loaded)
    eps = getattr(kspec, "eps", None)
    return None if eps is None else (float(eps), getattr(kspec, "norm", "linf"))


def quantize_for_client(
    x_adv: torch.Tensor, x: torch.Tensor, bounds: tuple[float, float], ball: tuple[float, Norm] | None,
) -> tuple[torch.Tensor, dict[str, Any] | None]:
    """The 8-bit version of ``x_adv`` that the quantized scores are measured on: rounded inside the
    attack's ball when it has one (plain rounding can leave it), and what the result says about that
    ball (``outside``: examples still outside it, only possible for inputs off the 8-bit levels)."""
    if ball is None:
        return quantize(x_adv, bounds), None
    eps, norm = ball
    x_q = quantize_in_ball(x_adv, x, bounds, eps, norm)
    return x_q, {"norm": norm, "eps": eps, "outside": int(outside_ball(x_q, x, eps, norm, bounds).sum())}


def generator_summary(card: GeneratorCard) -> dict[str, Any]:
    """What an ``advgan`` result says about the generator it ran."""
    return {"generator": card.ref, "target_model": card.target_model, "mode": card.mode, "eps": card.eps,
            "targeted": card.targeted, "target_class": card.target_class}


def transfer_scores(
    surrogate: Classifier, ref: str, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor,
    surrogate_pred: torch.Tensor, clean_pred: torch.Tensor, targets: torch.Tensor | None,
    ev: Evaluation, batch_size: int,
) -> dict[str, Any]:
    """How the examples crafted on the surrogate fare on both models."""
    on_surrogate = evaluate(surrogate, x, y, x_adv, surrogate_pred, targets, batch_size)
    crafted = on_surrogate.success & (clean_pred == y)
    n_crafted = int(crafted.sum())
    return {
        "surrogate": ref,
        "surrogate_success_rate": _rate(on_surrogate.success, surrogate_pred == y),
        "transferred": int((crafted & ev.success).sum()),
        "transfer_rate": float((crafted & ev.success).sum()) / n_crafted if n_crafted else None,
    }


def _rate(hits: torch.Tensor, among: torch.Tensor) -> float | None:
    total = int(among.sum())
    return float((hits & among).sum()) / total if total else None


def _write_images(store: BlobStore, job_id: str, card: ModelCard, x: torch.Tensor,
                  x_adv: torch.Tensor) -> list[str]:
    """Store ``adversarial.npy`` and ``grid.png``; their names."""
    x_np, adv_np = x.cpu().numpy(), x_adv.cpu().numpy()
    files = {
        "adversarial.npy": npy_bytes(adv_np.astype(np.float32)),
        "grid.png": grid_png(x_np, adv_np, card.bounds),
    }
    for name, data in files.items():
        store.put(f"jobs/{job_id}/{name}", data)
    return list(files)


def _write_samples(
    store: BlobStore, job_id: str, y: torch.Tensor, clean_pred: torch.Tensor,
    targets: torch.Tensor | None, ev: Any, ev_q: Any, queries: torch.Tensor, gradients: torch.Tensor,
) -> str:
    """Store the per-sample table ``samples.csv``; its name."""
    header = ["index", "label", "target", "clean_pred", "adv_pred", "success", "quantized_pred",
              "quantized_success", "linf", "l2", "l0", "confidence", "queries", "gradients"]
    cols = [y, targets if targets is not None else torch.full_like(y, -1), clean_pred,
            ev.adv_pred, ev.success, ev_q.adv_pred, ev_q.success, ev.linf, ev.l2, ev.l0,
            ev.confidence, queries, gradients]
    lists = [c.cpu().tolist() for c in cols]
    rows = []
    for i in range(y.shape[0]):
        row: list[object] = [i]
        for values in lists:
            value = values[i]
            row.append(f"{value:.6g}" if isinstance(value, float) else int(value))
        rows.append(row)
    store.put(f"jobs/{job_id}/samples.csv", csv_bytes(header, rows))
    return "samples.csv"


# --- predict ---------------------------------------------------------------------------------


def run_predict(payload: dict[str, Any]) -> dict[str, Any]:
    """RQ job on the high-priority queue: logits for a small batch."""
    return entry(payload, PredictJob, _run_predict)


def predict_input(spec: PredictJob, job: Job | None) -> np.ndarray:
    """A prediction's float32 input: inline (base64 .npy) or, as the gateway sends it, raw bytes
    stored beside the job (``PREDICT_INPUT_KEY``), checked against the payload's shape."""
    if spec.array is not None:
        array = np.load(io.BytesIO(base64.b64decode(spec.array)), allow_pickle=False)
        return array.astype(np.float32, copy=False)
    assert spec.shape is not None  # PredictJob holds one or the other
    raw = job.connection.get(PREDICT_INPUT_KEY.format(spec.job_id)) if job is not None else None
    if not isinstance(raw, bytes):
        raise JobFailure("the prediction's input is gone (the gateway gave up waiting)", "input-expired")
    expected = math.prod(spec.shape) * 4
    if len(raw) != expected:
        raise InvalidJob(f"expected {expected} bytes of float32 input of shape {spec.shape}, got {len(raw)}")
    # A writable copy (torch warns on read-only memory); the bytes are small next to a forward pass.
    return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(spec.shape)


def _run_predict(spec: PredictJob, job: Job | None) -> dict[str, Any]:
    ctx = context()
    card, model = ctx.cache.get(spec.model)
    x = torch.from_numpy(predict_input(spec, job)).to(model.device)

    def outputs(logits: torch.Tensor) -> dict[str, Any]:
        return {"model": card.ref, "logits": logits.cpu().tolist(),
                "probabilities": logits.softmax(dim=1).cpu().tolist(),
                "labels": logits.argmax(dim=1).cpu().tolist()}

    if not spec.reject:
        return outputs(model.predict(x, 256))
    detector = ctx.cache.index.detector(card, spec.team)
    if detector is None:
        raise JobFailure(f"{card.ref} has no calibrated detector", "no-detector")
    logits, scores = squeeze_logits_and_scores(model.module, x, detector.squeezers, card.bounds,
                                               batch_size=256)
    model.queries += x.shape[0] * (1 + len(detector.squeezers))
    return {
        **outputs(logits),
        "scores": scores.cpu().tolist(),
        "threshold": detector.threshold,
        "rejected": (scores > detector.threshold).cpu().tolist(),
        "detector": {"kind": detector.kind, "fpr": detector.fpr, "model": detector.model},
    }

