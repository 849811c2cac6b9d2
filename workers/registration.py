"""RQ entry point of model registration: validate an uploaded model, measure it, publish it.

The gateway has checked what it can without torch (the card, the file's format, ONNX operators,
the safetensors layout) and staged the file in the blob store. Here the worker loads it within
limits, runs a probe batch and checks what only running it can show: output shape
``(N, len(classes))``, finite logits, determinism (two forward passes equal), usable input
gradients (else the card says ``gradients: false`` and audits use black-box attacks). It then
measures forward and forward+backward throughput to choose the chunk size jobs will use, and
only then publishes the version atomically (``VersionedIndex.publish``: a staging directory
renamed into place, or, with the S3 store, the files then the card as the commit marker). A
failed check publishes nothing, and the job's error says which check failed and why.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from rq.job import Job
from torch import nn

from models.manifest import (
    ONNX_ARCHITECTURE,
    ONNX_FILE,
    WEIGHTS_FILE,
    Lineage,
    ModelCard,
    Registration,
    RegistrationJob,
    Throughput,
)
from models.publish import PublishError
from models.registry import ModelLoadError, assemble, build_body
from workers.classifier import Classifier
from workers.errors import JobFailure
from workers.jobs import _check_cancel, _progress, context, entry

log = logging.getLogger(__name__)
PROBE_BATCH = 3
# Chunk sizes tried for throughput, smallest first. The sweep stops once two sizes in a row are
# clearly slower than the best so far, or once one pass takes longer than PASS_LIMIT_S.
CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
PASS_LIMIT_S = 4.0
MIN_TIMED_S = 0.5
MIN_PASSES = 3
SLOWER = 0.9  # a size at under 90% of the best rate counts as clearly slower


def run_registration(payload: dict[str, Any]) -> dict[str, Any]:
    """RQ job: validate, measure and publish one uploaded model version."""
    return entry(payload, RegistrationJob, _register)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _stage(job: Job | None, value: float, stage: str) -> None:
    _check_cancel(job)
    _progress(job, value, stage={"step": stage})


def _register(spec: RegistrationJob, job: Job | None) -> dict[str, Any]:
    started = time.perf_counter()
    ctx = context()
    device = ctx.cache.device
    upload = spec.upload
    try:
        _stage(job, 0.05, "load")
        data = ctx.store.get(spec.file)
        if spec.parameters > ctx.settings.max_parameters:
            raise JobFailure(f"parameters: expected at most {ctx.settings.max_parameters}, got "
                             f"{spec.parameters}", "too-large")
        card = _draft(spec)
        body = _load(spec, card, data)
        parameters = sum(p.numel() for p in body.parameters())
        if parameters > ctx.settings.max_parameters:
            raise JobFailure(f"parameters: expected at most {ctx.settings.max_parameters}, got "
                             f"{parameters}", "too-large")
        module = assemble(card, body).to(device).eval()
        module.requires_grad_(False)
        model = Classifier(module, card.num_classes, card.input_shape, card.bounds, upload.name)

        _stage(job, 0.2, "probe")
        checks, gradients = probe(model, spec.static_batch)
        _stage(job, 0.4, "throughput")
        rows, best = throughput(model, spec.static_batch, lambda: _check_cancel(job))
        checks["throughput"] = (f"chunk size {best.batch_size}: {best.forward_backward:.1f} images/s "
                                f"forward+backward, {best.forward:.1f} forward on {best.device}")
        _stage(job, 0.9, "publish")
        card = card.model_copy(update={
            "gradients": gradients,
            "batch_size": {device.type: best.batch_size},
            "registration": Registration(
                format=spec.format, files={_file_name(spec): spec.sha256}, bytes=spec.bytes,
                parameters=parameters, opset=spec.opset, throughput=rows, checks=checks,
                created=_now(), job=spec.job_id),
        })
        try:  # into the worker's registry: its var dir, or the S3 store every machine shares
            card = ctx.cache.index.publish(card, {_file_name(spec): data})
        except PublishError as exc:
            raise JobFailure(str(exc), "publish-failed") from exc
    finally:
        ctx.store.delete_prefix(spec.file.rsplit("/", 1)[0])
    log.info("%s: published %s (%s, %d parameters, chunk %d) in %.1fs", spec.job_id, card.ref,
             spec.format, parameters, best.batch_size, time.perf_counter() - started)
    return {"model": card.ref, "card": card.model_dump(mode="json"),
            "seconds": round(time.perf_counter() - started, 3)}


def _file_name(spec: RegistrationJob) -> str:
    return ONNX_FILE if spec.format == "onnx" else WEIGHTS_FILE


def _draft(spec: RegistrationJob) -> ModelCard:
    upload = spec.upload
    mean, std = upload.mean_std()
    architecture = ONNX_ARCHITECTURE if spec.format == "onnx" else upload.architecture
    return ModelCard(
        name=upload.name, version=1, team=spec.team, architecture=architecture or "",
        input_shape=upload.input_shape, bounds=upload.bounds, mean=mean, std=std,
        classes=upload.classes, sha256=spec.sha256, static_batch=spec.static_batch,
        lineage=Lineage(recipe="upload", data="-", seed=0, created=_now(),
                        parameters={"format": spec.format}),
        description=upload.description)


def _load(spec: RegistrationJob, card: ModelCard, data: bytes) -> nn.Module:
    """The body from the staged bytes (through the registry's own loader, so what is checked here
    is what every later job loads)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="adversa-register-") as tmp:
        (Path(tmp) / _file_name(spec)).write_bytes(data)
        try:
            return build_body(card, Path(tmp))
        except ModelLoadError as exc:
            code = "unsupported-operator" if "operator" in str(exc) else "invalid-weights"
            raise JobFailure(f"{spec.format}: {_strip_ref(str(exc), card)}", code) from exc
        except (ValueError, KeyError) as exc:
            raise JobFailure(f"architecture: {exc}", "invalid-architecture") from exc


