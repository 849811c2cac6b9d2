"""Fast Gradient Sign Method.

Goodfellow, Shlens, Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015.
One gradient step of size ``eps`` along the sign of the input gradient of the cross-entropy
(Linf); with ``norm="l2"`` the step follows the L2-normalised gradient (the fast gradient method).
Targeted: a step down the cross-entropy of the target class.
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
    per_sample,
    project,
    steepest_direction,
)
from workers.classifier import Classifier


@dataclass(frozen=True)
class FGSMSpec:
    """``eps``: step length in input units, measured in ``norm`` (``linf`` or ``l2``).

    ``check=False`` skips the forward pass that judges the output (``success`` is then None):
    FGSM then costs exactly one forward and one backward, for callers that judge it themselves.
    """

    eps: float
    norm: Norm = "linf"
    targeted: bool = False
    check: bool = True


def fgsm(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: FGSMSpec,
    *,
    targets: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> AttackOutput:
    """FGSM on a batch.

    Args:
        model: the classifier; bounds come from it.
        x: inputs ``(N, C, H, W)`` inside ``model.bounds``.
        y: true labels ``(N,)``.
        spec: ``eps`` (input units), ``norm``, ``targeted``.
        targets: target classes ``(N,)`` when ``spec.targeted``.
        generator: unused (FGSM is deterministic); accepted for a uniform kernel signature.

    Returns:
        ``AttackOutput`` with ``x_adv`` within ``eps`` of ``x`` in ``spec.norm`` and in bounds.

    Example:
        >>> out = fgsm(model, x, y, FGSMSpec(eps=0.1))
    """
    check_batch(x, y, targets, spec.targeted)
    goal = targets if spec.targeted and targets is not None else y
    logits, grad = model.value_and_grad(x, lambda out: ce_loss(out, goal))
    sign = -1.0 if spec.targeted else 1.0
    if spec.norm == "linf":
        # A sign step of eps stays in the Linf ball by construction: only the box clips it.
        x_adv = x.add(grad.sign(), alpha=sign * spec.eps).clamp_(*model.bounds)
    else:
        x_adv = project(x + sign * spec.eps * steepest_direction(grad, spec.norm), x, spec.eps,
                        spec.norm, model.bounds)
    # Inputs misclassified to start with are returned unchanged (a step could make them right).
    already = logits.argmax(dim=1) != y
    x_adv = torch.where(per_sample(already, x_adv), x, x_adv)
    success = goal_reached(model.logits(x_adv), y, targets, spec.targeted) if spec.check else None
    queries, gradients = counters(x)
    return AttackOutput(x_adv, success, queries + (2 if spec.check else 1), gradients + 1)
