"""Projected Gradient Descent (Linf and L2), with random start, restarts and early stop.

Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to Adversarial
Attacks", ICLR 2018. Iterates ``x <- Proj_{B(x0, eps) ∩ box}(x + step_size * d(grad))`` where ``d``
is the sign (Linf) or the L2-normalised gradient (L2) of the cross-entropy on logits.

Early stop (on by default) keeps the first iterate that reaches the goal and drops that sample
from the batch, as AutoAttack's cascade does: the remaining steps are spent only on the samples
that still resist. Restarts (each from a fresh random start) run only on those samples too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.attacks.base import (
    AttackOutput,
    Norm,
    ce_loss,
    check_batch,
    counters,
    goal_reached,
    project,
    random_start,
    steepest_direction,
)
from workers.classifier import Classifier


@dataclass(frozen=True)
class PGDSpec:
    """``eps`` and ``step_size`` in input units of ``norm``; ``step_size=None`` means ``2.5 * eps / steps``."""

    eps: float
    norm: Norm = "linf"
    steps: int = 20
    step_size: float | None = None
    random_start: bool = True
    restarts: int = 1
    targeted: bool = False
    early_stop: bool = True

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps


def pgd(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: PGDSpec,
    *,
    targets: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> AttackOutput:
    """PGD on a batch.

    Args:
        model: the classifier; bounds come from it.
        x: inputs ``(N, C, H, W)`` inside ``model.bounds``.
        y: true labels ``(N,)``.
        spec: see ``PGDSpec``.
        targets: target classes ``(N,)`` when ``spec.targeted``.
        generator: source of the random starts (on ``x``'s device).

    Returns:
        ``AttackOutput``: for a successful sample, the first iterate that reached the goal; for
        the others, the last iterate of the last restart.

    Example:
        >>> out = pgd(model, x, y, PGDSpec(eps=0.1, steps=20), generator=torch.Generator().manual_seed(0))
    """
    check_batch(x, y, targets, spec.targeted)
    goal = targets if spec.targeted and targets is not None else y
    sign = -1.0 if spec.targeted else 1.0
    x_best = x.clone()
    queries, gradients = counters(x)
    # Only inputs classified correctly are attacked (as in AutoAttack): the others are returned
    # unchanged, so an attack can never make a wrong prediction right.
    logits = model.logits(x)
    logits_best = logits.clone()  # the model's logits on each row of x_best (see AttackOutput)
    queries += 1
    success = goal_reached(logits, y, targets, spec.targeted)
    done = logits.argmax(dim=1) != y

    for _ in range(spec.restarts):
        # Noise is drawn for the whole batch, so a sample's start never depends on the others.
        noise = random_start(x, spec.eps, spec.norm, generator) if spec.random_start else None
        idx = (~(success | done)).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        x0, g0 = x[idx], goal[idx]
        x_adv = x0.clone()
        if noise is not None:
            x_adv = project(x0 + noise[idx], x0, spec.eps, spec.norm, model.bounds)
        for step in range(spec.steps + 1):
            last = step == spec.steps
            if last:
                logits = model.logits(x_adv)
            else:
                logits, grad = model.value_and_grad(
                    x_adv, lambda out, labels=g0: ce_loss(out, labels)  # type: ignore[misc]
                )
                gradients[idx] += 1
            queries[idx] += 1
            hit = goal_reached(logits, g0, g0, spec.targeted)
            if last or spec.early_stop:
                x_best[idx[hit]] = x_adv[hit]
                logits_best[idx[hit]] = logits[hit]
                success[idx[hit]] = True
            if last:
                x_best[idx[~hit]] = x_adv[~hit]
                logits_best[idx[~hit]] = logits[~hit]
                break
            if spec.early_stop and bool(hit.any()):
                keep = ~hit
                idx, x0, g0, x_adv, grad = idx[keep], x0[keep], g0[keep], x_adv[keep], grad[keep]
                if idx.numel() == 0:
                    break
            step_dir = steepest_direction(grad, spec.norm)
            x_adv = project(x_adv + sign * spec.alpha * step_dir, x0, spec.eps, spec.norm,
                            model.bounds)
    return AttackOutput(x_best, success, queries, gradients, logits_best.detach())
