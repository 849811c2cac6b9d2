"""The architecture catalog: a name in a model card -> a builder of the bare ``nn.Module``.

Builders take the input shape ``(C, H, W)`` and the number of classes and return a module that maps
normalised inputs to logits. Normalisation and bounds are added by the registry, not here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models import resnet18

Builder = Callable[[tuple[int, int, int], int], nn.Module]


def small_cnn(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Two 3x3 conv blocks and two dense layers (~420k parameters): the Fashion-MNIST workhorse."""
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * (height // 4) * (width // 4), 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def resnet18_small(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """ResNet-18 adapted to small inputs (28x28): 3x3 stem with stride 1 and no max-pool."""
    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()  # type: ignore[assignment]
    return model


def linear(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """A multinomial logistic regression; useful where closed forms exist (DeepFool's test)."""
    features = input_shape[0] * input_shape[1] * input_shape[2]
    return nn.Sequential(nn.Flatten(), nn.Linear(features, num_classes))


def mlp(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """A tiny two-layer perceptron for unit tests."""
    features = input_shape[0] * input_shape[1] * input_shape[2]
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, num_classes))


CATALOG: dict[str, Builder] = {
    "small-cnn": small_cnn,
    "resnet18-small": resnet18_small,
    "linear": linear,
    "mlp": mlp,
}


def build(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build an architecture from the catalog (weights uninitialised for loading)."""
    try:
        builder = CATALOG[name]
    except KeyError:
        raise KeyError(f"expected one of {sorted(CATALOG)}, got architecture {name!r}") from None
    return builder(input_shape, num_classes)


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``, folded into the model so attacks work in input units."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.get_buffer("mean"), self.get_buffer("std")
        return (x - mean) / std
