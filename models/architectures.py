"""The architecture catalog: a name in a model card -> a builder of the bare ``nn.Module``.

Builders take the input shape ``(C, H, W)`` and the number of classes and return a module that maps
normalised inputs to logits. Normalisation and bounds are added by the registry, not here.

Besides the small models trained here, the catalog holds torchvision's classification families,
always built with ``weights=None`` (nothing is downloaded: uploaded weights are loaded into them)
and with the first convolution replaced when the input does not have 3 channels. ``-small``
variants swap the stride-2 stem for a stride-1 one (CIFAR-style 32x32 inputs). Names,
descriptions and input constraints live in the torch-free ``models.catalog_names``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn
from torchvision import models as tv
from torchvision.models import resnet18

from models.catalog_names import check_input

Builder = Callable[[tuple[int, int, int], int], nn.Module]
StemInit = Callable[[nn.Conv2d], None]


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


def _kaiming_init(conv: nn.Conv2d) -> None:
    """The init torchvision gives the stems of ResNet, VGG, MobileNet and EfficientNet."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _convnext_init(conv: nn.Conv2d) -> None:
    nn.init.trunc_normal_(conv.weight, std=0.02)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _vit_init(conv: nn.Conv2d) -> None:
    fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    nn.init.trunc_normal_(conv.weight, std=math.sqrt(1 / fan_in))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _replace_stem(model: nn.Module, path: str, channels: int, init: StemInit, stride: int | None = None,
                  kernel: int | None = None) -> None:
    """Swap the convolution at ``path`` for one reading ``channels`` inputs (and, for the
    ``-small`` variants, another stride or kernel), keeping everything else about it."""
    parent_path, _, attribute = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = model.get_submodule(path)
    assert isinstance(old, nn.Conv2d), f"{path} is a {type(old).__name__}"
    size = (old.kernel_size[0], old.kernel_size[1])
    padding: str | tuple[int, int] = old.padding if isinstance(old.padding, str) else (
        int(old.padding[0]), int(old.padding[1]))
    if kernel is not None:
        size, padding = (kernel, kernel), (kernel // 2, kernel // 2)
    conv = nn.Conv2d(channels, old.out_channels, size,
                     stride=(stride, stride) if stride is not None else (old.stride[0], old.stride[1]),
                     padding=padding, groups=old.groups, bias=old.bias is not None)
    init(conv)
    setattr(parent, attribute, conv)


def _torchvision(factory: Callable[..., nn.Module], stem: str, init: StemInit,
                 input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """A torchvision classifier without pretrained weights, its stem adapted to ``C`` channels."""
    model = factory(weights=None, num_classes=num_classes)
    if input_shape[0] != 3:
        _replace_stem(model, stem, input_shape[0], init)
    return model


def _family(factory: Callable[..., nn.Module], stem: str, init: StemInit = _kaiming_init) -> Builder:
    return partial(_torchvision, factory, stem, init)


def _resnet_small(factory: Callable[..., nn.Module], input_shape: tuple[int, int, int],
                  num_classes: int) -> nn.Module:
    """A torchvision ResNet with the stem of ``resnet18_small``: 3x3 stride 1, no max-pool."""
    model = factory(weights=None, num_classes=num_classes)
    _replace_stem(model, "conv1", input_shape[0], _kaiming_init, stride=1, kernel=3)
    model.maxpool = nn.Identity()
    return model


def mobilenet_v2_small(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """MobileNetV2 with a stride-1 first convolution: a 32x32 input ends as a 2x2 map, not 1x1."""
    model = tv.mobilenet_v2(weights=None, num_classes=num_classes)
    _replace_stem(model, "features.0.0", input_shape[0], _kaiming_init, stride=1)
    return model


def vit_b_16(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """ViT-B/16 for square ``H x H`` inputs (``check_input`` has checked ``H % 16 == 0``): the
    position embedding has one entry per patch, so the image size is part of the architecture."""
    model = tv.vit_b_16(weights=None, num_classes=num_classes, image_size=input_shape[1])
    if input_shape[0] != 3:
        _replace_stem(model, "conv_proj", input_shape[0], _vit_init)
    return model


# The first four are the original entries: hosted weights depend on their exact key names, so their
# builders stay as they are. ``models.catalog_names`` lists the same names (a unit test checks).
CATALOG: dict[str, Builder] = {
    "small-cnn": small_cnn,
    "resnet18-small": resnet18_small,
    "linear": linear,
    "mlp": mlp,
    "convnext-tiny": _family(tv.convnext_tiny, "features.0.0", _convnext_init),
    "efficientnet-b0": _family(tv.efficientnet_b0, "features.0.0"),
    "mobilenet-v2": _family(tv.mobilenet_v2, "features.0.0"),
    "mobilenet-v2-small": mobilenet_v2_small,
    "mobilenet-v3-large": _family(tv.mobilenet_v3_large, "features.0.0"),
    "mobilenet-v3-small": _family(tv.mobilenet_v3_small, "features.0.0"),
    "resnet18": _family(tv.resnet18, "conv1"),
    "resnet34": _family(tv.resnet34, "conv1"),
    "resnet34-small": partial(_resnet_small, tv.resnet34),
    "resnet50": _family(tv.resnet50, "conv1"),
    "resnet50-small": partial(_resnet_small, tv.resnet50),
    "vgg11-bn": _family(tv.vgg11_bn, "features.0"),
    "vgg16-bn": _family(tv.vgg16_bn, "features.0"),
    "vit-b-16": vit_b_16,
    "wide-resnet50-2": _family(tv.wide_resnet50_2, "conv1"),
    "wide-resnet50-2-small": partial(_resnet_small, tv.wide_resnet50_2),
}


def build(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build an architecture from the catalog (weights uninitialised for loading).

    Raises ``KeyError`` listing the catalog for an unknown name, and ``ValueError`` for an input
    shape the architecture cannot run on (``models.catalog_names.check_input``) or a number of
    classes below 1, before any layer is allocated.
    """
    try:
        builder = CATALOG[name]
    except KeyError:
        raise KeyError(f"expected one of {sorted(CATALOG)}, got architecture {name!r}") from None
    check_input(name, input_shape)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"expected a positive number of classes, got {num_classes!r}")
    return builder(input_shape, num_classes)


def state_dict_mismatch(module: nn.Module, state: Mapping[str, torch.Tensor], limit: int = 5,
                        name: str | None = None) -> str | None:
    """None when ``state`` fits ``module`` exactly (same keys and shapes; any floating dtype where
    the module has a floating tensor, since loading casts), else one sentence listing the first
    ``limit`` missing keys, unexpected keys, shape mismatches and dtype mismatches with their counts.

    ``state`` comes from an uploaded file, so this never raises on whatever it holds.
    """
    expected = module.state_dict()
    what = f"the state dict of {name or type(module).__name__} ({len(expected)} tensors)"
    if not isinstance(state, Mapping):
        return f"expected {what}, got a {type(state).__name__}"
    try:
        return _mismatch(expected, state, max(int(limit), 1), what)
    except Exception as exc:  # a Mapping whose own methods fail: still an answer, not a crash
        return f"expected {what}, got a mapping that cannot be read ({type(exc).__name__})"


def _mismatch(expected: Mapping[str, torch.Tensor], state: Mapping[Any, Any], limit: int, what: str
              ) -> str | None:
    missing = [key for key in expected if key not in state]
    unexpected = [_short(key if isinstance(key, str) else repr(key)) for key in state if key not in expected]
    shapes: list[str] = []
    dtypes: list[str] = []
    for key, want in expected.items():
        if key not in state:
            continue
        got = state[key]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
            shapes.append(f"{key}: expected {_shape(want)}, got {_shape(got)}")
        elif got.dtype.is_floating_point != want.dtype.is_floating_point or got.dtype.is_complex:
            kind = "a floating-point" if want.dtype.is_floating_point else f"a {want.dtype}"
            dtypes.append(f"{key}: expected {kind} tensor, got {got.dtype}")
    parts = [_listed(items, noun, plural, limit) for noun, plural, items in (
        ("missing", "missing", missing), ("unexpected", "unexpected", unexpected),
        ("shape mismatch", "shape mismatches", shapes), ("dtype mismatch", "dtype mismatches", dtypes),
    ) if items]
    return f"expected {what}: " + ", ".join(parts) if parts else None


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"


def _short(key: str, width: int = 80) -> str:
    """Keys come from uploads: a megabyte-long key must not become a megabyte-long message."""
    return key if len(key) <= width else key[: width - 3] + "..."


def _listed(items: list[str], noun: str, plural: str, limit: int) -> str:
    shown = ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")
    return f"{len(items)} {noun if len(items) == 1 else plural} ({shown})"


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``, folded into the model so attacks work in input units."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.get_buffer("mean"), self.get_buffer("std")
        return (x - mean) / std
