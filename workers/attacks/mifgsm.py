"""Momentum Iterative FGSM (Linf and L2), with early stop.

Dong, Liao, Pang, Su, Zhu, Hu, Li, "Boosting Adversarial Attacks with Momentum", CVPR 2018.
Accumulates the L1-normalised input gradient of the cross-entropy on logits in a velocity,
``g <- decay * g + grad / ||grad||_1``, and steps along it:
``x <- Proj_{B(x0, eps) ∩ box}(x + step_size * d(g))``, ``d`` the sign (Linf) or the
L2-normalised ``g`` (L2, the paper's L2 variant). Normalising each gradient by its own L1 norm
makes the velocity a weighted sum of directions, not of magnitudes, so one large gradient does
not wipe out the history. Targeted: the steps go down the cross-entropy of the target class.

Default ``step_size = eps / steps`` (the paper's ``alpha = eps / T``): the last iterate can reach
the boundary of the ball but not cross it. An optional uniform random start is not in the paper.
Early stop (on by default) keeps the first iterate that reaches the goal and drops that sample
from the batch (see ``compaction_points`` for when); without it, the result is the paper's last
iterate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.attacks.apgd import compaction_points
from workers.attacks.base import (
    TINY,
    AttackOutput,
    Norm,
    ce_loss,
    check_batch,
    counters,
    goal_reached,
    per_sample,
    project,
    random_start,
    steepest_direction,
)
from workers.classifier import Classifier


@dataclass(frozen=True)
class MIFGSMSpec:
    """``eps`` and ``step_size`` in input units of ``norm`` (``linf`` or ``l2``);
    ``step_size=None`` means ``eps / steps``; ``decay`` is the momentum factor ``mu``."""

    eps: float
    norm: Norm = "linf"
    steps: int = 10
    step_size: float | None = None
    decay: float = 1.0
    random_start: bool = False
    targeted: bool = False
    early_stop: bool = True

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else self.eps / self.steps


def mi_fgsm(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: MIFGSMSpec,
    *,
    targets: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> AttackOutput:
    """MI-FGSM on a batch.

    Args:
        model: the classifier; bounds come from it.
        x: inputs ``(N, C, H, W)`` inside ``model.bounds``.
        y: true labels ``(N,)``.
        spec: see ``MIFGSMSpec``.
        targets: target classes ``(N,)`` when ``spec.targeted``.
        generator: source of the random start (used only with ``spec.random_start``).

    Returns:
        ``AttackOutput``: for a successful sample, the first iterate that reached the goal (with
        ``early_stop``); otherwise the last iterate. Inputs misclassified to begin with unchanged.

    Example:
        >>> out = mi_fgsm(model, x, y, MIFGSMSpec(eps=0.1, steps=10, decay=1.0))
    """
    check_batch(x, y, targets, spec.targeted)
    assert spec.norm in ("linf", "l2"), f"expected norm linf or l2, got {spec.norm}"
    assert spec.steps >= 1, f"expected steps >= 1, got {spec.steps}"
    goal = targets if spec.targeted and targets is not None else y
    sign = -1.0 if spec.targeted else 1.0
    x_best = x.clone()
    queries, gradients = counters(x)
    logits = model.logits(x)
    queries += 1
    success = goal_reached(logits, y, targets, spec.targeted)
    # Inputs misclassified to begin with are returned unchanged (as in AutoAttack).
    idx = (~success & (logits.argmax(dim=1) == y)).nonzero().squeeze(1)
    if idx.numel() == 0:
        return AttackOutput(x_best, success, queries, gradients)

    x0, g0 = x[idx], goal[idx]
    x_adv = x0.clone()
    if spec.random_start:
        # Drawn for the whole batch, so a sample's start never depends on the others.
        noise = random_start(x, spec.eps, spec.norm, generator)
        x_adv = project(x0 + noise[idx], x0, spec.eps, spec.norm, model.bounds)
    velocity = torch.zeros_like(x0)
    # Rows whose first successful iterate is recorded stay, masked, until the next compaction.
    active = torch.ones(idx.numel(), dtype=torch.bool, device=x.device)
    compact_at = compaction_points(spec.steps, x)
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
        if last:
            x_best[idx] = torch.where(per_sample(active, x_adv), x_adv, x_best[idx])
            success[idx] = torch.where(active, hit, success[idx])
            break
        if spec.early_stop:
            newly = hit & active
            x_best[idx] = torch.where(per_sample(newly, x_adv), x_adv, x_best[idx])
            success[idx] = success[idx] | newly
            active = active & ~hit
            if step in compact_at:
                stay = active.nonzero().squeeze(1)  # a host sync: the working set's new size
                if stay.numel() == 0:
                    break
                if stay.numel() < idx.numel():
                    idx, x0, g0, x_adv, grad, velocity, active = (
                        idx[stay], x0[stay], g0[stay], x_adv[stay], grad[stay], velocity[stay], active[stay])
        # The paper's accumulation: each gradient enters with unit L1 norm.
        l1 = grad.flatten(1).abs().sum(dim=1).clamp_min(TINY)
        velocity = spec.decay * velocity + grad / per_sample(l1, grad)
        x_adv = project(x_adv + sign * spec.alpha * steepest_direction(velocity, spec.norm), x0,
                        spec.eps, spec.norm, model.bounds)
    return AttackOutput(x_best, success, queries, gradients)
