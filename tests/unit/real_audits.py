"""Audit results from the real pipeline, for the gate, report, JUnit and CLI tests: every one is what
a client receives, none is typed by hand.

An audit here runs as ``POST /v1/audits`` and the workers run it, in process and without Redis: the
gateway's ``check_audit``, chunk jobs (``run_battery`` -> ``_save`` -> blob store), then the merge
job (``_load`` -> ``merge`` -> gate -> ``report.html``), on tiny seeded perceptrons (6x6 inputs, 4
classes) published into a temporary registry with a calibrated feature-squeezing detector. 16
inputs in two chunks of 8. Each audit is computed once per test session (``real_audit`` caches
it), so every test file that reads the same suite and norm shares one run.
"""

from __future__ import annotations

import atexit
import functools
import io
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import workers.jobs
from contracts.gate import eps_key
from models.architectures import build
from models.manifest import DETECTOR_FILE, DetectorCard, Lineage, ModelCard
from models.registry import publish, sha256_hex, weights_bytes
from service.routes.audits import check_audit
from service.settings import Settings
from workers.audit.merge import Chunk
from workers.audit.report import ReportSamples, report_samples
from workers.audit_jobs import _audit_chunk, _audit_merge, _load
from workers.jobs import Context, make_context
from workers.settings import WorkerSettings
from workers.specs import AuditChunkJob, AuditMergeJob, AuditRequest, AuditSpec, InputRef

SHAPE = (1, 6, 6)
CLASSES = ("a", "b", "c", "d")
TEAM = "t"
N = 16
CHUNK = 8
SUITES = ("quick", "standard", "autoattack", "minimal", "custom")
NORMS = ("linf", "l2")
# Each grid ends at a budget that reaches every input of [0, 1]^36 (1 in Linf, 6 in L2), where an
# attack must break everything: the growth check is judged there.
GRIDS = {"linf": [0.02, 0.1, 1.0], "l2": [0.25, 1.0, 6.0]}
# The custom suites: a bounded attack and the minimal ones of that norm, on small budgets.
CUSTOM = {
    "linf": [{"name": "pgd", "norm": "linf", "eps": 0.1, "steps": 3},
             {"name": "deepfool", "norm": "linf", "max_iter": 10, "candidates": 4}],
    "l2": [{"name": "pgd", "norm": "l2", "eps": 1.0, "steps": 3},
           {"name": "deepfool", "norm": "l2", "max_iter": 10, "candidates": 4},
           {"name": "carlini-wagner-l2", "binary_search_steps": 2, "max_iter": 10}],
}
# Models: ``tiny-net``, guarded by a detector; ``tiny-surrogate`` (the same boundaries, logits
# doubled: its examples transfer); ``tiny-saturated`` (the same again, logits x 1e6: cross-entropy
# gradients vanish, as on a distilled network; no detector); ``tiny-rgb`` (3 x 6 x 6 inputs).
MODELS = ("tiny-net", "tiny-surrogate", "tiny-saturated", "tiny-rgb")
RGB = (3, 6, 6)


@dataclass(frozen=True)
class RealAudit:
    """One audit: the request as a client sends it (``thresholds`` included), the merge job's
    result (what ``GET /v1/jobs/{id}`` answers), the chunk jobs' results and the stored report;
    the audit settings the gateway resolved, the chunks as the merge read them back, and the
    sample images the report shows."""

    request: dict[str, Any]
    result: dict[str, Any]
    chunks: list[dict[str, Any]]
    report: str
    spec: AuditSpec
    stored: list[Chunk]
    samples: ReportSamples | None


