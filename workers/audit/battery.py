"""The audit battery on one chunk of samples: every attack of a suite over an eps grid, the worst
case per sample, minimal perturbations, and the evidence for the gradient-masking checks.

Plain batched torch (no Redis, no HTTP): ``run_battery(model, x, y, plan, generator=...)`` returns
per-sample arrays and counters (numpy) that the audit jobs store per chunk and merge.

How the grid is attacked. Each bounded attack runs independently (its own robust-accuracy curve),
over the eps grid in increasing order; an example found at a smaller eps lies inside every larger
ball, so at the next eps the attack only runs on the samples it has not broken yet. The worst case
of a sample at an eps is the first successful example of any attack. This is the cascade of
AutoAttack (Croce & Hein 2020) per attack, with the evaluation checklist of Carlini et al. ("On
Evaluating Adversarial Robustness", 2019) as the masking checks:

- single step (FGSM, always run as a probe) must not beat the iterative attacks;
- success must approach 100% as eps grows, and an unbounded attack (Linf, the whole input range,
  no random start: a random start alone turns images into noise) must reach it;
- black-box attacks must not break samples that every white-box attack failed on;
- more steps and restarts must not change the result much, with the cross-entropy and then with
  a loss that a saturated softmax cannot flatten (the logit margin, see ``MarginClassifier``);
- gradients must not be zero or vanishingly small;
- the forward pass must be deterministic (else expectation over transformation, EOT, is used).

With a calibrated detector (feature squeezing), the worst-case examples are scored by it
(detect-and-reject under *oblivious* attacks), then ``squeeze_adaptive`` attacks model and detector
jointly (*adaptive*: Carlini & Wagner 2017, Tramer et al. 2020) on the samples that the suite
misclassified only with examples the detector flags, ``adaptive_evasions``.

Models with non-differentiable steps (``Classifier.differentiable`` false) are attacked through
BPDA (straight-through gradients, Athalye et al. 2018) in every white-box stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from contracts.attacks import ATTACKS
from contracts.gate import eps_key
from workers.attacks.base import AttackOutput, flat_norm, project
from workers.attacks.catalog import KERNELS
from workers.attacks.pgd import PGDSpec
from workers.attacks.squeeze_adaptive import SqueezeAdaptiveSpec, squeeze_adaptive
from workers.audit.merge import Chunk
from workers.classifier import Classifier
from workers.defenses.preprocess import bpda
from workers.defenses.squeeze import squeeze_scores


@dataclass(frozen=True)
class Stage:
    """One attack of the battery: ``name`` as in the HTTP API, its kernel spec (``eps`` is replaced
    per grid point for bounded attacks). ``key`` names its results where one kernel runs twice
    (``"deepfool-linf"`` beside ``"deepfool"``); None: ``name``."""

    name: str
    spec: Any
    norm: str
    bounded: bool = True
    key: str | None = None

    @property
    def white_box(self) -> bool:
        return not ATTACKS[self.name].black_box

    @property
    def single_step(self) -> bool:
        """The probe: compared with the iterative attacks, never part of the cascade."""
        return ATTACKS[self.name].single_step

    @property
    def result_key(self) -> str:
        return self.key or self.name


@dataclass(frozen=True)
class Detector:
    """A calibrated feature-squeezing detector (``DetectorCard``). Its figures come from two
    attacks: the suite's worst case per sample (*oblivious*: the attacks do not know the detector)
    and ``squeeze_adaptive`` with ``adaptive_steps`` steps per eps (*adaptive*: it attacks model
    and detector jointly)."""

    squeezers: tuple[tuple[Mapping[str, Any], ...], ...]
    threshold: float
    adaptive_steps: int = 50


@dataclass(frozen=True)
class AuditPlan:
    """What to run: bounded ``stages`` per norm over ``grids[norm]`` (increasing), eps-free
    ``minimal`` stages, and the checks' settings.

    ``cascade``: AutoAttack's evaluation. At each eps every stage but the single-step probe runs
    only on the samples that the earlier stages (in suite order, and every stage at the smaller
    eps) left standing, so a stage's curve is the robust accuracy after it and the stages before
    it (what AutoAttack logs after each attack), the last stage's is the worst case, and the time
    goes to the samples that resist. The probe still runs on every sample: the single-step check
    compares it with the iterative attacks. Without ``cascade`` each stage has its own curve."""

    grids: Mapping[str, tuple[float, ...]]
    stages: Mapping[str, tuple[Stage, ...]]
    minimal: tuple[Stage, ...] = ()
    check_eps: Mapping[str, float] = field(default_factory=dict)
    more_steps_factor: int = 5
    more_restarts: int = 3
    unbounded_steps: int = 50
    eot_samples: int = 8
    detector: Detector | None = None
    surrogates: tuple[Classifier, ...] = ()
    transfer_eps: float | None = None
    keep_images: int = 8
    batch_size: int = 128
    cascade: bool = False


# --- helpers ---------------------------------------------------------------------------------


class EOTClassifier(Classifier):
    """Expectation over transformation: gradients (and logits) averaged over ``samples`` passes of
    a randomized model, so that white-box attacks follow the expected loss."""

    samples: int = 8

    def value_and_grad(self, x: torch.Tensor, loss: Callable[[torch.Tensor], torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        logits_sum, grad_sum = torch.zeros(()), torch.zeros(())
        for _ in range(self.samples):
            logits, grad = super().value_and_grad(x, loss)
            logits_sum, grad_sum = logits_sum + logits, grad_sum + grad
        return logits_sum / self.samples, grad_sum / self.samples


class MarginClassifier(Classifier):
    """``inner`` with every attack loss computed on its logits rescaled, per sample, so that the
    gap between the two largest is ``gap`` (the scale is a constant of the step, no gradient).

    A saturated softmax (a distilled network, logits in the thousands) makes the cross-entropy's
    gradient underflow to exactly zero, so a cross-entropy attack "fails" having tested nothing.
    After the rescaling the softmax is never saturated, and the cross-entropy's gradient is a
    positive multiple of the gradient of the logit margin with two classes (a softmax-weighted
    margin with more): scale-free like the DLR loss of Croce & Hein (2020), which needs a third
    class. Logits returned to the attack (and its success) are the model's own.
    """

    def __init__(self, inner: Classifier, gap: float = 4.0) -> None:
        super().__init__(inner.module, inner.num_classes, inner.input_shape, inner.bounds, inner.name,
                         differentiable=inner.differentiable)
        self.inner = inner
        self.gap = gap

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.logits(x)

    def value_and_grad(self, x: torch.Tensor, loss: Callable[[torch.Tensor], torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        def rescaled(logits: torch.Tensor) -> torch.Tensor:
            top = logits.detach().topk(2, dim=1).values
            spread = (top[:, 0] - top[:, 1]).clamp_min(torch.finfo(logits.dtype).tiny)
            return loss(logits * (self.gap / spread)[:, None])

        return self.inner.value_and_grad(x, rescaled)


def _eot(model: Classifier, samples: int) -> Classifier:
    wrapped = EOTClassifier(model.module, model.num_classes, model.input_shape, model.bounds, model.name,
                            differentiable=model.differentiable)
    wrapped.samples = samples
    return wrapped


def _run(model: Classifier, stage: Stage, spec: Any, x: torch.Tensor, y: torch.Tensor,
         generator: torch.Generator, batch_size: int) -> torch.Tensor:
    """The stage's kernel over ``x`` in chunks; the returned examples are projected (bounded
    stages) or clipped, so that success is judged on what the caller will keep."""
    kernel, _ = KERNELS[stage.name]
    out = torch.empty_like(x)
    for start in range(0, x.shape[0], batch_size):
        stop = start + batch_size
        result: AttackOutput = kernel(model, x[start:stop], y[start:stop], spec, generator=generator)
        out[start:stop] = result.x_adv
    if stage.bounded:
        return project(out, x, spec.eps, stage.norm, model.bounds)  # type: ignore[arg-type]
    return out.clamp(*model.bounds)


def _with_eps(spec: Any, eps: float) -> Any:
    return dataclasses.replace(spec, eps=eps)


@contextlib.contextmanager
def _gradients_for(white_box: bool, model: Classifier) -> Iterator[None]:
    """White-box attacks on a non-differentiable model see BPDA gradients."""
    if white_box and not model.differentiable:
        with bpda(model.module):
            yield
    else:
        yield


def input_gradient_norms(model: Classifier, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per-sample L2 norm of the gradient of the cross-entropy at the clean inputs (no BPDA)."""
    norms = []
    for start in range(0, x.shape[0], batch_size):
        xs, ys = x[start:start + batch_size], y[start:start + batch_size]
        _, grad = model.value_and_grad(xs, lambda logits, labels=ys: F.cross_entropy(  # type: ignore[misc]
            logits, labels, reduction="sum"))
        norms.append(flat_norm(grad, "l2"))
    return torch.cat(norms) if norms else torch.empty(0)


