"""Square Attack (Linf and L2): score-based black-box random search, batched over samples.

Andriushchenko, Croce, Flammarion, Hein, "Square Attack: a query-efficient black-box adversarial
attack via random search", ECCV 2020. Only ``model.logits`` is queried (no gradients). Each
iteration proposes, for every sample still being attacked, a change of the perturbation inside
one random square window; the proposal is kept only if it lowers the loss (the margin
``z_y - max_{k != y} z_k`` untargeted, the cross-entropy towards the target when targeted).

* Linf: the start is a vertical-stripe pattern (each column of each channel at ``+-eps``); a
  proposal sets the square to ``+-eps`` per channel. A proposal that would leave the image
  unchanged is redrawn (as in the authors' code), so no query is wasted on a no-op.
* L2: the start is a grid of "pseudo-Gaussian" tiles of random sign rescaled to norm ``eps``; a
  proposal moves the mass of a second window into a new pseudo-Gaussian bump in the first, then
  rescales the whole perturbation to norm ``eps``.
* The square side follows the paper's schedule of the fraction ``p`` of pixels changed, halved at
  fixed fractions of ``max_queries`` (the authors' schedule rescaled to the budget).

What differs from the reference code, and why: the square position, its signs and the bump
orientation are drawn per sample (the reference draws one position for the whole batch), from
``generator`` and for the full batch, so a sample's result does not depend on the others (the side
comes from the schedule and is the same for every active sample, as all run the same iteration);
all positions with the square inside the image are possible; with ``early_stop=False`` a successful
sample only accepts proposals that keep it successful (a lower cross-entropy alone could lose the
target).

Queries: one for the clean input, one for the start, one per iteration; a sample stops as soon as
it reaches the goal (``early_stop``) or has spent ``max_queries``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from workers.attacks.base import (
    TINY,
    AttackOutput,
    check_batch,
    counters,
    flat_norm,
    goal_reached,
    per_sample,
    project,
)
from workers.classifier import Classifier

# Proposals drawn per iteration for the Linf no-op redraw; if all are no-ops, the signs of the first
# are flipped in every channel, which always changes the image.
LINF_REDRAWS = 4
# Fractions of the budget (per 10 000) after which ``p`` halves again (the authors' schedule).
P_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


@dataclass(frozen=True)
class SquareSpec:
    """``eps`` in input units of ``norm``; ``max_queries`` per sample, the clean query included;
    ``p_init`` the initial fraction of pixels a square covers (None: 0.8 for Linf, 0.1 for L2)."""

    eps: float
    norm: Literal["linf", "l2"] = "linf"
    max_queries: int = 5000
    p_init: float | None = None
    targeted: bool = False
    early_stop: bool = True

    @property
    def p(self) -> float:
        if self.p_init is not None:
            return self.p_init
        return 0.8 if self.norm == "linf" else 0.1


def p_schedule(p_init: float, iteration: int, max_queries: int) -> float:
    """The fraction of pixels changed at ``iteration``: ``p_init`` halved at each step passed."""
    rescaled = int(iteration / max_queries * 10000)
    halvings = sum(rescaled > edge for edge in P_SCHEDULE)
    return p_init / 2**halvings


def square(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: SquareSpec,
    *,
    targets: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> AttackOutput:
    """Square Attack on a batch; forward queries only.

    Args:
        model: the classifier; bounds come from it. Only ``model.logits`` is called.
        x: inputs ``(N, C, H, W)`` inside ``model.bounds``.
        y: true labels ``(N,)``; samples already misclassified are returned unchanged.
        spec: ``eps`` (input units), ``norm``, ``max_queries`` (per sample), ``p_init``,
            ``targeted``, ``early_stop``.
        targets: target classes ``(N,)`` when ``spec.targeted``.
        generator: source of every random draw (on ``x``'s device).

    Returns:
        ``AttackOutput`` whose ``x_adv`` is the lowest-loss point queried for each sample (inside
        the ``eps`` ball and the bounds); ``gradients`` is all zeros.

    Example:
        >>> out = square(model, x, y, SquareSpec(eps=0.1), generator=torch.Generator().manual_seed(0))
    """
    check_batch(x, y, targets, spec.targeted)
    assert spec.norm in ("linf", "l2"), f"expected norm linf or l2, got {spec.norm}"
    assert spec.eps > 0 and spec.max_queries >= 1, "expected eps > 0 and max_queries >= 1"
    goal = targets if spec.targeted and targets is not None else y
    queries, gradients = counters(x)
    x_best = x.clone()

    logits = model.logits(x)
    queries += 1
    success = goal_reached(logits, y, targets, spec.targeted)
    # Only inputs classified correctly (and not already at the goal) are attacked.
    attacked = (logits.argmax(dim=1) == y) & ~success
    if spec.max_queries < 2 or not bool(attacked.any()):
        return AttackOutput(x_best, success, queries, gradients)

    # The start, drawn for the full batch and queried only for the attacked samples.
    start = _linf_start(model, x, spec.eps, generator) if spec.norm == "linf" else (
        _l2_start(model, x, spec.eps, generator))
    idx = attacked.nonzero().squeeze(1)
    x0, g0, x_cur = x[idx], goal[idx], start[idx]
    logits = model.logits(x_cur)
    queries[idx] += 1
    loss, hit = _loss(logits, g0, spec.targeted), goal_reached(logits, g0, g0, spec.targeted)
    x_best[idx], success[idx] = x_cur, hit

    for iteration in range(spec.max_queries - 2):
        if spec.early_stop and bool(hit.any()):
            keep = ~hit
            idx, x0, g0, x_cur, loss, hit = idx[keep], x0[keep], g0[keep], x_cur[keep], loss[keep], hit[keep]
        if idx.numel() == 0:
            break
        p = p_schedule(spec.p, iteration, spec.max_queries)
        if spec.norm == "linf":
            x_new = _linf_proposal(model, x, x0, x_cur, idx, spec.eps, p, generator)
        else:
            x_new = _l2_proposal(model, x, x0, x_cur, idx, spec.eps, p, generator)
        logits = model.logits(x_new)
        queries[idx] += 1
        new_loss = _loss(logits, g0, spec.targeted)
        new_hit = goal_reached(logits, g0, g0, spec.targeted)
        # Only improving moves, and never one that loses the goal (matters without early stop).
        better = (new_loss < loss) & (new_hit | ~hit)
        x_cur = torch.where(per_sample(better, x_cur), x_new, x_cur)
        loss = torch.where(better, new_loss, loss)
        hit = hit | (better & new_hit)
        x_best[idx] = x_cur
        success[idx] = hit
    return AttackOutput(x_best, success, queries, gradients)


def _loss(logits: torch.Tensor, goal: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Per-sample loss to minimise: cross-entropy towards the target, or the margin of the label."""
    if targeted:
        return F.cross_entropy(logits, goal, reduction="none")
    own = logits.gather(1, goal[:, None]).squeeze(1)
    others = logits.scatter(1, goal[:, None], float("-inf")).amax(dim=1)
    return own - others


def _side(p: float, x: torch.Tensor, smallest: int) -> int:
    """Square side covering a fraction ``p`` of the pixels, between ``smallest`` and the image size - 1."""
    _, _, h, w = x.shape
    side = max(int(round(math.sqrt(p * h * w))), smallest)
    return max(1, min(side, min(h, w) - 1))


def _corners(x: torch.Tensor, side: int, generator: torch.Generator | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left corners ``(N,)`` of a ``side`` square, uniform over the positions inside the image."""
    n, _, h, w = x.shape
    rows = torch.randint(0, h - side + 1, (n,), generator=generator, device=x.device)
    cols = torch.randint(0, w - side + 1, (n,), generator=generator, device=x.device)
    return rows, cols


def _window_mask(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, side: int) -> torch.Tensor:
    """Boolean ``(n, 1, H, W)``: inside each sample's square."""
    _, _, h, w = x.shape
    r = torch.arange(h, device=x.device)[None, :]
    c = torch.arange(w, device=x.device)[None, :]
    in_rows = (r >= rows[:, None]) & (r < rows[:, None] + side)
    in_cols = (c >= cols[:, None]) & (c < cols[:, None] + side)
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


def _random_signs(shape: tuple[int, ...], x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    bits = torch.randint(0, 2, shape, generator=generator, device=x.device)
    return bits.to(x.dtype) * 2 - 1


# --- Linf ----------------------------------------------------------------------------------------


def _linf_start(model: Classifier, x: torch.Tensor, eps: float, generator: torch.Generator | None
                ) -> torch.Tensor:
    """Vertical stripes: every column of every channel shifted by ``+eps`` or ``-eps``."""
    n, c, _, w = x.shape
    stripes = _random_signs((n, c, 1, w), x, generator) * eps
    return project(x + stripes, x, eps, "linf", model.bounds)


def _linf_proposal(model: Classifier, x_full: torch.Tensor, x0: torch.Tensor, x_cur: torch.Tensor,
                   idx: torch.Tensor, eps: float, p: float, generator: torch.Generator | None
                   ) -> torch.Tensor:
    """Set one square per sample to ``+-eps`` per channel; redraw the signs of a no-op proposal."""
    n_full, c = x_full.shape[:2]
    side = _side(p, x_full, 1)
    rows, cols = _corners(x_full, side, generator)
    signs = _random_signs((n_full, LINF_REDRAWS, c), x_full, generator)
    rows, cols, signs = rows[idx], cols[idx], signs[idx]
    mask = _window_mask(x0, rows, cols, side)
    # The first proposal that changes the image; flipping every channel of the first always does.
    # All LINF_REDRAWS proposals are built at once (n, R, C, H, W): a handful of tensor operations
    # per iteration, whatever R, which is what the small batches of the last iterations pay for.
    candidates = project(x0[:, None] + eps * signs[..., None, None], x0[:, None], eps, "linf", model.bounds)
    lo, hi = model.bounds
    changed = ((candidates - x_cur[:, None]).abs() * mask[:, None]).flatten(2).amax(dim=2) > 1e-7 * (hi - lo)
    first = changed.to(torch.uint8).argmax(dim=1)
    rows_n = torch.arange(idx.numel(), device=x0.device)
    chosen = torch.where(changed.any(dim=1)[:, None], signs[rows_n, first], -signs[:, 0])
    candidate = project(x0 + eps * chosen[:, :, None, None], x0, eps, "linf", model.bounds)
    return torch.where(mask, candidate, x_cur)


# --- L2 ------------------------------------------------------------------------------------------


def _bump(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """Unit-norm ``(rows, cols)`` pseudo-Gaussian: nested rectangles weighted ``1 / (k + 1)^2``."""
    out = torch.zeros(rows, cols, dtype=like.dtype, device=like.device)
    if rows == 0 or cols == 0:
        return out
    r0, c0 = rows // 2, cols // 2
    for k in range(max(r0, c0) + 1):
        out[max(r0 - k, 0):min(r0 + k + 1, rows), max(c0 - k, 0):min(c0 + k + 1, cols)] += 1.0 / (k + 1) ** 2
    return out / out.norm()


def _pattern(side: int, like: torch.Tensor) -> torch.Tensor:
    """The paper's L2 update shape: a positive bump over a negative one, unit norm, ``(side, side)``."""
    half = side // 2
    out = torch.cat([_bump(half, side, like), -_bump(side - half, side, like)], dim=0)
    return out / out.norm().clamp_min(TINY)


def _oriented(pattern: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """``(n, s, s)``: the pattern, transposed where ``flip`` (``(n,)`` bool)."""
    return torch.where(flip[:, None, None], pattern.T[None], pattern[None])


def _l2_start(model: Classifier, x: torch.Tensor, eps: float, generator: torch.Generator | None
              ) -> torch.Tensor:
    """A centred grid of ``min(H, W) // 5``-sided tiles, each a pattern of random sign per channel, at
    norm ``eps``.

    Each axis holds as many whole tiles as fit, centred on it: 5 x 5 tiles on a square image (as in
    the authors' code), more along the long side of a rectangular one (an offset computed from 5
    tiles for both axes, as there, would leave a band of a 24x40 image without any).
    """
    n, c, h, w = x.shape
    side = max(min(h, w) // 5, 1)
    pattern = _pattern(side, x)
    count_r, count_c = h // side, w // side
    top, left = (h - count_r * side) // 2, (w - count_c * side) // 2
    tiles_r = [top + i * side for i in range(count_r)]
    tiles_c = [left + j * side for j in range(count_c)]
    flips = torch.rand(n, len(tiles_r), len(tiles_c), generator=generator, device=x.device) > 0.5
    signs = _random_signs((n, len(tiles_r), len(tiles_c), c), x, generator)
    delta = torch.zeros_like(x)
    for i, r in enumerate(tiles_r):
        for j, q in enumerate(tiles_c):
            tile = _oriented(pattern, flips[:, i, j])[:, None] * signs[:, i, j, :, None, None]
            delta[:, :, r:r + side, q:q + side] += tile
    delta = delta * per_sample(eps / flat_norm(delta, "l2").clamp_min(TINY), delta)
    return project(x + delta, x, eps, "l2", model.bounds)


Window = tuple[torch.Tensor, slice, torch.Tensor, torch.Tensor]


def _window_index(rows: torch.Tensor, cols: torch.Tensor, side: int) -> Window:
    """Advanced index of each sample's square: ``t[window]`` has shape ``(n, s, s, C)``."""
    steps = torch.arange(side, device=rows.device)
    sample = torch.arange(rows.numel(), device=rows.device)[:, None, None]
    return sample, slice(None), (rows[:, None] + steps)[:, :, None], (cols[:, None] + steps)[:, None, :]


def _l2_proposal(model: Classifier, x_full: torch.Tensor, x0: torch.Tensor, x_cur: torch.Tensor,
                 idx: torch.Tensor, eps: float, p: float, generator: torch.Generator | None
                 ) -> torch.Tensor:
    """Move the mass of window 2 and window 1 into a fresh bump in window 1; rescale to norm ``eps``."""
    n_full, c = x_full.shape[:2]
    side = _side(p, x_full, 3)
    if side % 2 == 0 and side + 1 < min(x_full.shape[2:]):
        side += 1  # odd sides, as in the paper, so the bump has a centre pixel
    rows1, cols1 = _corners(x_full, side, generator)
    rows2, cols2 = _corners(x_full, side, generator)
    flips = torch.rand(n_full, generator=generator, device=x_full.device) > 0.5
    signs = _random_signs((n_full, c), x_full, generator)
    rows1, cols1, rows2, cols2, flips, signs = (t[idx] for t in (rows1, cols1, rows2, cols2, flips, signs))

    delta = x_cur - x0
    win1 = _window_index(rows1, cols1, side)
    win2 = _window_index(rows2, cols2, side)
    both = _window_mask(x0, rows1, cols1, side) | _window_mask(x0, rows2, cols2, side)
    old = delta[win1].permute(0, 3, 1, 2)  # (n, C, s, s)
    old_norm = old.flatten(2).norm(dim=2)  # per channel (n, C)
    image_norm = flat_norm(delta, "l2")
    windows_norm = (delta * both).flatten(2).norm(dim=2)  # per channel, union of both windows
    # Budget for the new window: what both windows hold plus the share of eps still unused.
    budget = ((eps**2 - image_norm**2).clamp_min(0)[:, None] / c + windows_norm**2).sqrt()
    new = _oriented(_pattern(side, x0), flips)[:, None] * signs[:, :, None, None]
    new = new + old / (old_norm[:, :, None, None] + 1e-10)
    new = new * (budget / new.flatten(2).norm(dim=2).clamp_min(TINY))[:, :, None, None]
    delta = delta.clone()
    delta[win2] = 0.0
    delta[win1] = new.permute(0, 2, 3, 1)
    delta = delta * per_sample(eps / flat_norm(delta, "l2").clamp_min(TINY), delta)
    return project(x0 + delta, x0, eps, "l2", model.bounds)
