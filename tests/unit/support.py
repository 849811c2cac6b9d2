"""What the kernel tests share: a tiny seeded float64 model, a batch for it, and the hosted CNN."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from models.datasets import load_split
from models.manifest import CardIndex
from models.registry import load_module
from workers.attacks.base import AttackOutput
from workers.classifier import Classifier

SHAPE = (1, 6, 6)
CLASSES = 4
BOUNDS = (0.0, 1.0)


def tiny_model(seed: int = 0) -> Classifier:
    """A seeded two-layer perceptron on 6x6 inputs, in float64."""
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.Tanh(), nn.Linear(16, CLASSES))
    module = module.double().eval()
    module.requires_grad_(False)
    return Classifier(module, CLASSES, SHAPE, BOUNDS, "tiny")


def batch(n: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform inputs and, as labels, the tiny model's clean predictions (all correct)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SHAPE, generator=g, dtype=torch.float64)
    return x, tiny_model().logits(x).argmax(1)


Case = tuple[str, Callable[..., AttackOutput], Any, float | None, str | None]


def run(case: Case, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> AttackOutput:
    """Run a table row ``(id, kernel, spec, eps, norm)`` on the tiny model; targeted rows aim at
    ``(y + 1) % CLASSES``."""
    _, kernel, spec, _, _ = case
    targets = (y + 1) % CLASSES if getattr(spec, "targeted", False) else None
    return kernel(tiny_model(), x, y, spec, targets=targets, generator=torch.Generator().manual_seed(seed))


def hosted(name: str = "fmnist-cnn") -> Classifier:
    directory = CardIndex.default().directory(name)
    assert directory is not None, f"{name} is not hosted"
    card, module = load_module(directory)
    return Classifier(module, card.num_classes, card.input_shape, card.bounds, card.ref)


def fmnist_test(n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_split("fashion-mnist:test").slice(offset, n)
    return torch.from_numpy(x), torch.from_numpy(y)
