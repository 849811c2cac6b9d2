"""Scores of an attack, computed on the tensors the client receives.

Success is judged here, on the returned ``x_adv`` (and again after 8-bit quantisation, which is what
a PNG client gets), never taken from a kernel's own loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from workers.attacks.base import flat_norm
from workers.classifier import Classifier

# A feature counts as changed in L0 when it moved by more than this fraction of the bounds' range:
# float32 noise scales with the values (about 1.5e-5 at 255), so the tolerance must too.
L0_TOLERANCE = 1e-6


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


def evaluate(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    x_adv: torch.Tensor,
    clean_pred: torch.Tensor,
    targets: torch.Tensor | None,
    batch_size: int,
) -> Evaluation:
    logits = model.predict(x_adv, batch_size)
    probs = logits.softmax(dim=1)
    adv_pred = logits.argmax(dim=1)
    reached = adv_pred == targets if targets is not None else adv_pred != y
    eligible = (clean_pred == y) & (targets != y if targets is not None else True)
    success = eligible & reached
    delta = x_adv - x
    lo, hi = model.bounds
    return Evaluation(
        adv_pred=adv_pred,
        success=success,
        confidence=probs.gather(1, adv_pred[:, None]).squeeze(1),
        linf=flat_norm(delta, "linf"),
        l2=flat_norm(delta, "l2"),
        l0=(delta.flatten(1).abs() > L0_TOLERANCE * (hi - lo)).sum(dim=1).to(x.dtype),
        rho=flat_norm(delta, "l2") / flat_norm(x, "l2").clamp_min(1e-12),
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