# --- the battery ------------------------------------------------------------------------------


def run_battery(model: Classifier, x: torch.Tensor, y: torch.Tensor, plan: AuditPlan, *,
                generator: torch.Generator,
                on_stage: Callable[[str], None] | None = None) -> Chunk:
    """Run ``plan`` on the batch ``x`` ``(N, C, H, W)`` in bounds with true labels ``y`` ``(N,)``.

    ``on_stage(description)`` is called before each stage (progress, cancellation).
    """
    notify = on_stage or (lambda _: None)
    bs = plan.batch_size
    n = x.shape[0]
    counters: dict[str, float] = {"n": float(n)}
    started = time.perf_counter()
    suite_seconds = 0.0  # the suite's own stages; the rest of the chunk's time is the checks' cost
    adaptive_seconds = 0.0  # the adaptive attack on the detector (a cost of its own)

    # Randomness: the same inputs twice must give the same logits.
    first, second = model.predict(x[:bs], bs), model.predict(x[:bs], bs)
    random_diff = float((first - second).abs().max()) if n else 0.0
    counters["random_max_logit_diff"] = random_diff
    eot = random_diff > 1e-5
    attacker = _eot(model, plan.eot_samples) if eot else model

    logits = model.predict(x, bs)
    clean_pred = logits.argmax(1)
    correct = clean_pred == y
    counters["correct"] = float(correct.sum())
    counters["mean_l1_logits"] = float(logits.abs().sum(1).mean()) if n else 0.0

    notify("gradients")
    grad_norms = input_gradient_norms(model, x[correct], y[correct], bs)
    counters["zero_gradients"] = float((grad_norms == 0).sum())
    # Per unit of the input range, so that the same model on [0, 255] inputs (whose input gradient
    # is 255 times smaller) counts the same samples.
    counters["tiny_gradients"] = float((grad_norms * (model.bounds[1] - model.bounds[0]) < 1e-6).sum())
    counters["median_gradient_norm"] = float(grad_norms.median()) if grad_norms.numel() else 0.0

    result = Chunk(labels=y.cpu().numpy(), clean_pred=clean_pred.cpu().numpy(),
                   bpda=not model.differentiable, eot=eot, bounds=model.bounds,
                   input_shape=tuple(x.shape[1:]), transfer_eps=plan.transfer_eps if plan.surrogates else None)
    keep = min(plan.keep_images, n)
    result.clean_images = x[:keep].cpu().numpy()
    for norm, grid in plan.grids.items():
        stages = plan.stages.get(norm, ())
        robust = torch.zeros(len(stages), len(grid), n, dtype=torch.bool, device=x.device)
        broken_by = torch.full((len(grid), n), -1, dtype=torch.int64, device=x.device)
        worst = x.clone()  # current worst-case example per sample (clean while robust)
        images = torch.empty(len(grid), keep, *x.shape[1:], dtype=x.dtype, device=x.device)
        flagged = torch.zeros(len(grid), n, dtype=torch.bool, device=x.device)
        flagged_by_stage = torch.zeros(len(stages), len(grid), n, dtype=torch.bool, device=x.device)
        best = [x.clone() for _ in stages]  # per stage, its latest successful example
        alive = [correct.clone() for _ in stages]  # per stage, robust so far
        in_cascade = [plan.cascade and not stage.single_step for stage in stages]
        cascade_best = x.clone()  # cascade: each sample's latest successful example of any stage
        for e, eps in enumerate(grid):
            standing = correct.clone()  # cascade: robust to every cascade stage so far
            for s in range(len(stages)):
                if in_cascade[s]:
                    standing &= alive[s]
            already = correct & ~standing
            worst_before = worst.clone() if plan.cascade else worst
            for s, stage in enumerate(stages):
                if in_cascade[s]:
                    # Broken by an earlier stage (or at a smaller eps): not attacked again.
                    dropped = alive[s] & ~standing
                    best[s][dropped] = cascade_best[dropped]
                    alive[s] &= standing
                idx = alive[s].nonzero().squeeze(1)
                if idx.numel():
                    notify(f"{stage.name} {norm} eps {eps:g}")
                    stage_started = time.perf_counter()
                    with _gradients_for(stage.white_box, model):
                        x_adv = _run(attacker if stage.white_box else model, stage,
                                     _with_eps(stage.spec, eps), x[idx], y[idx], generator, bs)
                    hit = model.predict(x_adv, bs).argmax(1) != y[idx]
                    best[s][idx[hit]] = x_adv[hit]
                    alive[s][idx[hit]] = False
                    if in_cascade[s]:
                        cascade_best[idx[hit]] = x_adv[hit]
                    suite_seconds += time.perf_counter() - stage_started
                if in_cascade[s]:
                    standing = alive[s].clone()
                robust[s, e] = alive[s]
            # Worst case at this eps: the first stage (in suite order) that broke the sample.
            broken = correct.clone()
            for s in range(len(stages)):
                newly = broken & ~alive[s]
                broken_by[e, newly] = s
                worst[newly] = best[s][newly]
                broken &= alive[s]
            if plan.cascade and e > 0:  # broken at a smaller eps: that example and its attack stand
                worst[already] = worst_before[already]
                broken_by[e, already] = broken_by[e - 1, already]
            images[e] = worst[:keep]
            if plan.detector is not None:
                scores = squeeze_scores(model.module, worst, plan.detector.squeezers, model.bounds, bs)
                flagged[e] = scores > plan.detector.threshold
                for s in range(len(stages)):
                    hit = (correct & ~alive[s]).nonzero().squeeze(1)
                    if hit.numel():
                        stage_scores = squeeze_scores(model.module, best[s][hit], plan.detector.squeezers,
                                                      model.bounds, bs)
                        flagged_by_stage[s, e, hit] = stage_scores > plan.detector.threshold
        result.robust[norm] = robust.cpu().numpy()
        result.broken_by[norm] = broken_by.cpu().numpy()
        result.images[norm] = images.cpu().numpy()
        preds = model.predict(images.flatten(0, 1), bs).argmax(1).view(len(grid), keep)
        result.image_preds[norm] = preds.cpu().numpy()
        if plan.detector is not None:
            result.flagged[norm] = flagged.cpu().numpy()
            result.flagged_by_stage[norm] = flagged_by_stage.cpu().numpy()
            adaptive_started = time.perf_counter()
            evaded = adaptive_evasions(model, x, y, correct, robust, flagged, plan, norm, generator, counters,
                                       notify)
            result.evaded_adaptive[norm] = evaded.cpu().numpy()
            adaptive_seconds += time.perf_counter() - adaptive_started
        _checks_for_norm(model, attacker, x, y, correct, plan, norm, stages, robust, generator, counters,
                         notify)

    if plan.detector is not None:
        scores = squeeze_scores(model.module, x, plan.detector.squeezers, model.bounds, bs)
        result.clean_flagged = (scores > plan.detector.threshold).cpu().numpy()

    for stage in plan.minimal:
        idx = correct.nonzero().squeeze(1)
        norms = torch.full((n,), math.inf, dtype=torch.float64)
        norms[~correct.cpu()] = math.nan
        if idx.numel():
            notify(f"{stage.result_key} (minimal)")
            with _gradients_for(stage.white_box, model):
                x_adv = _run(attacker if stage.white_box else model, stage, stage.spec, x[idx], y[idx],
                             generator, bs)
            hit = model.predict(x_adv, bs).argmax(1) != y[idx]
            size = flat_norm(x_adv - x[idx], stage.norm).double().cpu()  # type: ignore[arg-type]
            norms[idx.cpu()[hit.cpu()]] = size[hit.cpu()]
        result.minimal[stage.result_key] = norms.numpy()

    if plan.transfer_eps is not None:
        for surrogate in plan.surrogates:
            notify(f"transfer from {surrogate.name}")
            stage = Stage("pgd", PGDSpec(eps=plan.transfer_eps, steps=20), "linf")
            x_adv = _run(surrogate, stage, stage.spec, x, y, generator, bs)
            fooled = correct & (model.predict(x_adv, bs).argmax(1) != y)
            result.transfer[surrogate.name] = fooled.cpu().numpy()

    # Unbounded: Linf over the whole input range, no random start; every sample must fall.
    idx = correct.nonzero().squeeze(1)
    counters["unbounded_attacked"] = float(idx.numel())
    counters["unbounded_broken"] = 0.0
    if idx.numel():
        notify("unbounded")
        lo, hi = model.bounds
        stage = Stage("pgd", PGDSpec(eps=hi - lo, steps=plan.unbounded_steps, step_size=(hi - lo) / 10,
                                     random_start=False), "linf")
        with _gradients_for(stage.white_box, model):
            x_adv = _run(attacker, stage, stage.spec, x[idx], y[idx], generator, bs)
        counters["unbounded_broken"] = float((model.predict(x_adv, bs).argmax(1) != y[idx]).sum())
    # Wall-clock seconds (summed over chunks by the merge): the suite's stages, and everything else
    # (the masking checks, the probe's single step excepted, with the detector and transfer).
    counters["seconds_suite"] = suite_seconds
    counters["seconds_adaptive"] = adaptive_seconds
    counters["seconds_checks"] = time.perf_counter() - started - suite_seconds - adaptive_seconds
    result.counters = counters
    return result


