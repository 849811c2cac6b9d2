"""Auto-PGD: APGD-CE, APGD-DLR and APGD-T (Linf and L2), with early stop per sample.

Croce, Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020. PGD with momentum whose step size needs no tuning:

* ``eta = 2 * eps`` at the start; ``x1 = P(x0 + eta * d(grad f(x0)))``, then
  ``z = P(x_k + eta * d(grad f(x_k)))`` and ``x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))``
  with ``a = 0.75`` (``d``: sign for Linf, L2-normalised gradient for L2; ``P`` the projection onto
  the ball and the box);
* checkpoints ``w_j = ceil(p_j * steps)`` with ``p_0 = 0``, ``p_1 = 0.22``,
  ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``; at each one a sample halves its step and goes
  back to its best point if the loss rose in at most ``rho`` of the steps since the previous
  checkpoint (condition 1), or if its step was not halved there and its best loss has not improved
  since (condition 2). Where the paper leaves room, this follows the authors' code (fra31/auto-attack,
  ``autopgd_base.py``), the AutoAttack the field compares with: "at most" (the paper writes "fewer
  than"), condition 2 only from the second checkpoint on, and a rise counted against the loss of the
  previous iterate even where a checkpoint moved the walk back to its best point (and the first
  step's against 0);
* the best point (highest loss) of each sample is kept, together with its gradient, so that going
  back to it costs nothing.

Losses (maximised): cross-entropy, the Difference of Logits Ratio
``DLR = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)`` and its targeted form
``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``, with ``z_pi1 >= z_pi2 >= ...`` the sorted logits.
DLR is invariant to shifting and rescaling the logits, so a saturated softmax does not hide the
gradient. APGD-T runs the targeted DLR once per target class, the ``n_target_classes`` highest wrong
classes of the clean logits, each pass only on the samples still robust, as AutoAttack does.

Each run starts from a random point of the eps ball (``base.random_start``).

What we add: a sample is returned at the first iterate that reaches the goal and leaves the
working set (at once on the CPU, at the next compaction on an accelerator: ``compaction_points``),
so the remaining steps are spent only on the samples that still resist; restarts and target
passes also run only on those. Without early stop a successful sample is returned at its
highest-loss successful iterate. A sample that resists is returned at its highest-loss point over
all restarts and passes (AutoAttack returns the clean input). The last iterate of a run is only
evaluated (forward), never differentiated: ``steps`` gradients per run at most.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from workers.attacks.base import (
    AttackOutput,
    check_batch,
    counters,
    goal_reached,
    per_sample,
    project,
    random_start,
    steepest_direction,
    take_rows,
)
from workers.classifier import Classifier

ApgdNorm = Literal["linf", "l2"]
MOMENTUM = 0.75  # the paper's alpha: weight of the new gradient step against the previous move
DLR_TINY = 1e-12

# (logits (n, K), labels (n,), targets (n,) or None) -> per-sample loss (n,), to be maximised.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class APGDSpec:
    """``eps`` in input units of ``norm``; ``steps`` iterations per run (one gradient each);
    ``restarts`` random starts per run; ``loss`` for ``apgd`` (``apgd_t`` always uses the targeted
    DLR); ``rho`` the fraction of rising steps below which the step is halved; ``n_target_classes``
    the number of target classes ``apgd_t`` tries (capped at classes - 1)."""

    eps: float
    norm: ApgdNorm = "linf"
    steps: int = 100
    restarts: int = 1
    loss: Literal["ce", "dlr"] = "ce"
    rho: float = 0.75
    targeted: bool = False
    n_target_classes: int = 9
    early_stop: bool = True


def checkpoints(steps: int) -> list[int]:
    """The paper's checkpoints ``w_j = ceil(p_j * steps)`` in ``(0, steps)``, increasing, without repeats.

    ``w_0 = 0`` is left out (the list holds where the step size is checked); for 100 steps:
    22, 41, 57, 70, 80, 87, 93, 99.
    """
    p = [0.0, 0.22]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)
        if nxt > 1:
            break
        p.append(nxt)
    # round() first: 0.22 * 100 is 22.000000000000004 in floating point, whose ceil is 23.
    points = sorted({math.ceil(round(q * steps, 6)) for q in p})
    return [w for w in points if 0 < w < steps]


DLR_MIN_CLASSES = 3


def check_dlr_classes(num_classes: int) -> None:
    """The DLR losses need a third logit to measure the scale of the logits by: with two classes
    the only scale is the margin itself, and the ratio is a constant +-1 without gradient."""
    if num_classes < DLR_MIN_CLASSES:
        raise ValueError(f"expected a model with at least {DLR_MIN_CLASSES} classes for the DLR loss "
                         f"(APGD-DLR, APGD-T), got {num_classes}")


def dlr_loss(logits: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample DLR loss ``(n,)``: untargeted without ``targets``, targeted with them.

    Untargeted: ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)``;
    targeted: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)``. Both need 3 classes; with
    exactly 3, the targeted form takes the lowest logit ``z_pi3`` for the missing ``z_pi4`` (the
    denominator still bounds the numerator, ``|DLR| <= 1``). Positive exactly when the untargeted
    goal is reached, whatever the scale of the logits.
    """
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    if targets is None:
        top = logits.topk(3, dim=1).values
        best_other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
        return -(z_y - best_other) / (top[:, 0] - top[:, 2] + DLR_TINY)
    top = logits.topk(min(4, logits.shape[1]), dim=1).values
    z_t = logits.gather(1, targets[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - (top[:, 2] + top[:, -1]) / 2 + DLR_TINY)


def ce_per_sample(logits: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of ``y`` (untargeted, to raise) or minus that of ``targets`` (targeted)."""
    if targets is None:
        return F.cross_entropy(logits, y, reduction="none")
    return -F.cross_entropy(logits, targets, reduction="none")


@dataclass
class _Walk:
    """The per-sample state of one run, for the samples still in the working set (rows align)."""

    idx: torch.Tensor  # (n,) positions in the full batch
    x0: torch.Tensor  # clean inputs, centres of the balls
    labels: torch.Tensor
    loss_targets: torch.Tensor | None
    goal_targets: torch.Tensor | None
    x: torch.Tensor  # current iterate x_k
    x_prev: torch.Tensor  # x_{k-1}, for the momentum term
    grad: torch.Tensor  # gradient at x_k
    x_max: torch.Tensor  # best point so far, its gradient and loss
    grad_max: torch.Tensor
    f_max: torch.Tensor
    f_prev: torch.Tensor  # loss at x_k, to count rising steps
    eta: torch.Tensor  # (n,) step size
    rises: torch.Tensor  # (n,) rising steps since the last checkpoint
    f_max_check: torch.Tensor  # best loss at the last checkpoint
    halved_check: torch.Tensor  # (n,) bool: step halved at the last checkpoint
    active: torch.Tensor  # (n,) bool: not yet returned (early stop: rows that hit wait here for compaction)
    hit: torch.Tensor  # (n,) bool: an iterate reached the goal (only without early stop)
    x_hit: torch.Tensor  # the highest-loss such iterate and its loss
    f_hit: torch.Tensor

    def take(self, rows: torch.Tensor) -> _Walk:
        return take_rows(self, rows)


@dataclass
class _Result:
    """Full-batch outputs, filled in as samples leave the working set."""

    x_adv: torch.Tensor
    success: torch.Tensor
    best_loss: torch.Tensor  # highest loss returned so far for a resisting sample
    queries: torch.Tensor
    gradients: torch.Tensor


def _evaluate(model: Classifier, x: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None,
              loss_fn: LossFn, with_grad: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Logits, per-sample loss and (when asked) the gradient of the summed loss at ``x``."""
    if not with_grad:
        logits = model.logits(x)
        return logits, loss_fn(logits, labels, targets), None
    per: list[torch.Tensor] = []

    def total(out: torch.Tensor) -> torch.Tensor:
        values = loss_fn(out, labels, targets)
        per.append(values.detach())
        return values.sum()  # summed: one sample's gradient does not depend on the others

    logits, grad = model.value_and_grad(x, total)
    return logits, per[0], grad


def _run(model: Classifier, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, noise: torch.Tensor,
         loss_targets: torch.Tensor | None, goal_targets: torch.Tensor | None, loss_fn: LossFn,
         spec: APGDSpec, out: _Result) -> None:
    """One APGD run (one random start) on the samples ``idx``; writes into ``out``."""
    eps, norm, bounds = spec.eps, spec.norm, model.bounds
    targeted_goal = goal_targets is not None
    x0 = x[idx]
    labels = y[idx]
    lt = loss_targets[idx] if loss_targets is not None else None
    gt = goal_targets[idx] if goal_targets is not None else None
    start = project(x0 + noise[idx], x0, eps, norm, bounds)
    logits, f, grad = _evaluate(model, start, labels, lt, loss_fn, with_grad=spec.steps > 0)
    assert grad is not None
    out.queries[idx] += 1
    out.gradients[idx] += 1
    n = idx.numel()
    hit = goal_reached(logits, labels, gt, targeted_goal)
    w = _Walk(
        idx=idx, x0=x0, labels=labels, loss_targets=lt, goal_targets=gt,
        # The first step's rise is counted against 0, not the start's loss, as in the authors' code
        # (its loss history starts as zeros): a targeted DLR loss, negative until the target wins,
        # counts no rise there, so a slow first interval halves the step a little more often.
        x=start, x_prev=start, grad=grad, x_max=start, grad_max=grad, f_max=f, f_prev=torch.zeros_like(f),
        eta=torch.full((n,), 2.0 * eps, dtype=x.dtype, device=x.device),
        rises=torch.zeros(n, dtype=torch.int64, device=x.device), f_max_check=f,
        # Condition 2 waits for the second checkpoint, as in the authors' code.
        halved_check=torch.ones(n, dtype=torch.bool, device=x.device),
        active=torch.ones(n, dtype=torch.bool, device=x.device),
        hit=torch.zeros(n, dtype=torch.bool, device=x.device), x_hit=start,
        f_hit=torch.full_like(f, -math.inf),
    )
    marks = checkpoints(spec.steps)
    previous_mark = dict(zip(marks, [0, *marks[:-1]], strict=True))
    compact_at = compaction_points(spec.steps, x)
    if spec.early_stop:
        _record_first_hits(w, hit, start, out)
        w = _compact(w)
    else:
        w.hit, w.f_hit = hit, torch.where(hit, f, w.f_hit)

    for k in range(spec.steps):
        if w.idx.numel() == 0:
            return
        # x_{k+1}: a plain projected step first, then the momentum blend of the paper.
        a = 1.0 if k == 0 else MOMENTUM
        eta = per_sample(w.eta, w.x)
        z = project(w.x + eta * steepest_direction(w.grad, norm), w.x0, eps, norm, bounds)
        x_new = project(w.x + a * (z - w.x) + (1 - a) * (w.x - w.x_prev), w.x0, eps, norm, bounds)
        last = k + 1 == spec.steps
        logits, f, grad = _evaluate(model, x_new, w.labels, w.loss_targets, loss_fn, with_grad=not last)
        out.queries[w.idx] += 1
        if not last:
            out.gradients[w.idx] += 1
        hit = goal_reached(logits, w.labels, w.goal_targets, targeted_goal)
        if spec.early_stop:
            _record_first_hits(w, hit, x_new, out)
            if k + 1 in compact_at:
                stay = w.active.nonzero().squeeze(1)  # a host sync: the working set's new size
                if stay.numel() < w.idx.numel():
                    w, x_new, f, hit = w.take(stay), x_new[stay], f[stay], hit[stay]
                    grad = grad[stay] if grad is not None else None
        w.x_prev, w.x = w.x, x_new
        if grad is not None:
            w.grad = grad
        if not spec.early_stop:
            better_hit = hit & (f > w.f_hit)
            w.hit = w.hit | hit
            w.x_hit = torch.where(per_sample(better_hit, x_new), x_new, w.x_hit)
            w.f_hit = torch.where(better_hit, f, w.f_hit)
        w.rises = w.rises + (f > w.f_prev).long()
        w.f_prev = f
        improved = f > w.f_max
        w.x_max = torch.where(per_sample(improved, x_new), x_new, w.x_max)
        if grad is not None:
            w.grad_max = torch.where(per_sample(improved, grad), grad, w.grad_max)
        w.f_max = torch.where(improved, f, w.f_max)
        if k + 1 in previous_mark:
            _check_step_size(w, spec.rho, k + 1 - previous_mark[k + 1])
    _finish(w, out)


def _check_step_size(w: _Walk, rho: float, interval: int) -> None:
    """At a checkpoint: halve the step and go back to the best point where progress stalled."""
    too_few_rises = w.rises.double() <= rho * interval  # condition 1
    stalled = ~w.halved_check & (w.f_max <= w.f_max_check)  # condition 2
    halve = too_few_rises | stalled
    w.eta = torch.where(halve, w.eta / 2, w.eta)
    back = per_sample(halve, w.x)
    w.x = torch.where(back, w.x_max, w.x)
    w.grad = torch.where(back, w.grad_max, w.grad)
    w.rises = torch.zeros_like(w.rises)
    w.f_max_check = w.f_max
    w.halved_check = halve


def compaction_points(steps: int, like: torch.Tensor) -> set[int]:
    """Iterates after which early stop drops finished samples from the working set.

    Every iterate on the CPU, where reading the count costs nothing. On an accelerator each
    compaction is a host sync that stalls the kernel queue, and a small model there costs about
    the same per pass whatever the batch: compact on a sparse, growing schedule (about 20 points
    per 100 steps, dense early, when most samples fall); in between, finished samples ride along
    masked, their first successful iterate already recorded, so results do not depend on it.
    """
    return set(range(steps + 1)) if like.device.type == "cpu" else sparse_compaction_points(steps)


def sparse_compaction_points(steps: int) -> set[int]:
    """1, 2, ..., 7, 9, 12, 15, 19, 23, ...: each gap about a quarter of the steps done, and ``steps``."""
    points, k = {steps}, 1.0
    while k <= steps:
        points.add(int(k))
        k = max(k + 1, k * 1.25)
    return points


def _record_first_hits(w: _Walk, hit: torch.Tensor, x_now: torch.Tensor, out: _Result) -> None:
    """Early stop: active samples whose iterate ``x_now`` reached the goal are returned with it.

    No host sync: the rows stay in the working set, masked, until the next compaction.
    """
    newly = hit & w.active
    out.x_adv[w.idx] = torch.where(per_sample(newly, x_now), x_now, out.x_adv[w.idx])
    out.success[w.idx] = out.success[w.idx] | newly
    w.active = w.active & ~hit


def _compact(w: _Walk) -> _Walk:
    stay = w.active.nonzero().squeeze(1)
    return w.take(stay) if stay.numel() < w.idx.numel() else w


def _finish(w: _Walk, out: _Result) -> None:
    """End of a run: hits (without early stop) keep their best hit; the others their best point,
    if its loss beats what an earlier restart or pass left."""
    out.x_adv[w.idx[w.hit]] = w.x_hit[w.hit]
    out.success[w.idx[w.hit]] = True
    miss = w.active & ~w.hit
    better = miss & (w.f_max > out.best_loss[w.idx])
    out.x_adv[w.idx[better]] = w.x_max[better]
    out.best_loss[w.idx[better]] = w.f_max[better]


def _attack(model: Classifier, x: torch.Tensor, y: torch.Tensor, spec: APGDSpec,
            passes: Callable[[torch.Tensor], list[torch.Tensor | None]], loss_fn: LossFn,
            targets: torch.Tensor | None, generator: torch.Generator | None) -> AttackOutput:
    """``restarts`` APGD runs per pass, each on the samples still robust.

    ``passes(clean_logits)`` gives the loss targets of each pass (None: untargeted loss).
    """
    assert spec.steps >= 1, f"expected steps >= 1, got {spec.steps}"
    assert spec.norm in ("linf", "l2"), f"expected norm linf or l2, got {spec.norm}"
    queries, gradients = counters(x)
    logits = model.logits(x)
    queries += 1
    out = _Result(x.clone(), goal_reached(logits, y, targets, spec.targeted),
                  torch.full((x.shape[0],), -math.inf, dtype=x.dtype, device=x.device), queries, gradients)
    # Inputs misclassified to begin with are returned unchanged, in targeted mode too.
    skip = logits.argmax(dim=1) != y
    goal_targets = targets if spec.targeted else None
    for loss_targets in passes(logits):
        for _ in range(spec.restarts):
            # Drawn for the whole batch: a sample's start never depends on which others are active.
            noise = random_start(x, spec.eps, spec.norm, generator)
            idx = (~(out.success | skip)).nonzero().squeeze(1)
            if idx.numel() == 0:
                return AttackOutput(out.x_adv, out.success, out.queries, out.gradients)
            _run(model, x, y, idx, noise, loss_targets, goal_targets, loss_fn, spec, out)
    return AttackOutput(out.x_adv, out.success, out.queries, out.gradients)


def apgd(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: APGDSpec,
    *,
    targets: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> AttackOutput:
    """APGD-CE (``spec.loss="ce"``) or APGD-DLR (``spec.loss="dlr"``) on a batch, Linf or L2.

    Targeted (``spec.targeted``): minus the cross-entropy of the target, or the targeted DLR.

    Args:
        model: the classifier; bounds come from it. DLR needs 3 classes (``ValueError`` below).
        x: inputs ``(N, C, H, W)`` inside ``model.bounds``.
        y: true labels ``(N,)``.
        spec: see ``APGDSpec``; ``eps`` in input units of ``spec.norm``.
        targets: target classes ``(N,)`` when ``spec.targeted``.
        generator: source of the random starts (on ``x``'s device).

    Returns:
        ``AttackOutput``: a successful sample at its first iterate that reached the goal (with
        ``early_stop``; without it, its highest-loss such iterate); a resisting one at its
        highest-loss point over the restarts; inputs misclassified to begin with unchanged.

    Example:
        >>> out = apgd(model, x, y, APGDSpec(eps=0.1, loss="dlr"), generator=torch.Generator().manual_seed(0))
    """
    check_batch(x, y, targets, spec.targeted)
    if spec.loss == "dlr":
        check_dlr_classes(model.num_classes)
    base: LossFn = dlr_loss if spec.loss == "dlr" else ce_per_sample
    loss_targets = targets if spec.targeted else None
    return _attack(model, x, y, spec, lambda _: [loss_targets], base, targets, generator)


def apgd_t(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: APGDSpec,
    *,
    targets: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> AttackOutput:
    """APGD-T: the targeted DLR loss, Linf or L2.

    Untargeted (the AutoAttack way): one pass per target class, the ``spec.n_target_classes``
    highest wrong classes of the clean logits in order, each pass (``spec.restarts`` runs) only
    on the samples still classified correctly; success means any wrong class. Targeted
    (``spec.targeted`` with ``targets``): the given targets, success means hitting them.
    ``spec.loss`` is not used.

    Args:
        model: the classifier (at least 3 classes, else ``ValueError``); bounds come from it.
        x: inputs ``(N, C, H, W)`` inside ``model.bounds``.
        y: true labels ``(N,)``.
        spec: see ``APGDSpec``; ``eps`` in input units of ``spec.norm``.
        targets: target classes ``(N,)`` when ``spec.targeted``.
        generator: source of the random starts (on ``x``'s device).

    Returns:
        ``AttackOutput`` as for ``apgd``; ``queries``/``gradients`` add up over the passes.

    Example:
        >>> out = apgd_t(model, x, y, APGDSpec(eps=8 / 255, n_target_classes=9),
        ...              generator=torch.Generator().manual_seed(0))
    """
    check_batch(x, y, targets, spec.targeted)
    check_dlr_classes(model.num_classes)
    n_targets = max(1, min(spec.n_target_classes, model.num_classes - 1))

    def passes(clean: torch.Tensor) -> list[torch.Tensor | None]:
        if spec.targeted:
            return [targets]
        # Target classes from the clean logits, the true class left out, highest first.
        order = clean.scatter(1, y[:, None], float("-inf")).topk(n_targets, dim=1).indices
        return [order[:, j] for j in range(n_targets)]

    return _attack(model, x, y, spec, passes, dlr_loss, targets, generator)
