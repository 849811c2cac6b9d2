"""Training kernels for the defenses: standard, FGSM- and PGD-adversarial, and distillation.

- ``objective="fgsm"``: Goodfellow, Shlens, Szegedy, "Explaining and Harnessing Adversarial
  Examples", ICLR 2015. Minimises ``alpha * J(x, y) + (1 - alpha) * J(x + eps * sign(grad_x J(x, y)), y)``,
  the FGSM point recomputed with the current parameters at every step.
- ``objective="pgd"``: Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models
  Resistant to Adversarial Attacks", ICLR 2018. Minimises ``J`` on Linf PGD examples only (random
  start in the ``eps`` cube, ``pgd_steps`` sign-gradient steps, no early stop).
- ``temperature`` and soft labels: Papernot, McDaniel, Wu, Jha, Swami, "Distillation as a Defense to
  Adversarial Perturbations against Deep Neural Networks", IEEE S&P 2016. The teacher's
  ``softmax(logits / T)`` (``soft_labels``) are the student's targets, trained at the same ``T``.

``J`` is the cross-entropy of ``logits / temperature``. Like the attack kernels, these functions know
nothing of jobs: no Redis, no logging, no global RNG; randomness comes from an explicit CPU
``torch.Generator``, tensors stay on the device they came on (the module's), and cancellation is the
caller's ``on_progress`` raising.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from workers.attacks.base import project

Objective = Literal["standard", "fgsm", "pgd"]
OBJECTIVES: tuple[Objective, ...] = ("standard", "fgsm", "pgd")


@dataclass(frozen=True)
class TrainSpec:
    """How to train: Adam with a one-cycle schedule (peak ``lr``) over ``epochs * (N // batch_size)`` steps.

    ``alpha``: weight of the clean loss in the FGSM objective. ``eps``, ``pgd_step_size``: Linf, in
    input units; ``pgd_step_size=None`` means ``2.5 * eps / pgd_steps``. ``temperature``: the softmax
    temperature of the training loss (1 for ordinary training).
    """

    epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3
    objective: Objective = "standard"
    alpha: float = 0.5
    eps: float = 0.1
    pgd_steps: int = 10
    pgd_step_size: float | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs >= 1", self.epochs),
            (self.batch_size >= 1, "batch_size >= 1", self.batch_size),
            (self.lr > 0, "lr > 0", self.lr),
            (self.objective in OBJECTIVES, f"objective in {OBJECTIVES}", self.objective),
            (0.0 <= self.alpha <= 1.0, "0 <= alpha <= 1", self.alpha),
            (self.eps >= 0, "eps >= 0", self.eps),
            (self.pgd_steps >= 1, "pgd_steps >= 1", self.pgd_steps),
            (self.pgd_step_size is None or self.pgd_step_size > 0, "pgd_step_size > 0 or None",
             self.pgd_step_size),
            (self.temperature > 0, "temperature > 0", self.temperature),
        ]
        for ok, expected, got in checks:
            if not ok:
                raise ValueError(f"expected {expected}, got {got!r}")

    @property
    def step_size(self) -> float:
        return self.pgd_step_size if self.pgd_step_size is not None else 2.5 * self.eps / self.pgd_steps


@dataclass(frozen=True)
class Progress:
    """Where training stands: ``epoch`` of ``epochs`` and ``batch`` of ``batches`` count from 1.

    ``loss`` (the objective's) and ``accuracy`` (of the clean predictions on the training batches)
    are running means over the epoch so far.
    """

    epoch: int
    epochs: int
    batch: int
    batches: int
    loss: float
    accuracy: float


@dataclass(frozen=True)
class TrainReport:
    """``steps``: optimizer steps taken; ``final_*``: means over the last epoch."""

    epochs: int
    steps: int
    seconds: float
    final_loss: float
    final_train_accuracy: float


def train(
    module: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    spec: TrainSpec,
    *,
    bounds: tuple[float, float],
    generator: torch.Generator,
    on_progress: Callable[[Progress], None] | None = None,
    every: int = 50,
) -> TrainReport:
    """Train ``module`` in place on ``(x, targets)`` with the objective of ``spec``.

    Args:
        module: maps inputs in ``bounds`` (normalisation folded in) to logits ``(N, K)``; its
            parameters that require grad are trained (at least one must). Its train/eval mode, per
            submodule, is restored on return, also when ``on_progress`` raises.
        x: inputs ``(N, C, H, W)`` in ``bounds``, on the module's device.
        targets: labels, int64 ``(N,)``, or soft labels, float ``(N, K)`` with rows summing to 1
            (distillation). The adversarial objectives craft and train against the hard label
            (the argmax of soft labels).
        spec: see ``TrainSpec``.
        bounds: the input box, used to clip the adversarial points.
        generator: a CPU generator: the per-epoch shuffles and PGD's random starts (drawn on the
            CPU, so a CPU run is reproducible bit for bit from the seed).
        on_progress: called every ``every`` batches and after the last batch of each epoch; an
            exception it raises (a cancellation) stops training and propagates.
        every: batches between two progress reports.

    Returns:
        ``TrainReport``. The last incomplete batch of each epoch is dropped.

    Example:
        >>> report = train(module, x, y, TrainSpec(objective="pgd", eps=0.1), bounds=(0.0, 1.0),
        ...                generator=torch.Generator().manual_seed(0))
    """
    x = x.detach()
    assert x.ndim == 4, f"expected x of shape (N, C, H, W), got {tuple(x.shape)}"
    assert targets.shape[0] == x.shape[0] and targets.ndim in (1, 2), (
        f"expected targets of shape ({x.shape[0]},) or ({x.shape[0]}, K), got {tuple(targets.shape)}"
    )
    assert generator.device.type == "cpu", f"expected a CPU generator, got {generator.device}"
    if every < 1:
        raise ValueError(f"expected every >= 1, got {every}")
    parameters = [p for p in module.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("expected a module with parameters that require grad, got none")
    batches = x.shape[0] // spec.batch_size
    if batches == 0:
        raise ValueError(f"expected at least batch_size={spec.batch_size} samples, got {x.shape[0]}")
    labels = targets if targets.ndim == 1 else targets.argmax(dim=1)
    optimizer = torch.optim.Adam(parameters, lr=spec.lr)
    steps = spec.epochs * batches
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=spec.lr, total_steps=steps)
    started = time.perf_counter()
    with _modes_restored(module), torch.enable_grad():
        for epoch in range(1, spec.epochs + 1):
            order = torch.randperm(x.shape[0], generator=generator).to(x.device)
            # Running sums stay on the device: reading them is a sync, done only when reporting.
            loss_sum = torch.zeros((), dtype=x.dtype, device=x.device)
            correct = torch.zeros((), dtype=torch.int64, device=x.device)
            for batch in range(1, batches + 1):
                idx = order[(batch - 1) * spec.batch_size : batch * spec.batch_size]
                loss, right = _step(module, optimizer, x[idx], targets[idx], labels[idx], spec, bounds,
                                    generator)
                scheduler.step()
                loss_sum += loss
                correct += right
                if on_progress is not None and (batch % every == 0 or batch == batches):
                    on_progress(Progress(epoch, spec.epochs, batch, batches, float(loss_sum) / batch,
                                         int(correct) / (batch * spec.batch_size)))
    final_loss = float(loss_sum) / batches
    final_accuracy = int(correct) / (batches * spec.batch_size)
    return TrainReport(spec.epochs, steps, time.perf_counter() - started, final_loss, final_accuracy)


def soft_labels(
    teacher: nn.Module, x: torch.Tensor, temperature: float, batch_size: int = 1000
) -> torch.Tensor:
    """The teacher's ``softmax(logits / temperature)`` ``(N, K)`` on ``x`` ``(N, C, H, W)``.

    Papernot et al. 2016: the targets of a distilled student, trained at the same temperature.
    Computed in eval mode without gradients, in chunks of ``batch_size``; the mode is restored.
    """
    if temperature <= 0:
        raise ValueError(f"expected temperature > 0, got {temperature}")
    with _modes_restored(teacher), torch.no_grad():
        teacher.eval()
        chunks = x.split(batch_size) if len(x) else (x,)
        return torch.cat([F.softmax(teacher(chunk) / temperature, dim=1) for chunk in chunks])


def accuracy(module: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Fraction of ``x`` ``(N, C, H, W)`` whose predicted class is ``y`` ``(N,)``.

    Eval mode, no gradients, chunks of ``batch_size``; the mode is restored.
    """
    if len(x) == 0:
        raise ValueError("expected at least one sample, got none")
    with _modes_restored(module), torch.no_grad():
        module.eval()
        correct = sum((module(xs).argmax(dim=1) == ys).sum() for xs, ys in
                      zip(x.split(batch_size), y.split(batch_size), strict=True))
    return int(correct) / len(x)


def _step(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    targets: torch.Tensor,
    labels: torch.Tensor,
    spec: TrainSpec,
    bounds: tuple[float, float],
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch; the objective's loss and the number of correct clean predictions."""
    temperature = spec.temperature
    if spec.objective == "pgd":
        # Crafted in eval mode (BatchNorm uses its running statistics and does not update them).
        module.eval()
        x_train = _pgd_linf(module, x, labels, spec, bounds, generator)
        with torch.no_grad():
            clean_logits = module(x)
        module.train()
        loss = _loss(module(x_train), labels, temperature)
    elif spec.objective == "fgsm":
        module.eval()
        x_adv = _fgsm_linf(module, x, labels, spec.eps, temperature, bounds)
        module.train()
        clean_logits = module(x)
        loss = (spec.alpha * _loss(clean_logits, labels, temperature)
                + (1 - spec.alpha) * _loss(module(x_adv), labels, temperature))
    else:
        module.train()
        clean_logits = module(x)
        loss = _loss(clean_logits, targets, temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (clean_logits.detach().argmax(dim=1) == labels).sum()


def _fgsm_linf(
    module: nn.Module, x: torch.Tensor, labels: torch.Tensor, eps: float, temperature: float,
    bounds: tuple[float, float],
) -> torch.Tensor:
    """``clip(x + eps * sign(grad_x J(x, y)))``, detached: the gradient flows through the parameters only."""
    x_in = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(_loss(module(x_in), labels, temperature, "sum"), x_in)
    return (x + eps * grad.sign()).clamp(bounds[0], bounds[1]).detach()


def _pgd_linf(
    module: nn.Module, x: torch.Tensor, labels: torch.Tensor, spec: TrainSpec, bounds: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """Linf PGD with a uniform random start and no early stop, the training adversary of Madry et al."""
    # Drawn on the CPU generator and moved, so the start does not depend on the device.
    noise = (torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1) * spec.eps
    x_adv = project(x + noise.to(x.device), x, spec.eps, "linf", bounds)
    for _ in range(spec.pgd_steps):
        x_adv = x_adv.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(_loss(module(x_adv), labels, spec.temperature, "sum"), x_adv)
        x_adv = project(x_adv.detach() + spec.step_size * grad.sign(), x, spec.eps, "linf", bounds)
    return x_adv.detach()


def _loss(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """Cross-entropy of ``logits / temperature`` against labels ``(N,)`` or soft labels ``(N, K)``."""
    scaled = logits / temperature
    if targets.ndim == 1:
        return F.cross_entropy(scaled, targets, reduction=reduction)
    per_sample = -(targets * F.log_softmax(scaled, dim=1)).sum(dim=1)
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


@contextmanager
def _modes_restored(module: nn.Module) -> Iterator[None]:
    """Restore the train/eval flag of every submodule on exit (callers may mix modes)."""
    modes = [(sub, sub.training) for sub in module.modules()]
    try:
        yield
    finally:
        # Parents come first in modules(), so a parent's recursive train() never overrides a child.
        for sub, training in modes:
            sub.train(training)
