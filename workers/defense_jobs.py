"""RQ entry point of defense jobs: train or compose a new registry model, or calibrate a detector.

Orchestration only (the tensor work lives in ``workers/defenses``): validate the payload, load
the base model and the data, run the recipe with progress and cancel checks, measure the result,
and publish it. Publishing is the last step and is atomic (``VersionedIndex.publish``: a staging
directory renamed into place, or the card put last in the S3 store): a job killed or canceled at
any point leaves no registry entry behind.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from pathlib import Path
from typing import Any

import torch
from rq.job import Job
from torch import nn

from models.architectures import build
from models.manifest import (
    ONNX_ARCHITECTURE,
    ONNX_FILE,
    WEIGHTS_FILE,
    Composition,
    DetectorCard,
    Lineage,
    ModelCard,
    RobustnessEvaluation,
)
from models.publish import PublishError
from models.registry import (
    assemble,
    build_body,
    load_module,
    sha256_hex,
    trainable_body,
    weights_bytes,
)
from workers.attacks.base import goal_reached
from workers.audit.card_eval import evaluate_card
from workers.classifier import Classifier
from workers.defenses.compose import build_composite
from workers.defenses.preprocess import bpda
from workers.defenses.squeeze import calibrate_threshold, detection_rate, squeeze_scores
from workers.defenses.training import Progress, TrainSpec, accuracy, soft_labels, train
from workers.errors import JobFailure
from workers.jobs import Context, _check_cancel, _progress, context, craft, entry, load_dataset
from workers.specs import (
    NON_DIFFERENTIABLE_STEPS,
    CarliniWagnerL2Params,
    DatasetInputs,
    DeepFoolParams,
    DefenseJob,
    DistillationParams,
    EnsembleParams,
    Evaluation,
    FeatureSqueezingParams,
    FGSMParams,
    FGSMTrainingParams,
    PGDParams,
    PGDTrainingParams,
    PreprocessingParams,
)

log = logging.getLogger(__name__)


def run_defense(payload: dict[str, Any]) -> dict[str, Any]:
    """RQ job: run one defense and publish its model (or detector); returns a summary."""
    def body(spec: DefenseJob, job: Job | None) -> dict[str, Any]:
        ctx = context()
        return execute_defense(spec, ctx, job, ctx.cache.index.writable)

    return entry(payload, DefenseJob, body)


def execute_defense(spec: DefenseJob, ctx: Context, job: Job | None, root: Path) -> dict[str, Any]:
    """Run ``spec`` and publish under ``root`` (the worker's registry, ``ctx.cache.index.writable``:
    its var dir, or the S3 store's copy, which publishes to the store; the hosted directory when
    ``make models`` builds the hosted defenses through this same code)."""
    started = time.perf_counter()
    defense = spec.defense
    log.info("%s: %s on %s", spec.job_id, defense.name, spec.model or "-")
    if isinstance(defense, FeatureSqueezingParams):
        result = _feature_squeezing(spec, defense, ctx, job, root)
    elif isinstance(defense, FGSMTrainingParams | PGDTrainingParams | DistillationParams):
        result = _training(spec, defense, ctx, job, root)
    else:
        result = _composition(spec, defense, ctx, job, root)
    result["seconds"] = round(time.perf_counter() - started, 3)
    log.info("%s: done in %.1fs", spec.job_id, result["seconds"])
    return result


# --- shared ----------------------------------------------------------------------------------


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _base(spec: DefenseJob, ctx: Context) -> tuple[ModelCard, Classifier]:
    assert spec.model is not None
    return ctx.cache.get(spec.model)


def _data(inputs: DatasetInputs | tuple[str, int, int | None], card: ModelCard, ctx: Context,
          device: torch.device, team: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A data-set slice (``limit`` None: to the end) as tensors on ``device``, in the model's bounds,
    checked against the model's inputs again (``workers.jobs.load_dataset``)."""
    limit: int | None
    if isinstance(inputs, DatasetInputs):
        name, offset, limit = inputs.dataset, inputs.offset, inputs.limit
    else:
        name, offset, limit = inputs
    x, y = load_dataset(ctx.data, name, offset, limit, team, card, field="data")
    if x.shape[0] == 0:
        raise JobFailure(f"data: expected samples in {name} from offset {offset}, got none", "invalid-data")
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


