"""Jacobian-based Saliency Map Attack (JSMA), batched over images, pairwise saliency (L0).

Papernot, McDaniel, Jha, Fredrikson, Celik, Swami, "The Limitations of Deep Learning in
Adversarial Settings", IEEE European Symposium on Security and Privacy (EuroS&P) 2016.

Each iteration takes the forward derivatives ``a = d F_t / d x`` (the target output) and
``b = d sum_{j != t} F_j / d x`` (the others) and picks the pair of features ``(p, q)``, ``p != q``,
both still in the search domain, that maximises ``(a_p + a_q) * |b_p + b_q|`` subject to
``a_p + a_q > 0`` and ``b_p + b_q < 0`` (``theta > 0``; signs reversed for ``theta < 0``). Both
features move by ``theta * (hi - lo)`` and are clipped to the bounds (the paper's Algorithm 3).

``space="probabilities"`` is the paper's JSMA on the softmax outputs ``F``; ``space="logits"``
is JSMA-Z (Carlini & Wagner's variant on the logits ``Z``), which defensive distillation does not
defeat. On probabilities the outputs sum to one, so ``b = -a`` exactly: one VJP per iteration gives
both. On logits ``a`` and ``b`` come from one forward pass and two VJPs.

Search domain and budget: a feature is in the domain while it can still move in ``theta``'s
direction (it leaves when it reaches the bound; a feature moved by ``|theta| < 1`` may be chosen
again, as in Algorithm 3). At most ``floor(gamma * D)`` distinct features change (``D = C*H*W``):
a sample stops before an iteration that could exceed that, when fewer than two features remain,
when no pair satisfies the sign conditions, or when it reaches its goal. All of this is masking
over the batch. The pair search is exact without scoring all ``D^2`` pairs (``_pair_choice``): on
probabilities it reduces to the two largest derivatives; on logits a bound discards the features
that cannot belong to the best pair, and the rest is searched in chunks of at most 256 MB.

Untargeted mode: the "target" is every class but the true one. ``a`` is the derivative of
``sum_{j != y} F_j`` and ``b`` that of ``F_y``: pairs that raise the wrong classes and lower the
true class, until the prediction leaves ``y`` (on probabilities: the pair that lowers ``p_y``
fastest). The paper's method is targeted; this is its natural untargeted reading, and it needs no
arbitrary choice of a target class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from contracts.attacks import JSMA_MAX_PAIR_FEATURES
from workers.attacks.base import AttackOutput, check_batch, counters, goal_reached
from workers.classifier import Classifier

PAIR_MEMORY_BYTES = 256 * 2**20  # cap on the (n, S, S) pair-score tensors of one chunk
CANDIDATES = 32  # features per ranking that give the pair search its lower bound
# Largest input (C*H*W features) for the pair search of ``space="logits"``. Memory is bounded by
# tiling (``_best_pairs``), but the time is not: when the bound prunes little (dense, similar
# gradients) a row scores all D^2 pairs every iteration, and there are up to gamma * D / 2
# iterations. 2^14 features keep that worst case at 2^28 pair scores per row and iteration
# (3x64x64 inputs pass; 3x224x224, 150528 features, would score 2.3e10).
MAX_PAIR_FEATURES = JSMA_MAX_PAIR_FEATURES


@dataclass(frozen=True)
class JSMASpec:
    """``theta``: change per chosen feature as a fraction of the bounds range (negative: decrease);
    ``gamma``: the most features that may change, as a fraction of ``D = C*H*W``; ``space``:
    saliency on softmax ``probabilities`` (the paper) or ``logits`` (JSMA-Z)."""

    theta: float = 1.0
    gamma: float = 0.1
    space: Literal["probabilities", "logits"] = "probabilities"
    targeted: bool = False


def _best_pairs(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over ``p != q`` of ``relu(u_p + u_q) * relu(v_p + v_q)`` per row: (best value, flat index
    ``p * S + q``).

    ``relu(alpha) * relu(-beta)`` is positive exactly for the admissible pairs and equals the paper's
    ``alpha * |beta|`` there. Chunked so that the pair-score tensors stay under ``PAIR_MEMORY_BYTES``:
    over rows, ``(rows, S, S)`` at a time, and when one row's ``S x S`` matrix alone is larger (large
    inputs), one row at a time in blocks of ``p``, ``(1, P, S)``; a later block wins only with a
    strictly higher score, so ties resolve as in one ``max`` over the whole row.
    """
    n, s = u.shape
    pair_bytes = u.element_size() * 2
    rows = max(1, PAIR_MEMORY_BYTES // (s * s * pair_bytes))
    block = s if s * s * pair_bytes <= PAIR_MEMORY_BYTES else max(1, PAIR_MEMORY_BYTES // (s * pair_bytes))
    best = torch.empty(n, dtype=u.dtype, device=u.device)
    flat = torch.empty(n, dtype=torch.int64, device=u.device)
    for start in range(0, n, rows):
        uc, vc = u[start:start + rows], v[start:start + rows]
        for first in range(0, s, block):
            up, vp = uc[:, first:first + block], vc[:, first:first + block]
            score = (up[:, :, None] + uc[:, None, :]).clamp_(min=0)
            score.mul_((vp[:, :, None] + vc[:, None, :]).clamp_(min=0))
            score.diagonal(offset=first, dim1=1, dim2=2).zero_()  # the pairs p == q
            value, index = score.flatten(1).max(dim=1)
            index = index + first * s
            if first == 0:
                best[start:start + rows], flat[start:start + rows] = value, index
            else:
                higher = value > best[start:start + rows]
                best[start:start + rows] = torch.where(higher, value, best[start:start + rows])
                flat[start:start + rows] = torch.where(higher, index, flat[start:start + rows])
    return best, flat


def _pair_choice(a: torch.Tensor, b: torch.Tensor, domain: torch.Tensor,
                 opposite: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The most salient admissible feature pair per row, for ``theta > 0`` (callers flip signs).

    ``a``, ``b``: ``(n, D)`` derivatives of the target and of the others; ``domain``: ``(n, D)``
    bool; ``opposite``: ``b == -a`` (the softmax case). Returns ``p``, ``q`` (``(n,)``, ``p != q``)
    and ``found`` (``(n,)``: some pair has ``a_p + a_q > 0`` and ``b_p + b_q < 0``). Exact, though it
    does not score all ``D^2`` pairs:

    * with ``b = -a`` the saliency of an admissible pair is ``(a_p + a_q)^2``: the two largest ``a``;
    * otherwise with ``u = a``, ``v = -b``, any pair containing ``p`` scores at most
      ``ub_p = relu(u_p + max u) * relu(v_p + max v)``, and the best pair scores at least the best
      pair among a few candidates (the top of ``u``, of ``v`` and of ``u + v``). Features whose
      ``ub_p`` is below that lower bound cannot belong to the best pair; the full pair search runs
      on the others only (typically a few to a few dozen of the 784 pixels of a Fashion-MNIST
      image). Rounding is monotone, so the bound also holds for the computed scores.
    """
    if a.shape[0] == 0:
        empty = torch.empty(0, dtype=torch.int64, device=a.device)
        return empty, empty.clone(), torch.empty(0, dtype=torch.bool, device=a.device)
    if opposite:
        top, idx = a.masked_fill(~domain, float("-inf")).topk(2, dim=1)
        return idx[:, 0], idx[:, 1], top.sum(dim=1) > 0
    n, d = a.shape
    # A per-row positive scale changes neither signs nor argmax, and keeps products of tiny
    # derivatives from underflowing to zero.
    tiny = torch.finfo(a.dtype).tiny
    u = a / a.abs().amax(dim=1, keepdim=True).clamp_min(tiny)
    v = -b / b.abs().amax(dim=1, keepdim=True).clamp_min(tiny)
    # |u|, |v| <= 1 after scaling: -4 outside the domain makes every pair sum with it negative.
    u = u.masked_fill(~domain, -4.0)
    v = v.masked_fill(~domain, -4.0)

    k = min(CANDIDATES, d)
    cand = torch.cat([u.topk(k, dim=1).indices, v.topk(k, dim=1).indices,
                      (u + v).topk(k, dim=1).indices], dim=1)
    uc, vc = u.gather(1, cand), v.gather(1, cand)
    lower = ((uc[:, :, None] + uc[:, None, :]).clamp(min=0) * (vc[:, :, None] + vc[:, None, :]).clamp(min=0))
    lower = lower.masked_fill(cand[:, :, None] == cand[:, None, :], 0).flatten(1).amax(dim=1)
    upper = (u + u.amax(dim=1, keepdim=True)).clamp(min=0) * (v + v.amax(dim=1, keepdim=True)).clamp(min=0)
    counts = ((upper >= lower[:, None]) & (upper > 0)).sum(dim=1).clamp(min=2)
    # Rows are searched in groups of similar survivor counts (within a factor 2), each padded to
    # its group's largest: a few hard rows do not make the whole batch pay for their count. A
    # row's survivors are its top features by the bound; padding adds features, which never
    # change the maximum.
    order = counts.argsort(descending=True)
    counts_desc = counts[order]
    p = torch.empty(n, dtype=torch.int64, device=a.device)
    q = torch.empty_like(p)
    found = torch.empty(n, dtype=torch.bool, device=a.device)
    start = 0
    while start < n:
        s = int(counts_desc[start])
        stop = start + int((counts_desc[start:] * 2 > s).sum())
        rows = order[start:stop]
        keep = upper[rows].topk(s, dim=1).indices
        best, flat = _best_pairs(u[rows].gather(1, keep), v[rows].gather(1, keep))
        p[rows] = keep.gather(1, (flat // s)[:, None]).squeeze(1)
        q[rows] = keep.gather(1, (flat % s)[:, None]).squeeze(1)
        found[rows] = best > 0
        start = stop
    return p, q, found


def jsma(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: JSMASpec,
    *,
    targets: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> AttackOutput:
    """JSMA on a batch (L0 attack: ``gamma`` bounds the number of changed features, no ``eps``).

    Args:
        model: the classifier; bounds come from it.
        x: inputs ``(N, C, H, W)`` inside ``model.bounds``.
        y: true labels ``(N,)``; samples already misclassified are returned unchanged.
        spec: ``theta`` (fraction of ``hi - lo`` added to each chosen feature, in ``[-1, 1]``,
            not 0), ``gamma`` (fraction of features that may change, in ``(0, 1]``), ``space``,
            ``targeted``.
        targets: target classes ``(N,)`` when ``spec.targeted``.
        generator: unused (deterministic); accepted for a uniform kernel signature.

    Raises:
        ValueError: ``space="logits"`` on inputs of more than ``MAX_PAIR_FEATURES`` features.

    Returns:
        ``AttackOutput`` with the last iterate of every sample (at most ``floor(gamma * D)``
        features differ from ``x``); ``success`` is judged on it by one final forward pass. Costs
        per iteration: one query and one gradient (probabilities) or two gradients (logits).

    Example:
        >>> out = jsma(model, x, y, JSMASpec(theta=1.0, gamma=0.1), targets=t)  # with targeted=True
    """
    check_batch(x, y, targets, spec.targeted)
    assert spec.theta != 0 and 0 < spec.gamma <= 1, "expected theta != 0 and gamma in (0, 1]"
    lo, hi = model.bounds
    dims = x[0].numel()
    if spec.space == "logits" and dims > MAX_PAIR_FEATURES:
        raise ValueError(f"expected inputs of at most {MAX_PAIR_FEATURES} features (C*H*W) for JSMA's "
                         f"pairwise search on logits (use space='probabilities', whose search is linear), "
                         f"got {dims} ({'x'.join(str(d) for d in x.shape[1:])})")
    step = spec.theta * (hi - lo)
    sign = 1.0 if spec.theta > 0 else -1.0
    max_changed = math.floor(spec.gamma * dims)
    queries, gradients = counters(x)

    logits0 = model.logits(x)
    queries += 1
    flat_x = x.flatten(1)
    x_adv = flat_x.clone()
    # The classes whose outputs the attack raises: the target, or (untargeted) all but y.
    classes = torch.arange(model.num_classes, device=x.device)
    if spec.targeted:
        assert targets is not None
        raise_mask = (classes[None, :] == targets[:, None]).to(x.dtype)
    else:
        raise_mask = (classes[None, :] != y[:, None]).to(x.dtype)
    goal = targets if spec.targeted and targets is not None else y

    # Features that can still move in theta's direction; features changed so far.
    domain = flat_x < hi if spec.theta > 0 else flat_x > lo
    changed = torch.zeros_like(domain)
    # Misclassified inputs are left alone; so is any sample without room for one pair.
    active = (logits0.argmax(dim=1) == y) & (max_changed >= 2)
    idx = active.nonzero().squeeze(1)

    while True:
        # Room for one more pair: a sample without it is only judged (by the final forward pass).
        room = (changed[idx].sum(dim=1) + 2 <= max_changed) & (domain[idx].sum(dim=1) >= 2)
        idx = idx[room]
        if idx.numel() == 0:
            break
        xa = x_adv[idx].view(-1, *x.shape[1:])
        up = raise_mask[idx]
        if spec.space == "probabilities":
            def raised_probability(logits: torch.Tensor, up: torch.Tensor = up) -> torch.Tensor:
                return (logits.softmax(dim=1) * up).sum()

            logits, grad_a = model.value_and_grad(xa, raised_probability)
            a = grad_a.flatten(1)
            b = -a  # the softmax outputs sum to one
            gradients[idx] += 1
        else:
            logits, grads = model.vjp_batch(xa, torch.stack([up, 1 - up]))
            a, b = grads[0].flatten(1), grads[1].flatten(1)
            gradients[idx] += 2
        queries[idx] += 1

        go = ~goal_reached(logits, goal[idx], goal[idx], spec.targeted)
        p, q, found = _pair_choice(sign * a[go], sign * b[go], domain[idx[go]],
                                   opposite=spec.space == "probabilities")
        idx = idx[go][found]
        if idx.numel() == 0:
            break
        p, q = p[found], q[found]
        rows = x_adv[idx]
        rows.scatter_add_(1, p[:, None], torch.full_like(rows[:, :1], step))
        rows.scatter_add_(1, q[:, None], torch.full_like(rows[:, :1], step))
        rows.clamp_(lo, hi)
        x_adv[idx] = rows
        moved = torch.zeros_like(rows, dtype=torch.bool)
        moved.scatter_(1, p[:, None], True).scatter_(1, q[:, None], True)
        changed[idx] |= moved
        domain[idx] = rows < hi if spec.theta > 0 else rows > lo

    x_adv = x_adv.view_as(x)
    final = model.logits(x_adv)
    queries += 1
    success = goal_reached(final, y, targets, spec.targeted)
    return AttackOutput(x_adv, success, queries, gradients)
