"""Adaptive attack on a classifier guarded by a feature-squeezing detector (Linf and L2).

Carlini & Wagner, "Adversarial Examples Are Not Easily Detected: Bypassing Ten Detection Methods"
(AISec 2017); Tramer, Carlini, Brendel & Madry, "On Adaptive Attacks to Adversarial Example
Defenses" (NeurIPS 2020). The detector is feature squeezing (Xu, Evans & Qi, NDSS 2018; see
``workers.defenses.squeeze``): score ``s(x) = max_k || softmax(f(x)) - softmax(f(S_k(x))) ||_1``,
an input is rejected when ``s(x) > threshold``.

An attack that does not know the detector (an *oblivious* one) says little about detect-and-reject:
its examples were never asked to pass the detector. Following Carlini & Wagner, classifier and
detector are attacked as one model with ``K + 1`` outputs, the last one "rejected":

    G_k(x) = mean_v z_k(v) / r   for the K classes, v over x and each squeezed S_k(x)
    G_rej(x) = max_k G_k(x) + score_weight * (s(x) - threshold)

(``z``: logits; ``r``: the clean input's logit range, a constant per sample), and the loss minimised
is the margin ``max(G_y, G_rej) - max_{j != y} G_j``: "rejected" outranks every class exactly when
the detector flags ``x``, so the loss pushes the classifier off ``y`` and, where ``x`` is flagged,
the score under the threshold, following whichever constraint binds (Tramer et al.'s advice: one
margin loss over the defended model, not a weighted sum whose weights must be tuned per defense).
The classes are scored on the mean logits of ``x`` and its squeezed copies, the ensemble of He et
al. ("Adversarial Example Defenses: Ensembles of Weak Defenses are not Strong", WOOT 2017): the
score is small when the model says the same on ``x`` and on every ``S_k(x)``, so the attack has to
move the squeezed copies too. Measured on the first 64 fmnist-cnn test images at Linf 0.1 (58
classified correctly; its detector: bit depth 2 and 3, threshold 0.551; 50 steps): oblivious PGD-20
got 10 of them misclassified and not flagged; this attack with the logits of ``x`` alone and a
constant step ``eps / 5``, 31 (the score term mostly pulled ``x`` back to ``y``); with the mean, 34;
with the mean and the step schedule below, 37. Dividing by the clean range
``r = max_k z_k - min_k z_k`` makes the loss indifferent to the scale of the logits (as the DLR loss
of Croce & Hein 2020), so ``score_weight`` means the same for every model. Success is judged on the
definition, not on the loss: ``x`` misclassified and ``s(x) <= threshold``.

Gradients pass through the squeezers by BPDA (Athalye, Carlini & Wagner, ICML 2018): bit-depth
reduction (and JPEG), whose true gradient is zero almost everywhere, is the identity on the
backward pass (straight-through, ``Preprocess.bpda``); the median filter keeps its own gradient
(it routes to the selected pixel), which is exact.

Steps are PGD's (Madry et al. 2018): sign of the gradient (Linf) or its L2-normalised direction,
projected onto the eps ball and the input box, from a random start, with a step size that decays
from ``step_size`` (default ``eps``) to a twentieth of it on a half cosine. Large early steps matter
here: a pixel changes its squeezed value only once it crosses a rounding boundary (on the images
above, with the logits of ``x`` alone, PGD's usual constant ``2.5 * eps / steps`` evaded on 22 where
``eps / 5`` evaded on 31). A sample leaves the batch at its first iterate that is misclassified and
not flagged (early stop); one that never gets there is returned at its lowest-loss iterate. Each
step costs one forward pass per squeezer plus one, and one backward pass through all of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from workers.attacks.base import (
    TINY,
    AttackOutput,
    Norm,
    check_batch,
    counters,
    project,
    random_start,
    steepest_direction,
)
from workers.classifier import Classifier
from workers.defenses.preprocess import Preprocess


@dataclass(frozen=True)
class SqueezeAdaptiveSpec:
    """``eps`` and ``step_size`` (the first step; ``None``: ``eps``) in input units of ``norm``.

    ``squeezers`` and ``threshold`` are the detector's (``DetectorCard``): a list of pipelines of
    step dicts, and the score above which an input is rejected. ``score_weight``: clean logit
    ranges per unit of detector score in the "rejected" output (see the module docstring)."""

    eps: float
    squeezers: tuple[tuple[Mapping[str, Any], ...], ...]
    threshold: float
    norm: Norm = "linf"
    steps: int = 50
    step_size: float | None = None
    restarts: int = 1
    random_start: bool = True
    score_weight: float = 4.0

    def alpha(self, step: int) -> float:
        """The step size at ``step`` (0-based): half a cosine from ``step_size`` to a twentieth."""
        first = self.step_size if self.step_size is not None else self.eps
        return first * (0.05 + 0.475 * (1 + math.cos(math.pi * step / max(self.steps - 1, 1))))


class _StraightThrough(torch.autograd.Function):
    """``step(x)`` on the forward pass, the identity on the backward pass (BPDA with ``g(x) = x``).

    Unlike ``x + (step(x) - x).detach()`` (``Preprocess.bpda``), the forward value is ``step(x)``
    to the bit, so the scores this kernel judges success on are the detector's own."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, step: torch.nn.Module) -> torch.Tensor:
        return step(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _pipelines(spec: SqueezeAdaptiveSpec, bounds: tuple[float, float]) -> list[Preprocess]:
    if not spec.squeezers:
        raise ValueError("expected at least one squeezer, got none")
    return [Preprocess(steps, bounds) for steps in spec.squeezers]


def _squeeze(pipeline: Preprocess, x: torch.Tensor) -> torch.Tensor:
    """The pipeline on ``x``, its non-differentiable steps straight-through."""
    for step in pipeline.steps:
        x = step(x) if step.differentiable else _StraightThrough.apply(x, step)
    return x


def _outputs(module: torch.nn.Module, x: torch.Tensor, pipelines: list[Preprocess]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits ``(N, K)``, the mean logits of ``x`` and its squeezed copies ``(N, K)`` and the
    detector scores ``(N,)`` at ``x`` (differentiable where ``x`` is)."""
    logits = module(x)
    probs = logits.softmax(dim=1)
    squeezed = [module(_squeeze(p, x)) for p in pipelines]
    distances = [(probs - z.softmax(dim=1)).abs().sum(dim=1) for z in squeezed]
    mean = torch.stack([logits, *squeezed]).mean(dim=0)
    return logits, mean, torch.stack(distances).amax(dim=0)


def joint_margin(logits: torch.Tensor, scores: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
                 threshold: float, score_weight: float) -> torch.Tensor:
    """Per-sample ``max(G_y, G_rej) - max_{j != y} G_j`` ``(N,)`` with ``G = logits / scale``:
    negative iff ``logits`` rank a wrong class first and ``scores <= threshold`` (ties aside).
    ``logits``: ``(N, K)`` (the attack passes the mean over the views); ``scale``: ``(N,)``."""
    g = logits / scale[:, None]
    true = g.gather(1, y[:, None]).squeeze(1)
    other = g.scatter(1, y[:, None], -torch.inf).amax(dim=1)
    rejected = g.amax(dim=1) + score_weight * (scores - threshold)
    return torch.maximum(true, rejected) - other


def squeeze_adaptive(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: SqueezeAdaptiveSpec,
    *,
    targets: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> AttackOutput:
    """Attack ``model`` and its feature-squeezing detector jointly (untargeted).

    Args:
        model: the classifier; bounds and device come from it.
        x: inputs ``(N, C, H, W)`` inside ``model.bounds``.
        y: true labels ``(N,)``.
        spec: see ``SqueezeAdaptiveSpec``.
        targets: unused (untargeted only); accepted for a uniform kernel signature.
        generator: source of the random starts (on ``x``'s device).

    Returns:
        ``AttackOutput``: ``success`` is "misclassified and not flagged" (``score <= threshold``);
        a successful sample's first such iterate, else its lowest-loss iterate. Inputs classified
        wrongly to begin with are returned unchanged (already not robust, nothing to evade).
        ``queries``/``gradients`` count images through the model: ``1 + len(squeezers)`` per step.

    Example:
        >>> spec = SqueezeAdaptiveSpec(eps=0.1, squeezers=(({"name": "bit-depth", "bits": 2},),),
        ...                            threshold=0.55)
        >>> out = squeeze_adaptive(model, x, y, spec, generator=torch.Generator().manual_seed(0))
    """
    check_batch(x, y, None, False)
    pipelines = _pipelines(spec, model.bounds)
    passes = 1 + len(pipelines)
    module = model.module
    queries, gradients = counters(x)
    with torch.no_grad():
        logits, _, scores = _outputs(module, x, pipelines)
    queries += passes
    model.queries += passes * x.shape[0]
    scale = (logits.amax(dim=1) - logits.amin(dim=1)).clamp_min(TINY)
    wrong = logits.argmax(dim=1) != y
    success = torch.zeros_like(wrong)
    x_best = x.clone()
    best_loss = torch.full((x.shape[0],), torch.inf, dtype=x.dtype, device=x.device)

    for _ in range(spec.restarts):
        # Noise for the whole batch, so that a sample's start never depends on the others.
        noise = random_start(x, spec.eps, spec.norm, generator) if spec.random_start else None
        idx = (~(success | wrong)).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        x0, y0, s0 = x[idx], y[idx], scale[idx]
        x_adv = x0.clone() if noise is None else project(x0 + noise[idx], x0, spec.eps, spec.norm, model.bounds)
        for step in range(spec.steps + 1):
            last = step == spec.steps
            if last:
                with torch.no_grad():
                    logits, mean, scores = _outputs(module, x_adv, pipelines)
                    loss = joint_margin(mean, scores, y0, s0, spec.threshold, spec.score_weight)
            else:
                xg = x_adv.detach().requires_grad_(True)
                with torch.enable_grad():
                    logits, mean, scores = _outputs(module, xg, pipelines)
                    loss = joint_margin(mean, scores, y0, s0, spec.threshold, spec.score_weight)
                    (grad,) = torch.autograd.grad(loss.sum(), xg)
                logits, scores, loss = logits.detach(), scores.detach(), loss.detach()
                gradients[idx] += passes
                model.gradients += passes * idx.numel()
            queries[idx] += passes
            model.queries += passes * idx.numel()
            hit = (logits.argmax(dim=1) != y0) & (scores <= spec.threshold)
            better = (loss < best_loss[idx]) | hit
            x_best[idx[better]] = x_adv[better]
            best_loss[idx[better]] = loss[better]
            success[idx[hit]] = True
            if last:
                break
            if bool(hit.any()):  # early stop: the first evading iterate stands
                keep = ~hit
                idx, x0, y0, s0, x_adv, grad = idx[keep], x0[keep], y0[keep], s0[keep], x_adv[keep], grad[keep]
                if idx.numel() == 0:
                    break
            x_adv = project(x_adv - spec.alpha(step) * steepest_direction(grad, spec.norm), x0, spec.eps,
                            spec.norm, model.bounds)
    return AttackOutput(x_best, success, queries, gradients)
