"""The architecture catalog without torch: names, one-line descriptions and input constraints, so
the gateway can check a model card's ``architecture`` and ``input_shape`` before anything is
queued. ``models.architectures`` holds the builders; a unit test keeps both lists equal.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchitectureInfo:
    """One catalog entry. ``min_side`` is the smallest height and width the network runs on
    (VGG's and ConvNeXt's unpadded downsampling leave nothing of smaller inputs); ``patch``, when
    set, means square inputs whose side is a multiple of it (a ViT's patch grid)."""

    name: str
    description: str
    min_side: int = 1
    patch: int | None = None


ARCHITECTURES: tuple[ArchitectureInfo, ...] = (
    ArchitectureInfo("convnext-tiny", "ConvNeXt-T (28M parameters): 4x4 patchify stem, for 224x224 inputs", 32),
    ArchitectureInfo("efficientnet-b0", "EfficientNet-B0 (5.3M): inverted residuals with squeeze-excitation"),
    ArchitectureInfo("linear", "multinomial logistic regression on the flattened input"),
    ArchitectureInfo("mlp", "a tiny two-layer perceptron for tests"),
    ArchitectureInfo("mobilenet-v2", "MobileNetV2 (3.5M): stride-2 stem, for 224x224 inputs"),
    ArchitectureInfo("mobilenet-v2-small", "MobileNetV2 with a stride-1 stem, for 32x32 inputs"),
    ArchitectureInfo("mobilenet-v3-large", "MobileNetV3-Large (5.5M)"),
    ArchitectureInfo("mobilenet-v3-small", "MobileNetV3-Small (2.5M)"),
    ArchitectureInfo("resnet18", "ResNet-18 (11.7M): 7x7 stride-2 stem and max-pool, for 224x224 inputs"),
    ArchitectureInfo("resnet18-small", "ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 28x28/32x32"),
    ArchitectureInfo("resnet34", "ResNet-34 (21.8M): 7x7 stride-2 stem and max-pool, for 224x224 inputs"),
    ArchitectureInfo("resnet34-small", "ResNet-34 with a 3x3 stride-1 stem and no max-pool, for 32x32"),
    ArchitectureInfo("resnet50", "ResNet-50 (25.6M, bottleneck blocks), for 224x224 inputs"),
    ArchitectureInfo("resnet50-small", "ResNet-50 with a 3x3 stride-1 stem and no max-pool, for 32x32"),
    ArchitectureInfo("small-cnn", "two 3x3 conv blocks and two dense layers (~420k): Fashion-MNIST",
                     4),
    ArchitectureInfo("vgg11-bn", "VGG-11 with batch norm (133M, mostly the dense head)", 32),
    ArchitectureInfo("vgg16-bn", "VGG-16 with batch norm (138M, mostly the dense head)", 32),
    ArchitectureInfo("vit-b-16", "ViT-B/16 (86M): 16x16 patches; square inputs, side a multiple of 16", 16, 16),
    ArchitectureInfo("wide-resnet50-2", "Wide ResNet-50-2 (68.9M), for 224x224 inputs"),
    ArchitectureInfo("wide-resnet50-2-small",
                     "Wide ResNet-50-2 with a 3x3 stride-1 stem and no max-pool, for 32x32"),
)
NAMES: tuple[str, ...] = tuple(entry.name for entry in ARCHITECTURES)
_BY_NAME = {entry.name: entry for entry in ARCHITECTURES}


def info(name: str) -> ArchitectureInfo:
    """The catalog entry of ``name``; ``KeyError`` listing the catalog for an unknown name."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"expected one of {list(NAMES)}, got architecture {name!r}") from None


def check_input(name: str, input_shape: tuple[int, ...]) -> None:
    """Raise ``ValueError`` when architecture ``name`` cannot run on inputs of ``input_shape``
    ``(C, H, W)`` (``KeyError`` for an unknown name), so that a bad card fails at upload and not
    in the middle of a job."""
    entry = info(name)
    if len(input_shape) != 3 or not all(isinstance(d, int) and d > 0 for d in input_shape):
        raise ValueError(f"expected an input shape (C, H, W) of positive integers, got {tuple(input_shape)}")
    _, height, width = input_shape
    if entry.patch is not None and (height != width or height % entry.patch):
        raise ValueError(f"expected square inputs whose side is a multiple of {entry.patch} for {name}, "
                         f"got {height}x{width}")
    if min(height, width) < entry.min_side:
        raise ValueError(f"expected inputs of at least {entry.min_side}x{entry.min_side} for {name} (its "
                         f"downsampling leaves nothing of smaller ones), got {height}x{width}")