def _strip_ref(message: str, card: ModelCard) -> str:
    return message.removeprefix(f"{card.ref}: ")


def probe(model: Classifier, static_batch: int | None) -> tuple[dict[str, str], bool]:
    """Run the checks; raise ``JobFailure`` naming the first that fails. Returns what each check
    measured and whether input gradients are usable."""
    n = static_batch or PROBE_BATCH
    low, high = model.bounds
    generator = torch.Generator().manual_seed(0)
    x = (low + (high - low) * torch.rand(n, *model.input_shape, generator=generator)).to(model.device)
    try:
        first = model.logits(x)
        second = model.logits(x)
    except Exception as exc:  # a stranger's graph: any failure is the check's answer
        raise JobFailure(f"probe: a forward pass on a batch of {n} inputs of shape "
                         f"{list(model.input_shape)} failed: {type(exc).__name__}: {exc}",
                         "probe-failed") from exc
    checks: dict[str, str] = {}
    if tuple(first.shape) != (n, model.num_classes):
        raise JobFailure(f"output shape: expected ({n}, {model.num_classes}) logits (one per class "
                         f"of the card), got {tuple(first.shape)}", "output-shape")
    checks["output_shape"] = f"({n}, {model.num_classes})"
    if not torch.isfinite(first).all():
        bad = int((~torch.isfinite(first)).any(dim=1).sum())
        raise JobFailure(f"finite logits: expected finite logits, got NaN or infinity for {bad} of {n} "
                         "probe inputs", "non-finite-logits")
    checks["finite"] = "all logits finite"
    if not torch.equal(first, second):
        diff = float((first - second).abs().max())
        raise JobFailure(f"determinism: expected two forward passes on the same inputs to agree, "
                         f"they differ by up to {diff:.3g} (dropout or randomness left in the graph?)",
                         "nondeterministic")
    checks["deterministic"] = "two forward passes equal"
    if n > 1:
        single = model.logits(x[:1])
        if not torch.allclose(single, first[:1], rtol=1e-4, atol=1e-4):
            raise JobFailure("batch independence: expected the logits of an input not to depend on the "
                             "rest of its batch (batch norm in training mode?)", "batch-dependent")
    pred = first.argmax(dim=1)
    try:
        _, grad = model.value_and_grad(x, lambda logits: logits.gather(1, pred[:, None]).sum())
    except Exception as exc:
        checks["gradients"] = f"none: {type(exc).__name__}: {exc}"
        return checks, False
    usable = bool(torch.isfinite(grad).all()) and bool((grad != 0).any(dim=tuple(range(1, grad.ndim))).all())
    checks["gradients"] = ("non-zero input gradients" if usable else
                           "zero or non-finite input gradients: audits use black-box attacks")
    model.reset_counters()
    return checks, usable


@dataclass
class _Rate:
    forward: float
    forward_backward: float


def _rate(model: Classifier, size: int) -> tuple[_Rate, float]:
    """Images/s forward and forward+backward at ``size``, and the seconds one pass took.

    Each rate is the best of several timed passes (at least ``MIN_PASSES`` and ``MIN_TIMED_S``):
    another process on the machine can only slow a pass down, so the fastest pass is the
    model's own speed, and the choice does not follow the machine's load."""
    low, high = model.bounds
    x = low + (high - low) * torch.rand(size, *model.input_shape, device=model.device)

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return logits.logsumexp(dim=1).sum()

    def fastest(fn: Any) -> float:
        fn()  # warm-up
        _sync(model.device)
        passes: list[float] = []
        while len(passes) < MIN_PASSES or sum(passes) < MIN_TIMED_S:
            start = time.perf_counter()
            fn()
            _sync(model.device)
            passes.append(time.perf_counter() - start)
            if passes[-1] > PASS_LIMIT_S or len(passes) >= 50:
                break
        return min(passes)

    forward = fastest(lambda: model.logits(x))
    forward_backward = fastest(lambda: model.value_and_grad(x, loss))
    return _Rate(size / forward, size / forward_backward), forward_backward


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(model: Classifier, static_batch: int | None, check: Any = None
               ) -> tuple[list[Throughput], Throughput]:
    """Sweep chunk sizes (forward+backward is what attacks spend) and pick the fastest; a graph
    with a fixed batch size is measured at that size only (other sizes are padded or split)."""
    sizes = (static_batch,) if static_batch else CANDIDATES
    rows: list[Throughput] = []
    best: Throughput | None = None
    worse = 0
    for size in sizes:
        try:
            rate, seconds = _rate(model, size)
        except torch.OutOfMemoryError:
            break
        row = Throughput(device=str(model.device), batch_size=size, forward=round(rate.forward, 2),
                         forward_backward=round(rate.forward_backward, 2))
        rows.append(row)
        if best is None or row.forward_backward > best.forward_backward * 1.03:
            best, worse = row, 0
        elif row.forward_backward < best.forward_backward * SLOWER:
            worse += 1
        if check is not None:
            check()
        if worse >= 2 or seconds > PASS_LIMIT_S:
            break
    model.reset_counters()
    assert best is not None
    return rows, best