def adaptive_evasions(model: Classifier, x: torch.Tensor, y: torch.Tensor, correct: torch.Tensor,
                      robust: torch.Tensor, flagged: torch.Tensor, plan: AuditPlan, norm: str,
                      generator: torch.Generator, counters: dict[str, float],
                      notify: Callable[[str], None]) -> torch.Tensor:
    """``(eps, n)`` bool: the adaptive adversary has an example at that eps that is misclassified
    and not flagged. It chooses the best of what it knows: the suite's (oblivious) worst case where
    that already evades (``robust`` ``(stages, eps, n)``, ``flagged`` ``(eps, n)``), an evading
    example found at a smaller eps (it lies inside every larger ball), and ``squeeze_adaptive`` on
    the samples that the suite broke at that eps but only with flagged examples, judged again here
    on the returned tensor.

    Samples that no attack of the suite could misclassify at that eps are not attacked again: the
    joint attack must misclassify them too, under a harder objective, and spends its whole budget
    there. Measured on the first 100 fmnist-cnn test images (quick suite, Linf 8/255, 0.05, 0.1; 20
    steps): attacked as well, those were 73 of 207 sample-eps pairs and gave 0 evasions (the attack
    took 13.1 s with them, 8.3 s without, on a loaded 2-core machine).
    A model without bounded stages in a norm (minimal suite) has no such evidence: every correctly
    classified sample is attacked."""
    detector = plan.detector
    assert detector is not None
    bs = plan.batch_size
    held = robust.all(0)  # (eps, n): no stage broke the sample; no stage: all True
    evaded = correct & ~held & ~flagged
    candidates = correct & ~held if robust.shape[0] else correct.expand_as(held)
    for e, eps in enumerate(plan.grids[norm]):
        if e:
            evaded[e] |= evaded[e - 1]
        idx = (candidates[e] & ~evaded[e]).nonzero().squeeze(1)
        counters["adaptive_attacked"] = counters.get("adaptive_attacked", 0.0) + idx.numel()
        if not idx.numel():
            continue
        notify(f"adaptive (detector) {norm} eps {eps:g}")
        spec = SqueezeAdaptiveSpec(eps=eps, squeezers=detector.squeezers, threshold=detector.threshold,
                                   norm=norm, steps=detector.adaptive_steps)  # type: ignore[arg-type]
        x_adv = torch.empty_like(x[idx])
        with _gradients_for(True, model):
            for start in range(0, idx.numel(), bs):
                rows = idx[start:start + bs]
                out = squeeze_adaptive(model, x[rows], y[rows], spec, generator=generator)
                x_adv[start:start + bs] = out.x_adv
        x_adv = project(x_adv, x[idx], eps, norm, model.bounds)  # type: ignore[arg-type]
        scores = squeeze_scores(model.module, x_adv, detector.squeezers, model.bounds, bs)
        hit = (model.predict(x_adv, bs).argmax(1) != y[idx]) & (scores <= detector.threshold)
        evaded[e, idx[hit]] = True
        counters["adaptive_evaded"] = counters.get("adaptive_evaded", 0.0) + float(hit.sum())
    return evaded


