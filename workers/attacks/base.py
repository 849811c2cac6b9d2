"""What every attack kernel shares: the output type, success criteria, norms and projections.

Kernels are plain batched torch functions: no Redis, no HTTP, no logging, no global RNG. They
allocate like ``x``, never move tensors between devices and never switch the model's mode.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F

Norm = Literal["linf", "l2", "l0"]
TINY = 1e-12


@dataclass(frozen=True)
class AttackOutput:
    """``x_adv`` like ``x``; per-sample ``success`` (bool), ``queries`` and ``gradients`` (int64, ``(N,)``).

    ``success`` is the kernel's own view (None where the caller asked it not to evaluate its
    output); callers re-judge it on the returned tensor.

    ``logits`` ``(N, classes)``, where a kernel keeps them: the model's logits on each returned row,
    from a forward pass the kernel made on exactly that row (in a batch of its making, which can
    round differently from another batch by about 1e-6). The job's scores take them instead of a
    forward pass of their own for the rows the final projection leaves bit for bit unchanged.
    """

    x_adv: torch.Tensor
    success: torch.Tensor | None
    queries: torch.Tensor
    gradients: torch.Tensor
    logits: torch.Tensor | None = None


StateT = TypeVar("StateT")


def take_rows(state: StateT, rows: torch.Tensor) -> StateT:
    """A copy of a dataclass of per-sample tensors (the working set of an early-stopping kernel)
    keeping only ``rows`` of each; ``None`` fields stay ``None``."""
    kept = copy.copy(state)
    for f in fields(state):  # type: ignore[arg-type]
        value: Any = getattr(state, f.name)
        if value is not None:
            setattr(kept, f.name, value[rows])
    return kept


def check_batch(x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None, targeted: bool) -> None:
    """Internal invariants of the kernel interface (user input is validated long before)."""
    assert x.ndim == 4, f"expected x of shape (N, C, H, W), got {tuple(x.shape)}"
    assert y.shape == (x.shape[0],), f"expected y of shape ({x.shape[0]},), got {tuple(y.shape)}"
    if targeted:
        assert targets is not None and targets.shape == y.shape, "targeted attacks need targets (N,)"


def goal_reached(
    logits: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None, targeted: bool
) -> torch.Tensor:
    """Untargeted: the prediction differs from ``y``; targeted: it equals ``targets``."""
    pred = logits.argmax(dim=1)
    if targeted:
        assert targets is not None
        return pred.eq(targets)
    return pred.ne(y)


def flat_norm(v: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Per-sample norm of a batch ``(N, ...)`` -> ``(N,)``."""
    flat = v.flatten(1)
    if norm == "linf":
        return flat.abs().amax(dim=1)
    if norm == "l2":
        return flat.norm(p=2, dim=1)
    return (flat != 0).sum(dim=1).to(v.dtype)


def per_sample(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape ``(N,)`` so that it broadcasts over ``like`` ``(N, ...)``."""
    return scale.view(-1, *([1] * (like.ndim - 1)))


def steepest_direction(grad: torch.Tensor, norm: Norm) -> torch.Tensor:
    """The unit-norm ascent direction for the given norm: sign for Linf, normalised for L2."""
    if norm == "linf":
        return grad.sign()
    return grad / per_sample(flat_norm(grad, "l2").clamp_min(TINY), grad)


def project(
    x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: Norm, bounds: tuple[float, float]
) -> torch.Tensor:
    """Project onto the ``eps`` ball around ``x`` and then the input box.

    Clipping to the box after the ball keeps the point inside the ball: with ``x`` inside the
    box, clipping only shrinks each coordinate of the perturbation.
    """
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        norms = flat_norm(delta, "l2")
        factor = torch.where(norms > eps, eps / norms.clamp_min(TINY), torch.ones_like(norms))
        delta = delta * per_sample(factor, delta)
    return (x + delta).clamp(bounds[0], bounds[1])


def random_start(
    x: torch.Tensor, eps: float, norm: Norm, generator: torch.Generator | None
) -> torch.Tensor:
    """A random perturbation inside the ``eps`` ball.

    Linf: uniform in the cube. L2: a uniformly random direction with a radius uniform in
    ``[0, eps]`` (not uniform in the ball's volume: in ``d`` dimensions that puts the radius at
    ``eps * u ** (1 / d)``, above ``0.99 eps`` for almost every draw when ``d = 784``, and the
    projection then only shrinks that noise, so it keeps taking part of the budget). Measured on
    fmnist-cnn, L2 PGD (eps 1.5, 20 steps of 0.15, 476 attacked test images, seeds 0-2): 459-462
    images fooled from volume-uniform starts, 466-467 from these (torchattacks' PGDL2 draws the same
    way: 465-467; no random start: 471).
    """
    if norm == "linf":
        return (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    direction = direction / per_sample(flat_norm(direction, "l2").clamp_min(TINY), direction)
    radius = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
    return direction * per_sample(radius * eps, direction)


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on logits, summed over the batch (per-sample gradients batch-independent)."""
    return F.cross_entropy(logits, labels, reduction="sum")


def counters(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    zeros = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    return zeros, zeros.clone()
