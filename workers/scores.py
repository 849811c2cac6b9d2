"""Scores of an attack, computed on the tensors the client receives.

Success is judged here, on the returned ``x_adv`` (and again after 8-bit quantisation, which is what
a PNG client gets), never taken from a kernel's own loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from workers.attacks.base import Norm, flat_norm
from workers.classifier import Classifier

# A feature counts as changed in L0 when it moved by more than this fraction of the bounds' range:
# float32 noise scales with the values (about 1.5e-5 at 255), so the tolerance must too.
L0_TOLERANCE = 1e-6
# Slack, in 8-bit levels, when deciding whether a level lies inside an eps ball: float32 inputs at 255
# carry noise of about 1.5e-5, and eps = 8/255 must keep the level 8 steps away.
BALL_SLACK_LEVELS = 1e-4


@dataclass(frozen=True)
class Evaluation:
    """Per-sample outcome ``(N,)`` tensors of one adversarial batch."""

    adv_pred: torch.Tensor
    success: torch.Tensor
    confidence: torch.Tensor
    linf: torch.Tensor
    l2: torch.Tensor
    l0: torch.Tensor
    rho: torch.Tensor
    # Inputs the success rate is taken over: classified correctly and, targeted, not already of
    # the target class (an AdvGAN generator has one target class for every input). None: the
    # correctly classified ones.
    eligible: torch.Tensor | None = None


def quantize(x: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    """Round to 256 levels over the bounds, as an 8-bit image would store it."""
    lo, hi = bounds
    return ((x - lo) / (hi - lo) * 255).round() / 255 * (hi - lo) + lo


def _level_values(k: torch.Tensor, bounds: tuple[float, float], like: torch.Tensor) -> torch.Tensor:
    """Level indices -> values, with the same arithmetic as ``quantize`` (so that a clean image
    already on the 8-bit levels comes back bit for bit)."""
    lo, hi = bounds
    return k.to(like.dtype) / 255 * (hi - lo) + lo


def quantize_in_ball(
    x_adv: torch.Tensor, x: torch.Tensor, bounds: tuple[float, float], eps: float, norm: Norm,
) -> torch.Tensor:
    """Round ``x_adv`` (N, ...) to 8-bit levels (level k is ``lo + k (hi - lo) / 255``) without
    leaving the ``norm`` ball of radius ``eps`` around ``x``.

    Plain rounding moves each value by up to half a level, which can push an example projected onto
    the ball's edge out of it (Linf 0.10196 at eps 0.1: 26/255 instead of 25.5/255). Each value
    keeps one of its two nearest levels (floor or ceil), so it moves less than one level:

    - Linf: the nearest level if it lies inside the ball, else the other one (the one toward ``x``).
    - L2: the nearest levels; if the example then lies outside the ball, the values that rounded away
      from ``x`` take their other level, those whose switch shrinks the norm most first, until it is
      back inside.

    With ``x`` on the levels (an image from a PNG or a hosted data set) the result always lies inside
    the ball, as ``x_adv`` does. Off the levels, a ball thinner than a level can hold no level at
    all; such values get the level nearer ``x`` (the caller measures the norm it ends with).
    """
    lo, hi = bounds
    t = (x_adv.double() - lo) / (hi - lo) * 255
    t_clean = (x.double() - lo) / (hi - lo) * 255
    radius = eps / (hi - lo) * 255 + BALL_SLACK_LEVELS
    floor, ceil = t.floor().clamp(0, 255), t.ceil().clamp(0, 255)
    nearest = t.round().clamp(0, 255)
    other = floor + ceil - nearest  # the other neighbour (the same level when t is one)
    dist_nearest, dist_other = (nearest - t_clean).abs(), (other - t_clean).abs()
    if norm == "linf":
        toward = torch.where(dist_other < dist_nearest, other, nearest)
        k = torch.where(dist_nearest <= radius, nearest, torch.where(dist_other <= radius, other, toward))
        return _level_values(k, bounds, x_adv)
    if norm != "l2":
        raise ValueError(f"expected norm linf or l2 for a ball, got {norm!r}")
    k = nearest.flatten(1).clone()
    squared = (dist_nearest.flatten(1) ** 2).sum(dim=1)
    outside = squared > radius**2
    if outside.any():
        rows = outside.nonzero().squeeze(1)
        # How much the squared norm shrinks when a value takes its other level (> 0: it rounded away).
        gain = (dist_nearest.flatten(1)[rows] ** 2 - dist_other.flatten(1)[rows] ** 2).clamp_min(0)
        order = gain.argsort(dim=1, descending=True)
        sorted_gain = gain.gather(1, order)
        # Switch the j-th largest gain while the norm before it is still outside the ball.
        before = squared[rows, None] - (sorted_gain.cumsum(dim=1) - sorted_gain)
        switch_sorted = (before > radius**2) & (sorted_gain > 0)
        switch = torch.zeros_like(switch_sorted).scatter(1, order, switch_sorted)
        k[rows] = torch.where(switch, other.flatten(1)[rows], k[rows])
    return _level_values(k.view_as(x_adv), bounds, x_adv)


def outside_ball(x_q: torch.Tensor, x: torch.Tensor, eps: float, norm: Norm,
                 bounds: tuple[float, float]) -> torch.Tensor:
    """Per sample ``(N,)`` bool: ``x_q`` lies outside the ``eps`` ball around ``x`` (beyond float noise)."""
    lo, hi = bounds
    return flat_norm((x_q - x).double(), norm) > eps + BALL_SLACK_LEVELS * (hi - lo) / 255


def rows_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row ``(N,)`` bool: row of ``a`` equal bit for bit to the row of ``b`` (-0.0 is not 0.0)."""
    same = (a == b) & (a.signbit() == b.signbit())
    return same.flatten(1).all(dim=1)


