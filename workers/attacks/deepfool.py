"""DeepFool, batched over images and candidate classes (L2 and Linf).

Moosavi-Dezfooli, Fawzi, Frossard, "DeepFool: a simple and accurate method to fool deep neural
networks", CVPR 2016. At each iterate the classifier is linearised around the current point; the
step goes to the nearest linearised boundary among the candidate classes (the top ``candidates``
classes of the clean logits): for L2, ``r = |f_k| / ||w_k||_2^2 * w_k``; for Linf,
``r = |f_k| / ||w_k||_1 * sign(w_k)``, with ``f_k`` the logit difference to the original class
and ``w_k`` its gradient.

What differs from the per-image reference loop, and why:
* one forward pass per iteration for the whole active batch, which both judges the iterate and
  keeps the graph for one backward pass per followed class (only the nearest boundary after the
  first iteration): no loop over images, no second forward to check success;
* a damped first step (``first_step_scale``), full steps after it (see ``DeepFoolSpec``);
* the overshoot multiplies the *total* perturbation, every iterate is clipped to the input
  bounds, and success is judged on that clipped point, so a returned sample really is on the
  other side of the boundary instead of on it;
* box-aware linearisation: pixels already at a bound whose gradient points outwards are left out
  of ``w_k`` (they cannot move), and the total perturbation is kept feasible, so clipping does not
  stall the iteration;
* samples are dropped from the batch as soon as they are fooled (early stop by masking).
Untargeted only: the method seeks the nearest boundary, whatever class lies behind it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.attacks.base import TINY, AttackOutput, Norm, check_batch, counters, per_sample
from workers.classifier import Classifier


@dataclass(frozen=True)
class DeepFoolSpec:
    """``overshoot`` scales the total perturbation by ``1 + overshoot``; ``candidates`` counts the
    original class too (10 = all classes of Fashion-MNIST). After the first iteration only the
    ``refine_candidates`` classes whose linearised boundary was nearest are followed (None: all
    candidates every iteration, as in the paper).

    ``first_step_scale`` takes that fraction of the first linearised step, ``step_scale`` of every
    later one. The first linearisation is made farthest from the boundary, where curvature makes
    its direction least accurate; damping it lets the second linearisation, made close to the
    boundary, choose where to cross. Measured on fmnist-cnn (the same 128 test images, Foolbox's
    L2 DeepFool at median L2 0.635): full steps everywhere give median L2 0.670 with 11.7 gradient
    calls per image; every step at 0.8 gives 0.639 with 22.7; the first at 0.6 and the rest full
    give 0.616 with 10.5 (the default)."""

    norm: Norm = "l2"
    overshoot: float = 0.02
    max_iter: int = 50
    candidates: int = 10
    refine_candidates: int | None = 1
    first_step_scale: float = 0.6
    step_scale: float = 1.0


def deepfool(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: DeepFoolSpec,
    *,
    targets: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> AttackOutput:
    """Minimal-perturbation DeepFool on a batch.

    Args:
        model: the classifier; bounds come from it.
        x: inputs ``(N, C, H, W)`` inside ``model.bounds``.
        y: true labels ``(N,)``; samples already misclassified are returned unchanged.
        spec: ``norm`` (``l2`` or ``linf``), ``overshoot``, ``max_iter``, ``candidates``.
        targets: must be None (DeepFool is untargeted).
        generator: unused (deterministic); accepted for a uniform kernel signature.

    Returns:
        ``AttackOutput`` whose ``x_adv`` is ``clip(x + (1 + overshoot) * r_total)``.

    Example:
        >>> out = deepfool(model, x, y, DeepFoolSpec(norm="l2"))
    """
    if targets is not None:
        raise ValueError("DeepFool is untargeted: expected targets=None")
    check_batch(x, y, None, False)
    assert spec.norm in ("l2", "linf"), f"expected norm l2 or linf, got {spec.norm}"
    lo, hi = model.bounds
    n_classes = model.num_classes
    k = max(2, min(spec.candidates, n_classes))
    queries, gradients = counters(x)

    r_total = torch.zeros_like(x)
    x_adv = x.clone()
    success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    idx = torch.arange(x.shape[0], device=x.device)
    scale = 1.0 + spec.overshoot
    followed = k - 1  # candidate classes followed this iteration
    candidates = torch.empty(0, dtype=torch.long, device=x.device)

    for iteration in range(spec.max_iter + 1):
        if idx.numel() == 0:
            break
        y_act = y[idx]
        x_cur = (x[idx] + scale * r_total[idx]).clamp(lo, hi) if iteration > 0 else x
        last = iteration == spec.max_iter
        # One forward pass per iteration: it judges the iterate and its graph gives the gradients.
        if last:
            logits = model.logits(x_cur)
        else:
            logits, vjp = model.linearize(x_cur)
        queries[idx] += 1
        if iteration == 0:
            # Candidate classes: the top-k of the clean logits, the true class removed (k - 1 each).
            order = logits.argsort(dim=1, descending=True)
            ranked = order[order != y[:, None]].view(x.shape[0], n_classes - 1)
            candidates = ranked[:, : k - 1].clone()
        fooled = logits.argmax(dim=1) != y_act
        if iteration > 0:
            x_adv[idx[fooled]] = x_cur[fooled]
        success[idx[fooled]] = True  # at iteration 0: misclassified to begin with, left unchanged
        keep = ~fooled
        if last:
            x_adv[idx[keep]] = x_cur[keep]
            break
        rows = keep.nonzero().squeeze(1)
        n_act = rows.numel()
        if n_act == 0:
            break
        idx, y_act, x_cur = idx[rows], y_act[rows], x_cur[rows]
        cand = candidates[idx, :followed]
        f = (logits[rows].gather(1, cand) - logits[rows].gather(1, y_act[:, None])).abs()  # (n, c)
        # Coordinates pinned at a bound cannot move further out: leave them out of the
        # linearisation, so the step is spent where it can act.
        at_lo, at_hi = x_cur <= lo, x_cur >= hi
        # Gradients of the logit differences Z_cand - Z_y, one backward pass per followed class;
        # the rows of samples fooled by this iterate get a zero cotangent. Only the gradient of the
        # nearest boundary so far is kept: memory stays that of one gradient per sample whatever
        # the number of candidates (1000 classes of 3x224x224 inputs would otherwise hold
        # candidates x batch x 150528 values at once).
        norms = []
        w_best = dist_best = None
        for c in range(followed):
            cot = torch.zeros_like(logits)
            cot[rows, cand[:, c]] = 1.0
            cot[rows, y_act] = -1.0
            w_c = vjp(cot, c == followed - 1)[rows]
            w_c = w_c.masked_fill((at_lo & (w_c < 0)) | (at_hi & (w_c > 0)), 0.0)
            # Dual norm of the step's norm: L2 for L2, L1 for Linf.
            w_flat = w_c.flatten(1)
            norm_c = w_flat.norm(p=2, dim=1) if spec.norm == "l2" else w_flat.abs().sum(dim=1)
            norms.append(norm_c)
            dist_c = f[:, c] / (norm_c + TINY)
            if w_best is None or dist_best is None:
                w_best, dist_best = w_c, dist_c
            else:
                closer = dist_c < dist_best  # ties keep the earlier candidate, as the stable sort does
                w_best = torch.where(per_sample(closer, w_c), w_c, w_best)
                dist_best = torch.where(closer, dist_c, dist_best)
        assert w_best is not None
        gradients[idx] += followed
        w_norm = torch.stack(norms, dim=1)  # (n, c)
        dist = f / (w_norm + TINY)
        # Follow the nearest linearised boundaries first; after the first iteration only the
        # ``refine_candidates`` nearest ones (the far boundaries stay far).
        order_by_dist = dist.argsort(dim=1, stable=True)
        candidates[idx, :followed] = cand.gather(1, order_by_dist)
        if spec.refine_candidates is not None:
            followed = min(followed, spec.refine_candidates)
        best = order_by_dist[:, 0]
        f_best = f.gather(1, best[:, None]).squeeze(1)
        norm_best = w_norm.gather(1, best[:, None]).squeeze(1)
        if spec.norm == "l2":
            step = w_best * per_sample((f_best + 1e-5) / (norm_best**2 + TINY), w_best)
        else:
            step = w_best.sign() * per_sample((f_best + 1e-5) / (norm_best + TINY), w_best)
        # Keep x + (1 + overshoot) * r_total inside the bounds, so that clipped components do
        # not pile up in r_total.
        fraction = spec.first_step_scale if iteration == 0 else spec.step_scale
        x_act = x[idx]
        r_total[idx] = torch.minimum(torch.maximum(r_total[idx] + fraction * step, (lo - x_act) / scale),
                                     (hi - x_act) / scale)

    return AttackOutput(x_adv, success, queries, gradients)