def measure(model: Classifier, card: ModelCard, evaluation: Evaluation, ctx: Context, seed: int,
            job: Job | None = None, team: str | None = None) -> dict[str, Any]:
    """The card's ``metrics`` and ``robustness``: clean accuracy on the test data, and robust
    accuracy (Linf) under APGD-CE then APGD-T on its survivors (``workers.audit.card_eval``: PGD
    on the cross-entropy let a saturated softmax pass for robust), with the evaluation named.

    For a model whose gradients are useless (bit depth, JPEG), the figure with plain gradients
    is reported next to the one with BPDA (straight-through gradients), which is the honest one.
    """
    device = model.device
    x, y = _data((evaluation.data, 0, evaluation.clean_limit), card, ctx, device, team)
    metrics = {"clean_accuracy": round(accuracy(model.module, x, y, 500), 4)}
    n = min(evaluation.robust_limit, x.shape[0])
    if n == 0:
        return {"metrics": metrics}
    _check_cancel(job)
    batch = ctx.cache.batch_size(card, model)

    def cascade() -> tuple[dict[str, float], RobustnessEvaluation]:
        return evaluate_card(model, x[:n], y[:n], evaluation.data, (evaluation.eps,), steps=evaluation.steps,
                             batch=batch, seed=seed)

    robust, robustness = cascade()
    if not card.differentiable:
        metrics.update({key.replace("robust", "plain_gradient_robust"): v for key, v in robust.items()})
        with bpda(model.module):
            robust, robustness = cascade()
        robustness = robustness.model_copy(update={"bpda": True})
    model.reset_counters()
    return {"metrics": {**metrics, **robust}, "robustness": robustness}


def _output_card(spec: DefenseJob, base: ModelCard, **fields: Any) -> ModelCard:
    assert spec.output is not None
    values: dict[str, Any] = {
        "name": spec.output, "version": 1, "team": spec.team, "architecture": base.architecture,
        "input_shape": base.input_shape, "bounds": base.bounds, "mean": base.mean, "std": base.std,
        "classes": base.classes, "sha256": base.sha256, "composition": None,
    }
    values.update(fields)
    return ModelCard.model_validate(values)


def _publish(spec: DefenseJob, ctx: Context, root: Path, card: ModelCard, files: dict[str, bytes]) -> ModelCard:
    """The last step of a job: after it, the model exists; before it, nothing of it does.
    ``files``: file name -> bytes, each checked against the digest the card gives it."""
    digests = {**card.files, **({card.weights_file: card.sha256} if card.sha256 else {})}
    if set(files) != set(digests) or any(sha256_hex(data) != digests[name] for name, data in files.items()):
        raise JobFailure(f"{card.name}: expected files {sorted(digests)} matching the card's sha256, "
                         f"got {sorted(files)}", "publish-failed")
    try:
        return ctx.cache.index.publish(card, files, root)
    except PublishError as exc:
        raise JobFailure(str(exc), "publish-failed") from exc


def _summary(card: ModelCard) -> dict[str, Any]:
    return {"model": card.ref, "metrics": card.metrics, "lineage": card.lineage.model_dump(),
            "composition": card.composition.model_dump() if card.composition else None}


# --- training defenses -----------------------------------------------------------------------


