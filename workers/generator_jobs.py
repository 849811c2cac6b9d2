"""RQ entry point of AdvGAN training jobs: train a generator against a registry model, measure it
on held-out data, publish it to the generator registry.

Orchestration only (the training lives in ``workers/generators/advgan.py``, the attack in
``workers/attacks/advgan.py``): validate the payload, load the target and the data, train with
progress and cancel checks, run the ``advgan`` attack through the same chunk loop as an attack
job on the held-out slice, and publish. Publishing is the last step and is atomic
(``VersionedIndex.publish``: a staging directory renamed into place, or the card put last in the
S3 store): a job killed or canceled at any point leaves no generator.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from rq.job import Job
from torch import nn

from models.architectures import build
from models.manifest import DISCRIMINATOR_FILE, GENERATOR_FILE, NAME_RE, GeneratorCard, Lineage, ModelCard
from models.publish import PublishError
from models.registry import assemble, sha256_hex
from workers.classifier import Classifier
from workers.defense_jobs import _data, _now
from workers.errors import InvalidJob, JobFailure
from workers.generators.advgan import AdvGANSpec, Progress, default_hinge_bound, train_advgan
from workers.generators.registry import network_files
from workers.jobs import Context, _check_cancel, _progress, context, craft, entry
from workers.scores import evaluate, quantize, summarize
from workers.specs import AdvGANParams, DatasetInputs, GeneratorJob

log = logging.getLogger(__name__)
SURROGATE_ARCHITECTURE = "small-cnn"
PROGRESS_EVERY = 10  # generator steps between progress reports (and cancel checks)
TRAIN_SHARE = 0.9  # of the job's progress; the evaluation takes the rest


def run_generator(payload: dict[str, Any]) -> dict[str, Any]:
    """RQ job: train one AdvGAN generator and publish it; returns a summary."""
    def body(spec: GeneratorJob, job: Job | None) -> dict[str, Any]:
        ctx = context()
        return execute_generator(spec, ctx, job, ctx.generators.index.writable)

    return entry(payload, GeneratorJob, body)


def hinge_bound(spec: GeneratorJob, card: ModelCard) -> float:
    """The request's, or the kernel's default for the card's input shape: ``eps`` on a tenth of the
    input's values, in L2 (~2.66 for eps 0.3 on 28x28 images)."""
    if spec.hinge_bound is not None:
        return spec.hinge_bound
    return default_hinge_bound(spec.eps, card.input_shape)


def _target(spec: GeneratorJob, ctx: Context) -> tuple[ModelCard, Classifier]:
    if not NAME_RE.match(spec.output):  # before training, not when the card is written
        raise InvalidJob(f"output: expected a lowercase kebab-case name, got {spec.output!r}")
    card, model = ctx.cache.get(spec.model)
    # What the gateway checked, again: the queue is a trust boundary too.
    if spec.target_class is not None and spec.target_class >= card.num_classes:
        raise JobFailure(f"target_class: expected a class in [0, {card.num_classes - 1}], got "
                         f"{spec.target_class}", "invalid-target")
    if spec.eps > card.bounds[1] - card.bounds[0]:
        raise JobFailure(f"eps: expected at most the bounds' range {card.bounds[1] - card.bounds[0]:g}, "
                         f"got {spec.eps:g}", "invalid-eps")
    if spec.mode == "semi-white-box" and not card.differentiable:
        raise JobFailure(f"mode: expected black-box for {card.ref}, whose gradients are useless",
                         "not-differentiable")
    return card, model