def _publish(root: Path, name: str, logit_scale: float = 1.0, shape: tuple[int, int, int] = SHAPE) -> ModelCard:
    torch.manual_seed(0)
    body = build("mlp", shape, len(CLASSES))
    with torch.no_grad():
        last = [m for m in body.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.mul_(logit_scale)
        last.bias.mul_(logit_scale)
    data = weights_bytes(body)
    card = ModelCard(name=name, version=1, team=TEAM, architecture="mlp", input_shape=shape,
                     mean=(0.0,) * shape[0], std=(1.0,) * shape[0], classes=CLASSES, sha256=sha256_hex(data),
                     batch_size={"cpu": 16},
                     lineage=Lineage(recipe="test", data="-", seed=0, created="2026-12-04T00:00:00Z"))
    return publish(root, card, data)


@functools.cache
def _context() -> Context:
    var = Path(tempfile.mkdtemp(prefix="real-audits-"))
    atexit.register(shutil.rmtree, var, ignore_errors=True)
    settings = WorkerSettings(var_dir=var, device="cpu")
    net = _publish(settings.models_root, "tiny-net")
    _publish(settings.models_root, "tiny-surrogate", logit_scale=2.0)
    _publish(settings.models_root, "tiny-saturated", logit_scale=1e6)
    _publish(settings.models_root, "tiny-rgb", shape=RGB)
    # A squeezer that rounds to 2 bits; the threshold flags 1 of the 16 clean inputs.
    DetectorCard(model=net.ref, squeezers=(({"name": "bit-depth", "bits": 2},),), threshold=0.02, fpr=0.05,
                 lineage=Lineage(recipe="feature-squeezing", data="-", seed=0, created="-")).write(
        settings.models_root / "tiny-net" / "1" / DETECTOR_FILE)
    return make_context(settings)


def inputs(n: int = N, seed: int = 1, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, *shape)).astype(np.float32)


def own_labels(model: str, x: np.ndarray) -> np.ndarray:
    """The model's clean predictions: every input classified correctly."""
    _, handle = _context().cache.get(f"{model}@1")
    return handle.logits(torch.from_numpy(x)).argmax(1).numpy()


def request_for(suite: str, norm: str, model: str = "tiny-net", **extra: Any) -> dict[str, Any]:
    """The audit body of ``suite`` over ``GRIDS[norm]``, small budgets, with a gate on the 95%
    interval of robust accuracy at the grid's first eps and on clean accuracy."""
    first = eps_key(norm, GRIDS[norm][0])
    body: dict[str, Any] = {"model": model, "norms": [norm], "eps": {norm: GRIDS[norm]}, "seed": 0,
                            "chunk_size": CHUNK, "thresholds": [f"robust_accuracy@{first}.lower >= 0.5",
                                                                "clean_accuracy >= 0.9"]}
    if suite == "custom":
        body["attacks"] = CUSTOM[norm]
    else:
        body["suite"] = suite
    if suite in ("quick", "standard", "autoattack"):
        body["steps"] = 3
    if suite in ("standard", "autoattack"):
        body["square_queries"] = 40
    return {**body, **extra}


def run(request: dict[str, Any], x: np.ndarray, y: np.ndarray | None) -> RealAudit:
    """``request`` on ``x`` (labels ``y``, or None: unlabelled) as the gateway and workers run it."""
    ctx = _context()
    previous, threads = workers.jobs._context, torch.get_num_threads()
    workers.jobs.install_context(ctx)
    torch.set_num_threads(1)  # 8 x 36 inputs: a second thread only adds contention
    try:
        body = AuditRequest.model_validate({"inputs": {"array": "checked elsewhere"}, **request})
        card = ctx.cache.resolve(body.model)
        spec = check_audit(body, card, x.shape[0], y, ctx.cache.index, TEAM, Settings())
        audit_id = uuid.uuid4().hex
        buffer = io.BytesIO()
        np.savez(buffer, **({"x": x} if y is None else {"x": x, "y": y.astype(np.int64)}))  # type: ignore[arg-type]
        ctx.store.put(f"inputs/{audit_id}.npz", buffer.getvalue())
        ref = InputRef(kind="blob", n=x.shape[0], key=f"inputs/{audit_id}.npz", has_labels=y is not None)
        bounds = [*range(0, x.shape[0], body.chunk_size), x.shape[0]]
        chunk_ids, chunks = [], []
        for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            chunk_ids.append(f"{audit_id}c{i}")
            job = AuditChunkJob(job_id=chunk_ids[-1], audit_id=audit_id, team=TEAM, model=card.ref, inputs=ref,
                                start=start, stop=stop, index=i, seed=0, audit=spec)
            chunks.append(_audit_chunk(job, None))
        merge = AuditMergeJob(job_id=audit_id, audit_id=audit_id, team=TEAM, model=card.ref,
                              chunk_ids=chunk_ids, seed=0, audit=spec)
        result = _audit_merge(merge, None)
        report = ctx.store.get(f"jobs/{audit_id}/report.html").decode()
        stored = [_load(ctx.store.get(f"audits/{audit_id}/chunk-{i}.npz")) for i in range(len(chunk_ids))]
    finally:
        workers.jobs._context = previous
        torch.set_num_threads(threads)
    samples = report_samples(stored, result, spec.grids, spec.check_eps, card.bounds)
    return RealAudit(request, result, chunks, report, spec, stored, samples)


