"""AdvGAN, the attack: one forward pass of a trained generator per batch (Linf).

Xiao, Li, Zhu, He, Liu, Song, "Generating Adversarial Examples with Adversarial Networks", IJCAI
2018. ``x_adv = clamp(x + eps * tanh(G(x)), bounds)`` with ``G`` trained by
``workers.generators.advgan.train_advgan``: inside the Linf ``eps`` ball and the box by
construction. The model under attack is only queried to judge the result (no gradients), so the
attack is as cheap as two forward passes, whatever the model; a targeted generator aims at the one
class it was trained for, and success is judged against ``targets``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workers.attacks.base import AttackOutput, check_batch, counters, goal_reached
from workers.classifier import Classifier
from workers.generators.advgan import perturb


@dataclass(frozen=True)
class AdvGANAttackSpec:
    """``generator``: a trained AdvGAN generator (eval mode), on the model's device; ``eps``: the
    Linf bound in input units (normally the one it was trained with)."""

    generator: nn.Module
    eps: float
    targeted: bool = False


def advgan(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: AdvGANAttackSpec,
    *,
    targets: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> AttackOutput:
    """AdvGAN on a batch.

    Args:
        model: the classifier; bounds come from it. Queried twice per attacked input: once clean,
            once to judge the output.
        x: inputs ``(N, C, H, W)`` inside ``model.bounds``.
        y: true labels ``(N,)``.
        spec: the trained ``generator``, ``eps`` (input units), ``targeted``.
        targets: target classes ``(N,)`` when ``spec.targeted``.
        generator: unused (the trained generator is deterministic); accepted for a uniform kernel
            signature.

    Returns:
        ``AttackOutput`` with ``x_adv`` within ``eps`` of ``x`` in Linf and in bounds; inputs
        misclassified to start with are returned unchanged.

    Example:
        >>> out = advgan(model, x, y, AdvGANAttackSpec(generator=result.generator, eps=0.3))
    """
    check_batch(x, y, targets, spec.targeted)
    queries, gradients = counters(x)
    # Only inputs classified correctly are attacked (as pgd does): a perturbation could make a
    # wrong prediction right.
    logits = model.logits(x)
    queries += 1
    success = goal_reached(logits, y, targets, spec.targeted)
    attacked = (logits.argmax(dim=1) == y).nonzero().squeeze(1)
    x_adv = x.clone()
    if attacked.numel():
        with torch.no_grad():
            x_adv[attacked] = perturb(spec.generator, x[attacked], spec.eps, model.bounds)
        goal = targets[attacked] if targets is not None else None
        success[attacked] = goal_reached(model.logits(x_adv[attacked]), y[attacked], goal, spec.targeted)
        queries[attacked] += 1
    return AttackOutput(x_adv, success, queries, gradients)
