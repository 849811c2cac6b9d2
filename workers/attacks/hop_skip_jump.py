"""HopSkipJump (L2 and Linf): decision-based minimal-perturbation attack, batched over samples and probes.

Chen, Jordan, Wainwright, "HopSkipJumpAttack: A Query-Efficient Decision-Based Attack", IEEE S&P
2020. The attack only sees the predicted label (the argmax of ``model.logits``). From an
adversarial start it repeats: estimate the direction of the gradient of the decision at the
current boundary point from the signs of ``num_evals`` random probes (with the paper's baseline
subtraction), step along it (L2: the unit direction; Linf: its sign) with a geometric step-size
search that halves the step until the point is adversarial, then binary-search back to the boundary
on the segment towards ``x`` (L2) or by shrinking the Linf box around ``x`` (Linf). ``num_evals``
grows as ``initial_num_evals * sqrt(t)``; the binary-search tolerance is ``theta = gamma / d^1.5``
(L2) or ``gamma / d^2`` (Linf), ``d`` the input dimension, as in the paper.

Starting points: untargeted, uniform noise in the bounds (up to ``INIT_TRIES`` draws per sample,
stopping at the first adversarial one), then, for samples whose noise never crossed, the nearest
(L2) input of the batch that the model classifies differently from the sample's label; targeted,
the nearest input of the batch that the model already classifies as the target, else uniform
noise classified as the target. A line search from ``x`` then brings the start to the boundary.
Samples without a start are returned unchanged and unsuccessful. Starts taken from the batch make
a sample's result depend on the other inputs: that is the point of them.

What differs from the reference code, and why:
* every phase is batched over the samples still running: probe decisions are one forward of up to
  ``PROBE_IMAGES`` images (samples x probes), and the step-size and binary searches query all
  samples together, each sample stopping when its own search has converged;
* every query is counted per sample and a sample never exceeds ``max_queries`` (the clean query
  included): the number of probes of the last iteration shrinks to what is left after reserving
  the step, the binary search and the back-off query (below), and a sample stops when it cannot
  afford another iteration;
* the kernel returns the adversarial point of smallest distance found (HopSkipJump is not
  monotone), and every returned point is one the model has classified adversarial;
* each boundary point found is also scaled out from ``x`` by ``1 + BACKOFF`` (0.1 %) and queried
  once: the returned point is that one, which keeps a logit margin, so success does not flip when
  a caller re-judges it in another batch composition (the boundary points themselves sit within
  float noise of the boundary). The iteration itself continues from the boundary point.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from workers.attacks.base import TINY, AttackOutput, check_batch, counters, flat_norm, goal_reached, per_sample
from workers.classifier import Classifier

# ``point(a, sel)``: the image at bracket position ``a`` for the rows ``sel`` of a search.
Point = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Uniform-noise draws per sample when looking for an adversarial start.
INIT_TRIES = 100
# Tolerance of the first line search of a Linf start, before the Linf binary search (reference code).
INIT_LINE_TOLERANCE = 1e-3
# Most probe images drawn at once (and forwarded at once on an accelerator), and most elements.
PROBE_IMAGES = 4096
PROBE_ELEMENTS = 1 << 26
# On CPU the forward is split into smaller batches: the small CNN runs ~1.7x faster per image at
# 256 than at 4096 (cache); results do not depend on it.
CPU_FORWARD_BATCH = 256
# Relative distance by which a returned point sits outside the boundary found (see ``back_off``).
BACKOFF = 1e-3
# Halvings of the step size before a sample gives up (its current point is adversarial, so a
# small enough step always is; this only guards against a decision that flickers).
MAX_HALVINGS = 40


@dataclass(frozen=True)
class HopSkipJumpSpec:
    """``steps`` iterations at most; ``max_queries`` per sample, the clean query included; probes per
    iteration ``min(initial_num_evals * sqrt(t), max_num_evals)``; ``gamma`` sets the binary-search
    tolerance."""

    norm: Literal["l2", "linf"] = "l2"
    max_queries: int = 5000
    steps: int = 40
    initial_num_evals: int = 100
    max_num_evals: int = 10000
    gamma: float = 1.0
    targeted: bool = False


def hop_skip_jump(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: HopSkipJumpSpec,
    *,
    targets: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> AttackOutput:
    """HopSkipJump on a batch; only the predicted label is used.

    Args:
        model: the classifier; bounds come from it. Only ``model.logits(x).argmax(1)`` is used.
        x: inputs ``(N, C, H, W)`` inside ``model.bounds``.
        y: true labels ``(N,)``; samples already misclassified are returned unchanged.
        spec: ``norm`` (``l2`` or ``linf``), ``max_queries`` (per sample), ``steps`` (iterations),
            ``initial_num_evals``, ``max_num_evals``, ``gamma``, ``targeted``.
        targets: target classes ``(N,)`` when ``spec.targeted``.
        generator: source of every random draw (on ``x``'s device).

    Returns:
        ``AttackOutput`` whose ``x_adv`` is, per sample, the adversarial point nearest to ``x`` in
        ``spec.norm`` that the attack found (``x`` itself where none was found); ``gradients`` is
        all zeros.

    Example:
        >>> out = hop_skip_jump(model, x, y, HopSkipJumpSpec(norm="l2", max_queries=2000),
        ...                     generator=torch.Generator().manual_seed(0))
    """
    check_batch(x, y, targets, spec.targeted)
    assert spec.norm in ("l2", "linf"), f"expected norm l2 or linf, got {spec.norm}"
    assert spec.max_queries >= 1 and spec.steps >= 0 and spec.gamma > 0
    assert 1 <= spec.initial_num_evals <= spec.max_num_evals
    run = _Run(model, x, y, targets, spec)
    logits = model.logits(x)
    run.queries += 1
    pred = logits.argmax(dim=1)
    success = goal_reached(logits, y, targets, spec.targeted)
    x_best = x.clone()
    attacked = (pred == y) & ~success
    if not bool(attacked.any()):
        return AttackOutput(x_best, success, run.queries, run.gradients)

    # A separate stream for the start search, seeded from ``generator``: how many noise rounds run
    # depends on the batch, and the probe draws that follow must not.
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=x.device)
    init_gen = torch.Generator(device=x.device).manual_seed(int(seed)) if generator is not None else None

    has_start, start = run.starts(attacked, pred, init_gen)
    idx = has_start.nonzero().squeeze(1)
    cur = run.line_search(idx, start[idx])
    if spec.norm == "linf":
        cur = run.box_search(idx, cur)
    safe, kept = run.back_off(idx, cur)
    x_best[idx] = safe
    success[idx] = True
    alive = torch.zeros_like(attacked)
    alive[idx] = True

    current = x.clone()
    current[idx] = cur
    dist = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    dist[idx] = flat_norm(cur - x[idx], spec.norm)
    best_dist = torch.zeros_like(dist)
    best_dist[idx] = flat_norm(safe - x[idx], spec.norm)
    # Whether the best point has its back-off margin; a point with one is preferred to a nearer one
    # without (only the last search of a sample, cut short by the budget, can lack it).
    best_kept = torch.zeros_like(attacked)
    best_kept[idx] = kept
    for t in range(spec.steps):
        idx = (alive & (run.queries < spec.max_queries)).nonzero().squeeze(1)
        n_evals = min(int(spec.initial_num_evals * math.sqrt(t + 1)), spec.max_num_evals)
        # Reserve one step-size query, a full binary search and its back-off query; probes get the
        # rest of the budget.
        left = spec.max_queries - run.queries[idx]
        counts = (left - 2 - run.search_steps).clamp(max=n_evals)
        alive[idx[counts < 1]] = False
        keep = counts >= 1
        idx, counts = idx[keep], counts[keep]
        if idx.numel() == 0:
            break
        cur = current[idx]
        if t == 0:
            delta = torch.full_like(dist[idx], 0.1 * (run.hi - run.lo))
        else:
            delta = dist[idx] * (math.sqrt(run.dims) if spec.norm == "l2" else run.dims) * run.theta
        grad = run.estimate_gradient(idx, cur, counts, delta.clamp_min(TINY), n_evals, generator)
        update = grad.sign() if spec.norm == "linf" else grad
        stepped, found = run.step_search(idx, cur, update, dist[idx] / math.sqrt(t + 1))
        alive[idx[~found]] = False
        idx, stepped = idx[found], stepped[found]
        if idx.numel() == 0:
            break
        cur = run.line_search(idx, stepped) if spec.norm == "l2" else run.box_search(idx, stepped)
        safe, kept = run.back_off(idx, cur)
        current[idx] = cur
        dist[idx] = flat_norm(cur - x[idx], spec.norm)
        safe_dist = flat_norm(safe - x[idx], spec.norm)
        was_kept = best_kept[idx]
        better = (kept & ~was_kept) | ((kept == was_kept) & (safe_dist < best_dist[idx]))
        x_best[idx[better]] = safe[better]
        best_dist[idx[better]] = safe_dist[better]
        best_kept[idx[better]] = kept[better]
    return AttackOutput(x_best, success, run.queries, run.gradients)


class _Run:
    """The state shared by the phases of one call: model, batch, goal, budget and query counters."""

    def __init__(self, model: Classifier, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None,
                 spec: HopSkipJumpSpec) -> None:
        self.model, self.x, self.y, self.targets, self.spec = model, x, y, targets, spec
        self.lo, self.hi = model.bounds
        self.dims = x[0].numel()
        self.theta = spec.gamma / (self.dims ** 1.5 if spec.norm == "l2" else self.dims**2)
        # Queries of one binary search to tolerance theta (the Linf one is relative to the distance).
        self.search_steps = max(1, math.ceil(math.log2(1.0 / self.theta)))
        self.queries, self.gradients = counters(x)
        self.forward_batch = CPU_FORWARD_BATCH if x.device.type == "cpu" else PROBE_IMAGES

    # --- decisions -------------------------------------------------------------------------------

    def adversarial(self, images: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
        """Whether each image reaches its owner's goal; one query charged to each owner (``(n,)`` ids)."""
        pred = torch.cat([self.model.logits(part).argmax(dim=1) for part in images.split(self.forward_batch)])
        self.queries.index_add_(0, owners, torch.ones_like(owners))
        if self.spec.targeted:
            assert self.targets is not None
            return pred == self.targets[owners]
        return pred != self.y[owners]

    def left(self, idx: torch.Tensor) -> torch.Tensor:
        return self.spec.max_queries - self.queries[idx]

    # --- starting points -------------------------------------------------------------------------

    def starts(self, attacked: torch.Tensor, pred: torch.Tensor, init_gen: torch.Generator | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(has_start (N,), start like x)``: adversarial points for the attacked samples."""
        x = self.x
        start = x.clone()
        has = torch.zeros_like(attacked)
        if self.spec.targeted:
            self._from_batch(attacked, has, start, pred)
        for _ in range(INIT_TRIES):
            idx = (attacked & ~has & (self.queries < self.spec.max_queries)).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            noise = torch.rand(x.shape, generator=init_gen, device=x.device, dtype=x.dtype)
            noise = (self.lo + (self.hi - self.lo) * noise)[idx]
            adv = self.adversarial(noise, idx)
            start[idx[adv]] = noise[adv]
            has[idx[adv]] = True
        if not self.spec.targeted:
            self._from_batch(attacked, has, start, pred)
        return has, start

    def _from_batch(self, attacked: torch.Tensor, has: torch.Tensor, start: torch.Tensor,
                    pred: torch.Tensor) -> None:
        """Fill in, for attacked samples without a start, the nearest input of the batch whose clean
        prediction (already queried) reaches their goal."""
        idx = (attacked & ~has).nonzero().squeeze(1)
        if idx.numel() == 0:
            return
        if self.spec.targeted:
            assert self.targets is not None
            usable = pred[None, :] == self.targets[idx][:, None]
        else:
            usable = pred[None, :] != self.y[idx][:, None]
        dists = torch.cdist(self.x[idx].flatten(1), self.x.flatten(1))
        dists = dists.masked_fill(~usable, float("inf"))
        nearest = dists.argmin(dim=1)
        ok = usable.any(dim=1)
        start[idx[ok]] = self.x[nearest[ok]]
        has[idx[ok]] = True

    # --- searches --------------------------------------------------------------------------------

    def line_search(self, idx: torch.Tensor, far: torch.Tensor) -> torch.Tensor:
        """Bisect ``x + a (far - x)`` over ``a`` in [0, 1] (``far`` adversarial) to the boundary."""
        x0 = self.x[idx]
        tol = self.theta if self.spec.norm == "l2" else INIT_LINE_TOLERANCE
        high = torch.ones(idx.numel(), dtype=x0.dtype, device=x0.device)
        return self._bisect(idx, far, high, torch.full_like(high, tol),
                            lambda a, sel: (x0[sel] + per_sample(a, x0[sel]) * (far[sel] - x0[sel])))

    def box_search(self, idx: torch.Tensor, far: torch.Tensor) -> torch.Tensor:
        """Bisect the radius ``r`` of the Linf box ``[x - r, x + r]`` that ``far`` is clipped into."""
        x0 = self.x[idx]
        high = flat_norm(far - x0, "linf")
        # The reference's min(r * theta, theta), its absolute part in units of the bounds' range
        # (the reference assumes [0, 1] images): the same search on [0, 255] inputs.
        tol = torch.minimum(high * self.theta, torch.full_like(high, self.theta * (self.hi - self.lo)))

        def project(r: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
            radius = per_sample(r, x0[sel])
            return torch.minimum(torch.maximum(far[sel], x0[sel] - radius), x0[sel] + radius)

        return self._bisect(idx, far, high, tol, project)

    def _bisect(self, idx: torch.Tensor, far: torch.Tensor, high: torch.Tensor, tol: torch.Tensor,
                point: Point) -> torch.Tensor:
        """Bisect ``point(a)`` over ``a`` in ``[0, high]`` (``point(high) = far``, adversarial) until the
        bracket is narrower than ``tol``; return its adversarial end, exactly as queried."""
        low = torch.zeros_like(high)
        adv_point = far.clone()
        # Enough rounds for the widest bracket; the budget or float resolution usually ends it first.
        rounds = self.search_steps + 64
        for _ in range(rounds):
            open_ = ((high - low) > tol) & (self.left(idx) > 0)
            sel = open_.nonzero().squeeze(1)
            if sel.numel() == 0:
                break
            mid = (high[sel] + low[sel]) / 2
            stalled = (mid >= high[sel]) | (mid <= low[sel])  # float resolution reached
            if bool(stalled.any()):
                tol[sel[stalled]] = float("inf")
                sel, mid = sel[~stalled], mid[~stalled]
                if sel.numel() == 0:
                    continue
            images = point(mid, sel).clamp(self.lo, self.hi)
            adv = self.adversarial(images, idx[sel])
            high[sel[adv]] = mid[adv]
            adv_point[sel[adv]] = images[adv]
            low[sel[~adv]] = mid[~adv]
        return adv_point

    def back_off(self, idx: torch.Tensor, boundary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x + (1 + BACKOFF) (boundary - x)`` where that is adversarial (one query), else ``boundary``;
        and whether the margin was kept.

        Success is judged on the returned tensor in whatever batch a caller forms, and a point within
        float noise of the boundary can flip between batch compositions (measured: 6 of 96 Linf
        points flipped when re-judged one image at a time). Scaling the whole perturbation moves the
        logits by about BACKOFF times the clean margin, for a relative cost of BACKOFF in distance
        in either norm.
        """
        safe, kept = boundary.clone(), torch.zeros(idx.numel(), dtype=torch.bool, device=boundary.device)
        sel = (self.left(idx) > 0).nonzero().squeeze(1)
        if sel.numel():
            x0 = self.x[idx[sel]]
            images = (x0 + (1 + BACKOFF) * (boundary[sel] - x0)).clamp(self.lo, self.hi)
            adv = self.adversarial(images, idx[sel])
            safe[sel[adv]] = images[adv]
            kept[sel[adv]] = True
        return safe, kept

    def step_search(self, idx: torch.Tensor, cur: torch.Tensor, update: torch.Tensor, step: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Geometric step-size search: halve ``step`` until ``cur + step * update`` is adversarial."""
        stepped = cur.clone()
        found = torch.zeros(idx.numel(), dtype=torch.bool, device=cur.device)
        step = step.clone()
        for _ in range(MAX_HALVINGS):
            sel = (~found & (self.left(idx) > 0)).nonzero().squeeze(1)
            if sel.numel() == 0:
                break
            images = (cur[sel] + per_sample(step[sel], cur[sel]) * update[sel]).clamp(self.lo, self.hi)
            adv = self.adversarial(images, idx[sel])
            stepped[sel[adv]] = images[adv]
            found[sel[adv]] = True
            step[sel[~adv]] /= 2
        return stepped, found

    # --- gradient direction ----------------------------------------------------------------------

    def estimate_gradient(self, idx: torch.Tensor, cur: torch.Tensor, counts: torch.Tensor, delta: torch.Tensor,
                          n_evals: int, generator: torch.Generator | None) -> torch.Tensor:
        """Unit-L2 estimate ``(n, C, H, W)`` of the decision gradient at ``cur`` from ``counts[i]`` probes.

        Probes ``u`` are Gaussian (L2) or uniform in [-1, 1] (Linf), normalised; the image
        ``clip(cur + delta u)`` is queried and the effective ``u`` recomputed after clipping. With
        ``f = +-1`` the decisions, the estimate is ``mean((f - mean f) u)``, or ``mean(f u)`` when
        all decisions agree (the paper's baseline). Draws are for the full batch, chunk by chunk.
        """
        x = self.x
        n_full, shape = x.shape[0], x.shape[1:]
        per_chunk = max(1, min(PROBE_IMAGES, PROBE_ELEMENTS // self.dims) // n_full)
        weighted = torch.zeros_like(cur)  # sum of f u
        plain = torch.zeros_like(cur)  # sum of u
        f_sum = torch.zeros(idx.numel(), dtype=x.dtype, device=x.device)
        ones = [1] * len(shape)
        scale = delta.view(-1, 1, *ones)
        for first in range(0, n_evals, per_chunk):
            k = min(per_chunk, n_evals - first)
            draw = torch.randn if self.spec.norm == "l2" else torch.rand
            probes = draw((n_full, k, *shape), generator=generator, device=x.device, dtype=x.dtype)
            if self.spec.norm == "linf":
                probes = probes * 2 - 1
            use = (first + torch.arange(k, device=x.device))[None, :] < counts[:, None]  # (n, k)
            if not bool(use.any()):
                continue
            probes = probes[idx]
            probes = probes / probes.flatten(2).norm(dim=2).clamp_min(TINY).view(*use.shape, *ones)
            images = (cur[:, None] + scale * probes).clamp(self.lo, self.hi)
            probes = (images - cur[:, None]) / scale
            rows, cols = use.nonzero(as_tuple=True)
            adv = self.adversarial(images[rows, cols], idx[rows])
            f = torch.zeros(use.shape, dtype=x.dtype, device=x.device)
            f[rows, cols] = adv.to(x.dtype) * 2 - 1
            weighted += (f.view(*use.shape, *ones) * probes).sum(dim=1)
            plain += (use.to(x.dtype).view(*use.shape, *ones) * probes).sum(dim=1)
            f_sum += f.sum(dim=1)
        mean_f = f_sum / counts.to(x.dtype)
        agree = mean_f.abs() == 1
        grad = torch.where(per_sample(agree, cur), weighted, weighted - per_sample(mean_f, cur) * plain)
        return grad / per_sample(flat_norm(grad, "l2").clamp_min(TINY), grad)