def _surrogate(card: ModelCard, generator: torch.Generator) -> nn.Module:
    """A fresh ``small-cnn`` behind the target card's normalisation, initialised from ``generator``
    without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        body = build(SURROGATE_ARCHITECTURE, card.input_shape, card.num_classes)
    return assemble(card, body)


def measure_generator(model: Classifier, card: ModelCard, generator_card: GeneratorCard, network: nn.Module,
                      evaluation: DatasetInputs, ctx: Context, team: str | None = None) -> dict[str, float]:
    """The card's metrics: the ``advgan`` attack on the held-out slice, through the attack jobs'
    chunk loop and scores. Success is over the inputs classified correctly (targeted: and not
    already of the target class); norms are means over the successful ones."""
    x, y = _data(evaluation, card, ctx, model.device, team)
    batch = ctx.cache.batch_size(card, model)
    clean_pred = model.predict(x, batch).argmax(dim=1)
    targets = (torch.full_like(y, generator_card.target_class)
               if generator_card.target_class is not None else None)
    attack = AdvGANParams(name="advgan", generator=generator_card.ref)
    loaded = {"generator": network, "eps": generator_card.eps, "targeted": generator_card.targeted}
    x_adv, _, _ = craft(model, x, y, attack, batch, torch.Generator(device=model.device), targets,
                        loaded=loaded)
    scores = summarize(evaluate(model, x, y, x_adv, clean_pred, targets, batch), y, clean_pred, True, False)
    quantized = summarize(evaluate(model, x, y, quantize(x_adv, card.bounds), clean_pred, targets, batch),
                          y, clean_pred, True, False)
    model.reset_counters()
    metrics = {"evaluated": float(scores["n"]), "clean_accuracy": scores["clean_accuracy"],
               "robust_accuracy": scores["robust_accuracy"], "success_rate": scores["success_rate"],
               "quantized_success_rate": quantized["success_rate"],
               "linf_mean": scores["perturbation"]["linf"]["mean"],
               "l2_mean": scores["perturbation"]["l2"]["mean"]}
    return {key: round(float(value), 6) for key, value in metrics.items() if value is not None}


def execute_generator(spec: GeneratorJob, ctx: Context, job: Job | None, root: Path) -> dict[str, Any]:
    """Train ``spec`` and publish the generator under ``root`` (the worker's generator registry;
    a scratch directory when ``bench.advgan`` runs this same code)."""
    started = time.perf_counter()
    card, target = _target(spec, ctx)
    device = target.device
    log.info("%s: AdvGAN (%s, eps %g, %s) against %s", spec.job_id, spec.mode, spec.eps,
             f"target class {spec.target_class}" if spec.targeted else "untargeted", card.ref)
    x, y = _data((spec.data, 0, spec.limit), card, ctx, device, spec.team)
    try:
        train_spec = AdvGANSpec(
            eps=spec.eps, targeted=spec.targeted, target=spec.target_class, epochs=spec.epochs,
            batch_size=spec.batch_size, lr=spec.lr, adv_weight=spec.adv_weight, gan_weight=spec.gan_weight,
            hinge_weight=spec.hinge_weight, hinge_bound=hinge_bound(spec, card), kappa=spec.kappa,
            mode=spec.mode, distill_steps=spec.distill_steps, surrogate_lr=spec.surrogate_lr)
    except ValueError as exc:
        raise InvalidJob(str(exc)) from exc
    generator = torch.Generator().manual_seed(spec.seed)
    surrogate = _surrogate(card, generator) if spec.mode == "black-box" else None
    batches = -(-x.shape[0] // spec.batch_size)
    total = spec.epochs * batches
    last: dict[str, Any] = {}

    def on_progress(p: Progress) -> None:
        _check_cancel(job)
        last.update({"phase": "train", "epoch": p.epoch, "epochs": p.epochs, "batch": p.batch,
                     "batches": p.batches, "loss_g": round(p.loss_g, 5), "loss_d": round(p.loss_d, 5),
                     "loss_adv": round(p.loss_adv, 5), "success": round(p.success, 4),
                     "queries": p.queries})
        step = (p.epoch - 1) * p.batches + p.batch
        _progress(job, TRAIN_SHARE * step / total, stage=dict(last))

    _check_cancel(job)
    target.reset_counters()
    result = train_advgan(target, x, y, train_spec, generator=generator, surrogate=surrogate,
                          on_progress=on_progress, every=PROGRESS_EVERY)
    target.reset_counters()
    log.info("%s: trained in %.1fs, %d steps, %d target queries, last epoch success %.3f", spec.job_id,
             result.seconds, result.steps, result.queries, last.get("success", float("nan")))

    _check_cancel(job)
    _progress(job, TRAIN_SHARE, stage={"phase": "evaluate"})
    files = network_files(result.generator, result.discriminator)
    training = {"steps": result.steps, "queries": result.queries, "seconds": round(result.seconds, 3),
                "last": {k: v for k, v in last.items() if k != "phase"}}
    try:
        draft = _draft(spec, card, files, train_spec, training, surrogate is not None, device)
    except ValidationError as exc:
        raise InvalidJob(f"invalid generator card: {exc}") from exc
    metrics = measure_generator(target, card, draft, result.generator, spec.evaluation, ctx, spec.team)
    metrics["training_seconds"] = round(result.seconds, 3)
    if spec.mode == "black-box":
        metrics["queries"] = float(result.queries)
    _check_cancel(job)
    try:
        published = ctx.generators.index.publish(draft.model_copy(update={"metrics": metrics}), files, root)
    except (PublishError, OSError) as exc:
        raise JobFailure(f"could not publish {spec.output}: {exc}", "publish-failed") from exc
    seconds = round(time.perf_counter() - started, 3)
    log.info("%s: published %s in %.1fs: %s", spec.job_id, published.ref, seconds, metrics)
    return {"generator": published.ref, "target_model": card.ref, "mode": spec.mode, "eps": spec.eps,
            "targeted": spec.targeted, "target_class": spec.target_class, "metrics": metrics,
            "lineage": published.lineage.model_dump(mode="json"), "seconds": seconds}


def _draft(spec: GeneratorJob, card: ModelCard, files: dict[str, bytes], train_spec: AdvGANSpec,
           training: dict[str, Any], black_box: bool, device: torch.device) -> GeneratorCard:
    """The card of the trained generator, before its metrics and its version."""
    return GeneratorCard(
        name=spec.output, version=1, team=spec.team, target_model=card.ref, input_shape=card.input_shape,
        bounds=card.bounds, classes=card.classes, eps=spec.eps, targeted=spec.targeted,
        target_class=spec.target_class, mode=spec.mode,
        generator_sha256=sha256_hex(files[GENERATOR_FILE]),
        discriminator_sha256=sha256_hex(files[DISCRIMINATOR_FILE]),
        lineage=Lineage(
            base_model=card.ref, recipe="advgan", data=spec.data, seed=spec.seed, created=_now(),
            parameters={**spec.model_dump(mode="json", exclude={"job_id", "team", "model", "output", "seed"}),
                        "hinge_bound": train_spec.hinge_bound, "training": training,
                        "surrogate": SURROGATE_ARCHITECTURE if black_box else None,
                        "torch": torch.__version__.split("+")[0], "device": str(device)}),
        description=_describe(spec, card))


def _describe(spec: GeneratorJob, card: ModelCard) -> str:
    aim = (f"targeted at class {spec.target_class} ({card.classes[spec.target_class]})"
           if spec.target_class is not None else "untargeted")
    return f"AdvGAN generator, {spec.mode}, Linf eps {spec.eps:g}, {aim}, trained against {card.ref}."