@functools.cache
def real_audit(suite: str, norm: str, labelled: bool = True, model: str = "tiny-net",
               per_attack_curves: bool = False) -> RealAudit:
    """The audit of ``suite`` over the ``norm`` grid on 16 inputs, cached for the session.
    ``labelled``: with the model's own predictions as labels (all correct), else without labels.
    The quick Linf audit of tiny-net also transfers from tiny-surrogate."""
    extra: dict[str, Any] = {}
    if per_attack_curves:
        extra["per_attack_curves"] = True
    if (suite, norm, model) == ("quick", "linf", "tiny-net"):
        extra.update(surrogates=["tiny-surrogate"], transfer_eps=0.1)
    x = inputs(shape=RGB if model == "tiny-rgb" else SHAPE)
    return run(request_for(suite, norm, model, **extra), x, own_labels(model, x) if labelled else None)


def near_boundary(model: str = "tiny-net", n: int = N) -> np.ndarray:
    """``n`` inputs within 0.001 (Linf) of ``model``'s decision boundary, each on the side of its
    first input's class: found by bisection between inputs the model classifies differently."""
    _, handle = _context().cache.get(f"{model}@1")
    x = torch.from_numpy(inputs(4 * n, seed=2))
    pred = handle.logits(x).argmax(1)
    first, others = x[pred == pred.mode().values], x[pred != pred.mode().values]
    assert len(first) and len(others), "expected inputs of two classes"
    a, b = first[torch.arange(n) % len(first)], others[torch.arange(n) % len(others)]
    label = handle.logits(a).argmax(1)
    low, high = torch.zeros(n, 1, 1, 1), torch.ones(n, 1, 1, 1)
    for _ in range(20):  # a + t (b - a): the class of a at ``low``, another at ``high``
        middle = (low + high) / 2
        same = (handle.logits(a + middle * (b - a)).argmax(1) == label).view(n, 1, 1, 1)
        low, high = torch.where(same, middle, low), torch.where(same, high, middle)
    return (a + low * (b - a)).numpy().astype(np.float32)


@functools.cache
def weak_audit() -> RealAudit:
    """The quick Linf audit of tiny-net on inputs next to its decision boundary: every one
    classified correctly (labels: its own predictions), almost none robust."""
    x = near_boundary()
    return run(request_for("quick", "linf"), x, own_labels("tiny-net", x))


@functools.cache
def full_audit() -> RealAudit:
    """An audit with every section of a result: a custom suite over both norms (PGD in each, DeepFool
    in each, C&W L2), transfer from tiny-surrogate, the detector (oblivious and adaptive), a gate."""
    attacks = [{"name": "pgd", "norm": "linf", "eps": 0.1, "steps": 3},
               {"name": "pgd", "norm": "l2", "eps": 1.0, "steps": 3}, *CUSTOM["l2"][1:], CUSTOM["linf"][1]]
    request = {**request_for("custom", "linf"), "attacks": attacks, "norms": list(NORMS), "eps": GRIDS,
               "surrogates": ["tiny-surrogate"], "transfer_eps": 0.1,
               "thresholds": ["clean_accuracy >= 0.9", "robust_accuracy@linf:0.1 >= 0.4",
                              "masking_checks == pass"]}
    x = inputs()
    return run(request, x, own_labels("tiny-net", x))


# The gate lines of the audits in the web pages' history: one that passes, one that fails.
HISTORY_GATES = {"pass": "robust_accuracy@linf:0.1 >= 0.1", "fail": "robust_accuracy@linf:0.1 >= 0.9"}


@functools.cache
def history_audit(seed: int, verdict: str | None) -> RealAudit:
    """The quick audit of tiny-net over the default Linf grid (1/255 ... 0.3) on 16 inputs drawn with
    ``seed`` (labels: its own predictions), with a gate that passes, fails, or none (``verdict``
    None): what the web pages' history shows."""
    thresholds = [HISTORY_GATES[verdict]] if verdict is not None else []
    request = {"model": "tiny-net", "suite": "quick", "norms": ["linf"], "seed": 0, "chunk_size": CHUNK,
               "steps": 3, "thresholds": thresholds}
    x = inputs(seed=seed)
    return run(request, x, own_labels("tiny-net", x))