def _checks_for_norm(model: Classifier, attacker: Classifier, x: torch.Tensor, y: torch.Tensor,
                     correct: torch.Tensor, plan: AuditPlan, norm: str, stages: Sequence[Stage],
                     robust: torch.Tensor, generator: torch.Generator, counters: dict[str, float],
                     notify: Callable[[str], None]) -> None:
    """Per-eps counts for the single-step and black-box checks, and the more-steps rerun."""
    grid = plan.grids[norm]
    single = [s for s, st in enumerate(stages) if st.single_step]
    iterative = [s for s, st in enumerate(stages) if st.white_box and not st.single_step]
    black = [s for s, st in enumerate(stages) if not st.white_box]
    for e, eps in enumerate(grid):
        key = eps_key(norm, eps)
        if single and iterative:
            single_broken = correct & ~robust[single].all(0)[e]
            iterative_robust = robust[iterative, e].all(0)
            counters[f"single_step_only@{key}"] = float((single_broken & iterative_robust).sum())
        if black:
            white = [s for s in range(len(stages)) if s not in black]
            white_robust = robust[white, e].all(0) if white else correct
            black_broken = correct & ~robust[black, e].all(0)
            counters[f"black_box_only@{key}"] = float((black_broken & white_robust).sum())
    target = plan.check_eps.get(norm)
    if target is None or not iterative:
        return
    e = min(range(len(grid)), key=lambda i: abs(grid[i] - target))
    eps = grid[e]
    survivors = robust[:, e].all(0).nonzero().squeeze(1) if len(stages) else correct.nonzero().squeeze(1)
    counters[f"more_steps_attacked@{norm}"] = float(survivors.numel())
    counters[f"more_steps_broken@{norm}"] = 0.0
    counters[f"more_steps_broken_ce@{norm}"] = 0.0
    counters[f"more_steps_broken_margin@{norm}"] = 0.0
    counters[f"more_steps_eps@{norm}"] = float(eps)
    if survivors.numel() == 0:
        return
    notify(f"more steps {norm} eps {eps:g}")
    base_steps = max((getattr(stages[s].spec, "steps", 20) for s in iterative), default=20)
    stage = Stage("pgd", PGDSpec(eps=eps, norm=norm, steps=base_steps * plan.more_steps_factor,  # type: ignore[arg-type]
                                 restarts=plan.more_restarts), norm)
    counters[f"more_steps_steps@{norm}"] = float(stage.spec.steps)
    counters[f"more_steps_restarts@{norm}"] = float(plan.more_restarts)
    # The cross-entropy first (what the suite followed), then the logit margin on what still stands.
    for loss, attack_with in (("ce", attacker), ("margin", MarginClassifier(attacker))):
        with _gradients_for(stage.white_box, model):
            x_adv = _run(attack_with, stage, stage.spec, x[survivors], y[survivors], generator, plan.batch_size)
        hit = model.predict(x_adv, plan.batch_size).argmax(1) != y[survivors]
        counters[f"more_steps_broken_{loss}@{norm}"] = float(hit.sum())
        survivors = survivors[~hit]
        if survivors.numel() == 0:
            break
    counters[f"more_steps_broken@{norm}"] = counters[f"more_steps_attacked@{norm}"] - float(survivors.numel())