def logits_reusing(model: Classifier, x: torch.Tensor, batch_size: int, known_logits: torch.Tensor,
                   known: torch.Tensor) -> torch.Tensor:
    """The model's logits on ``x``: ``known_logits`` for the rows where ``known`` ``(N,)`` is True,
    a forward pass (``model.predict``, chunks of ``batch_size``) for the others only.

    Known logits come from a forward pass of the model on exactly that row (the clean pass for rows
    an attack left unchanged, the kernel's own pass, see ``AttackOutput.logits``), in another
    batch: batch-size dependent kernels round differently (fmnist-cnn on CPU: up to 6e-6 in the
    logits), so the scores equal those of a fresh forward pass to that rounding, and are the same
    on every run with the same inputs, seed and batch size."""
    assert known_logits.shape[0] == x.shape[0] == known.shape[0]
    logits = known_logits.clone()
    missing = (~known).nonzero().squeeze(1)
    if missing.numel():
        logits[missing] = model.predict(x[missing], batch_size)
    return logits


def evaluate(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    x_adv: torch.Tensor,
    clean_pred: torch.Tensor,
    targets: torch.Tensor | None,
    batch_size: int,
    logits: torch.Tensor | None = None,
) -> Evaluation:
    """Per-sample outcome of ``x_adv``; ``logits``: the model's on ``x_adv`` when already known
    (see ``logits_reusing``)."""
    if logits is None:
        logits = model.predict(x_adv, batch_size)
    probs = logits.softmax(dim=1)
    adv_pred = logits.argmax(dim=1)
    reached = adv_pred == targets if targets is not None else adv_pred != y
    eligible = (clean_pred == y) & (targets != y if targets is not None else True)
    success = eligible & reached
    delta = x_adv - x
    l2 = flat_norm(delta, "l2")
    lo, hi = model.bounds
    return Evaluation(
        adv_pred=adv_pred,
        success=success,
        confidence=probs.gather(1, adv_pred[:, None]).squeeze(1),
        linf=flat_norm(delta, "linf"),
        l2=l2,
        l0=(delta.flatten(1).abs() > L0_TOLERANCE * (hi - lo)).sum(dim=1).to(x.dtype),
        rho=l2 / flat_norm(x, "l2").clamp_min(1e-12),
        eligible=eligible,
    )


def _stats(values: torch.Tensor) -> dict[str, float | None]:
    if values.numel() == 0:
        return {"mean": None, "median": None}
    values = values.double()
    return {"mean": float(values.mean()), "median": float(values.median())}


def _mean(values: torch.Tensor) -> float | None:
    return float(values.double().mean()) if values.numel() else None


def summarize(
    ev: Evaluation,
    y: torch.Tensor,
    clean_pred: torch.Tensor,
    labels_given: bool,
    minimal: bool,
) -> dict[str, Any]:
    """The DESIGN.md score block for one evaluation (without cost counters)."""
    correct = clean_pred == y
    ok = ev.success
    n_eligible = int((ev.eligible if ev.eligible is not None else correct).sum())
    return {
        "n": int(y.numel()),
        "labels": "given" if labels_given else "predicted",
        "clean_accuracy": _mean(correct) if labels_given else None,
        "robust_accuracy": _mean(ev.adv_pred == y),
        "success_rate": float(ok.sum()) / n_eligible if n_eligible else None,
        "successes": int(ok.sum()),
        "perturbation": {
            "linf": _stats(ev.linf[ok]),
            "l2": _stats(ev.l2[ok]),
            "l0": _stats(ev.l0[ok]),
        },
        "rho": _mean(ev.rho[ok]) if minimal else None,
        "confidence": _mean(ev.confidence[ok]),
    }