def _training(spec: DefenseJob, defense: FGSMTrainingParams | PGDTrainingParams | DistillationParams,
              ctx: Context, job: Job | None, root: Path) -> dict[str, Any]:
    base_card, base = _base(spec, ctx)
    if base_card.composition is not None:
        raise JobFailure(f"model: expected a model with weights to train, got the "
                         f"{base_card.composition.kind} composition {base_card.ref}", "not-trainable")
    device = base.device
    x, y = _data((defense.data, 0, defense.limit), base_card, ctx, device, spec.team)
    generator = torch.Generator().manual_seed(spec.seed)

    directory = ctx.cache.index.directory(base_card.name, base_card.version)
    assert directory is not None
    onnx = base_card.architecture == ONNX_ARCHITECTURE

    def fresh() -> tuple[nn.Module, nn.Module]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            if onnx:  # an uploaded graph: its converted module is the architecture
                body = build_body(base_card, directory)
                if defense.init == "scratch":
                    for part in body.modules():
                        reset = getattr(part, "reset_parameters", None)
                        if callable(reset):
                            reset()
            else:
                body = build(base_card.architecture, base_card.input_shape, base_card.num_classes)
        if defense.init == "base" and not onnx:
            _, loaded = load_module(directory)
            body.load_state_dict(loaded.get_submodule("1").state_dict())
        module = assemble(base_card, body).to(device)
        module.requires_grad_(True)
        return body, module

    common = TrainSpec(epochs=defense.epochs, batch_size=defense.batch_size, lr=defense.lr)
    phases: list[tuple[str, TrainSpec]] = []
    if isinstance(defense, FGSMTrainingParams):
        phases.append(("train", dataclasses.replace(common, objective="fgsm", alpha=defense.alpha,
                                                    eps=defense.eps)))
    elif isinstance(defense, PGDTrainingParams):
        phases.append(("train", dataclasses.replace(common, objective="pgd", eps=defense.eps,
                                                    pgd_steps=defense.steps,
                                                    pgd_step_size=defense.step_size)))
    else:
        phases.append(("teacher", dataclasses.replace(common, epochs=defense.teacher_epochs or defense.epochs,
                                                      temperature=defense.temperature)))
        phases.append(("student", dataclasses.replace(common, temperature=defense.temperature)))

    total_steps = sum(p.epochs * (x.shape[0] // p.batch_size) for _, p in phases)
    done_steps = 0
    reports = {}
    targets: torch.Tensor = y
    body, module = fresh()
    for phase, train_spec in phases:
        if phase == "student":
            targets = soft_labels(module, x, train_spec.temperature)
            body, module = fresh()

        def on_progress(p: Progress, phase: str = phase, before: int = done_steps) -> None:
            _check_cancel(job)
            step = before + (p.epoch - 1) * p.batches + p.batch
            _progress(job, 0.95 * step / max(total_steps, 1), stage={
                "phase": phase, "epoch": p.epoch, "epochs": p.epochs, "batch": p.batch,
                "batches": p.batches, "loss": round(p.loss, 5), "accuracy": round(p.accuracy, 4)})

        report = train(module, x, targets, train_spec, bounds=base_card.bounds, generator=generator,
                       on_progress=on_progress)
        done_steps += train_spec.epochs * (x.shape[0] // train_spec.batch_size)
        reports[phase] = dataclasses.asdict(report)
        log.info("%s: %s finished: loss %.4f, train accuracy %.4f", spec.job_id, phase,
                 report.final_loss, report.final_train_accuracy)

    module.eval()
    module.requires_grad_(False)
    _check_cancel(job)
    _progress(job, 0.96, stage={"phase": "evaluate"})
    weights = weights_bytes(trainable_body(body))
    if onnx:  # the same graph with new weights
        files = {ONNX_FILE: (directory / ONNX_FILE).read_bytes(), WEIGHTS_FILE: weights}
        kept = {"sha256": base_card.sha256, "files": {WEIGHTS_FILE: sha256_hex(weights)},
                "static_batch": base_card.static_batch}
    else:
        files, kept = {WEIGHTS_FILE: weights}, {"sha256": sha256_hex(weights)}
    draft = _output_card(spec, base_card, **kept, batch_size=base_card.batch_size, lineage=Lineage(
        base_model=base_card.ref, recipe=defense.name, data=defense.data, seed=spec.seed,
        parameters={**defense.model_dump(exclude={"name"}), "training": reports,
                    "evaluation": spec.evaluation.model_dump(),
                    "torch": torch.__version__.split("+")[0], "device": str(device)},
        created=_now()), description=_describe(defense, base_card))
    handle = Classifier(module, draft.num_classes, draft.input_shape, draft.bounds, spec.output or "")
    draft = draft.model_copy(update=measure(handle, draft, spec.evaluation, ctx, spec.seed, job, spec.team))
    _check_cancel(job)
    card = _publish(spec, ctx, root, draft, files)
    return _summary(card)


def _describe(defense: Any, base: ModelCard) -> str:
    if isinstance(defense, FGSMTrainingParams):
        return (f"{base.architecture} adversarially trained with the FGSM objective (alpha "
                f"{defense.alpha:g}, eps {defense.eps:g}), base {base.ref}.")
    if isinstance(defense, PGDTrainingParams):
        return (f"{base.architecture} adversarially trained on PGD-{defense.steps} (Linf eps "
                f"{defense.eps:g}), base {base.ref}.")
    if isinstance(defense, DistillationParams):
        return (f"{base.architecture} defensively distilled at T={defense.temperature:g} "
                f"(deployed at T=1), base {base.ref}.")
    if isinstance(defense, PreprocessingParams):
        return f"{base.ref} behind " + " -> ".join(step.name for step in defense.steps) + "."
    return f"{defense.combine} ensemble of " + ", ".join(defense.members) + "."


# --- compositions ----------------------------------------------------------------------------


def _composition(spec: DefenseJob, defense: PreprocessingParams | EnsembleParams, ctx: Context,
                 job: Job | None, root: Path) -> dict[str, Any]:
    if isinstance(defense, PreprocessingParams):
        base_card, base = _base(spec, ctx)
        parts = [base_card]
        steps = tuple(step.model_dump() for step in defense.steps)
        composition = Composition(
            kind="preprocessing", base=base_card.ref, steps=steps,
            differentiable=base_card.differentiable and not any(
                step.name in NON_DIFFERENTIABLE_STEPS for step in defense.steps))
        modules = [base.module]
    else:
        parts, modules = [], []
        for ref in defense.members:
            card, handle = ctx.cache.get(ref)
            parts.append(card)
            modules.append(handle.module)
        for card in parts[1:]:
            for what in ("input_shape", "bounds", "classes"):
                if getattr(card, what) != getattr(parts[0], what):
                    raise JobFailure(f"defense.members: expected the same {what} as {parts[0].ref}, "
                                     f"got {getattr(card, what)} for {card.ref}", "incompatible-model")
        base_card = parts[0]
        composition = Composition(
            kind="ensemble", members=tuple(c.ref for c in parts), combine=defense.combine,
            differentiable=defense.combine == "mean-probabilities" and all(c.differentiable for c in parts))
    draft = _output_card(spec, base_card, architecture=composition.kind, sha256=None,
                         composition=composition, lineage=Lineage(
                             base_model=base_card.ref, recipe=defense.name, data=base_card.lineage.data,
                             seed=spec.seed,
                             parameters={**defense.model_dump(exclude={"name"}),
                                         "evaluation": spec.evaluation.model_dump()},
                             created=_now()), description=_describe(defense, base_card))
    module = build_composite(draft, modules)
    handle = Classifier(module, draft.num_classes, draft.input_shape, draft.bounds, spec.output or "",
                        differentiable=draft.differentiable)
    _progress(job, 0.5, stage={"phase": "evaluate"})
    draft = draft.model_copy(update=measure(handle, draft, spec.evaluation, ctx, spec.seed, job, spec.team))
    _check_cancel(job)
    card = _publish(spec, ctx, root, draft, {})
    return _summary(card)


# --- detectors -------------------------------------------------------------------------------


DETECTION_SPECS: dict[str, Any] = {
    "fgsm": lambda eps: FGSMParams(name="fgsm", eps=eps),
    "pgd": lambda eps: PGDParams(name="pgd", eps=eps, steps=20),
    "deepfool": lambda eps: DeepFoolParams(name="deepfool"),
    "carlini-wagner-l2": lambda eps: CarliniWagnerL2Params(name="carlini-wagner-l2",
                                                           binary_search_steps=5, max_iter=100),
}


def _feature_squeezing(spec: DefenseJob, defense: FeatureSqueezingParams, ctx: Context,
                       job: Job | None, root: Path) -> dict[str, Any]:
    """Calibrate the threshold on clean data, then measure the false-positive rate on other clean
    data and the detection rate of each attack's successful adversarial examples."""
    card, model = _base(spec, ctx)
    device = model.device
    squeezers = [[step.model_dump() for step in squeezer] for squeezer in defense.squeezers]
    for squeezer in defense.squeezers:
        for step in squeezer:
            size = getattr(step, "size", None) or getattr(step, "kernel_size", None) or 1
            if size > min(card.input_shape[1:]):
                raise JobFailure(f"defense.squeezers: expected windows at most the input size "
                                 f"{list(card.input_shape[1:])}, got {size}", "incompatible-model")
    x_cal, _ = _data(defense.calibration, card, ctx, device, spec.team)
    _progress(job, 0.05, stage={"phase": "calibrate"})
    threshold = calibrate_threshold(squeeze_scores(model.module, x_cal, squeezers, card.bounds), defense.fpr)
    x_held, _ = _data(defense.held_out, card, ctx, device, spec.team)
    held_scores = squeeze_scores(model.module, x_held, squeezers, card.bounds)
    metrics: dict[str, float] = {
        "false_positive_rate": round(detection_rate(held_scores, threshold), 4),
        "held_out_n": float(x_held.shape[0]),
    }
    x, y = _data(defense.attack_inputs, card, ctx, device, spec.team)
    batch = ctx.cache.batch_size(card, model)
    correct = model.predict(x, batch).argmax(1) == y
    attacks: dict[str, Any] = {}
    for i, name in enumerate(defense.attacks):
        _check_cancel(job)
        _progress(job, 0.1 + 0.85 * i / len(defense.attacks), stage={"phase": "detect", "attack": name})
        generator = torch.Generator(device=device).manual_seed(spec.seed)
        x_adv, _, _ = craft(model, x, y, DETECTION_SPECS[name](defense.eps), batch, generator)
        logits, adv_scores = model.predict(x_adv, batch), squeeze_scores(model.module, x_adv, squeezers,
                                                                          card.bounds)
        fooled = goal_reached(logits, y, None, False) & correct
        flagged = adv_scores > threshold
        n_fooled = int(fooled.sum())
        rate = float((flagged & fooled).sum()) / n_fooled if n_fooled else None
        stopped = (flagged | ~fooled) & correct
        attacks[name] = {
            "success_rate": round(n_fooled / max(int(correct.sum()), 1), 4),
            "detection_rate": None if rate is None else round(rate, 4),
            "successful": n_fooled,
            "detect_and_reject_robust_accuracy": round(float(stopped.sum()) / x.shape[0], 4),
        }
        if rate is not None:
            metrics[f"detection_rate@{name}"] = round(rate, 4)
        log.info("%s: %s: %d successful, detection rate %s", spec.job_id, name, n_fooled, rate)
    model.reset_counters()
    detector = DetectorCard(
        model=card.ref, team=spec.team, squeezers=tuple(tuple(s) for s in squeezers),
        threshold=threshold, fpr=defense.fpr, metrics=metrics,
        lineage=Lineage(base_model=card.ref, recipe="feature-squeezing", data=defense.calibration.dataset,
                        seed=spec.seed, parameters={**defense.model_dump(mode="json", exclude={"name"}),
                                                    "attacks_detail": attacks}, created=_now()))
    _check_cancel(job)
    ctx.cache.index.write_detector(card, detector, root)
    return {"model": card.ref, "detector": detector.model_dump(mode="json"), "attacks": attacks}
