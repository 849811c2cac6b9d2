"""The architecture catalog: every entry builds for the shapes it claims, refuses the ones it
cannot run, keeps the key names hosted weights depend on; and ``state_dict_mismatch``."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from models.architectures import CATALOG, build, state_dict_mismatch
from models.catalog_names import ARCHITECTURES, NAMES, check_input, info
from models.manifest import WEIGHTS_FILE, CardIndex

CLASSES = 7


def test_the_torch_free_names_list_the_catalog() -> None:
    assert tuple(sorted(CATALOG)) == NAMES
    assert all(entry.description for entry in ARCHITECTURES)


def smallest(name: str) -> tuple[int, int, int]:
    """(3, 32, 32), or the smallest input the architecture takes when that is larger."""
    side = max(32, info(name).min_side)
    return 3, side, side


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_every_architecture_gives_logits_for_3x32x32(name: str) -> None:
    """Built and run on the meta device: shapes are what the catalog decides, and the big
    networks (VGG's 120M-parameter head) would take seconds each to initialise on the CPU."""
    with torch.device("meta"):
        module = build(name, smallest(name), CLASSES).eval()
        assert module(torch.empty(2, *smallest(name))).shape == (2, CLASSES)


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_one_channel_28x28_builds_or_is_refused_up_front(name: str) -> None:
    entry = info(name)
    with torch.device("meta"):
        if entry.min_side > 28 or entry.patch is not None:
            with pytest.raises(ValueError, match=r"expected .* got 28x28"):
                build(name, (1, 28, 28), CLASSES)
            return
        module = build(name, (1, 28, 28), CLASSES).eval()
        assert module(torch.empty(3, 1, 28, 28)).shape == (3, CLASSES)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("name", [entry.name for entry in ARCHITECTURES if entry.min_side > 1])
def test_the_minimum_side_is_where_the_network_really_stops(name: str) -> None:
    """Below ``min_side`` the builder itself (bypassing the check) fails in its forward pass."""
    side = info(name).min_side
    with torch.device("meta"):
        assert build(name, (3, side, side), CLASSES)(torch.empty(1, 3, side, side)).shape == (1, CLASSES)
        if info(name).patch is None:
            module = CATALOG[name]((3, side - 1, side - 1), CLASSES).eval()
            with pytest.raises(RuntimeError):
                module(torch.empty(1, 3, side - 1, side - 1))


def test_vit_takes_its_image_size_from_the_input_shape() -> None:
    with torch.device("meta"):
        assert build("vit-b-16", (3, 224, 224), CLASSES)(torch.empty(1, 3, 224, 224)).shape == (1, CLASSES)
        module = build("vit-b-16", (2, 48, 48), CLASSES)
        assert module.conv_proj.in_channels == 2 and module.encoder.pos_embedding.shape == (1, 10, 768)
        assert module(torch.empty(1, 2, 48, 48)).shape == (1, CLASSES)
    for shape in [(3, 32, 48), (3, 40, 40)]:
        with pytest.raises(ValueError, match=r"expected square inputs whose side is a multiple of 16"):
            build("vit-b-16", shape, CLASSES)


@pytest.mark.parametrize(("name", "shape"), [("resnet18", (1, 16, 16)), ("mobilenet-v2-small", (2, 16, 16))])
def test_real_forward_and_backward_with_another_channel_count(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    module = build(name, shape, CLASSES).eval()
    for parameter in module.parameters():
        if parameter.dim() == 2 and not parameter.any():
            nn.init.normal_(parameter, std=0.02)  # ViT's head starts at zero: no gradient reaches x
    x = torch.rand(2, *shape, requires_grad=True)
    logits = module(x)
    assert logits.shape == (2, CLASSES) and torch.isfinite(logits).all()
    (grad,) = torch.autograd.grad(logits.sum(), x)
    assert grad.abs().sum() > 0


def test_small_variants_have_a_stride_one_stem() -> None:
    with torch.device("meta"):
        for name in ("resnet34-small", "resnet50-small", "wide-resnet50-2-small"):
            module = build(name, (3, 32, 32), CLASSES)
            assert module.conv1.stride == (1, 1) and module.conv1.kernel_size == (3, 3)
            assert isinstance(module.maxpool, nn.Identity)
        stem = build("mobilenet-v2-small", (3, 32, 32), CLASSES).get_submodule("features.0.0")
        assert isinstance(stem, nn.Conv2d) and stem.stride == (1, 1)


def test_bad_names_and_shapes_are_refused() -> None:
    with pytest.raises(KeyError, match="resnet18-small"):
        build("resnet-18", (3, 32, 32), CLASSES)
    with pytest.raises(ValueError, match=r"expected an input shape \(C, H, W\) of positive integers"):
        check_input("resnet18", (3, 0, 32))
    with pytest.raises(ValueError, match="expected a positive number of classes, got 0"):
        build("mlp", (1, 4, 4), 0)


@pytest.mark.parametrize("name", ["fmnist-cnn", "fmnist-resnet18"])
def test_hosted_weights_still_fit_their_architecture(name: str) -> None:
    """The first catalog entries must keep their key names: published weights depend on them."""
    index = CardIndex.default()
    card, directory = index.card(name), index.directory(name)
    assert card is not None and directory is not None
    module = build(card.architecture, card.input_shape, card.num_classes)
    assert state_dict_mismatch(module, load_file(directory / WEIGHTS_FILE)) is None


def test_state_dict_mismatch_names_what_does_not_fit() -> None:
    module = build("resnet18", (3, 32, 32), 10)
    state = OrderedDict((key, value.clone()) for key, value in module.state_dict().items())
    assert state_dict_mismatch(module, state) is None
    half = {key: value.half() if value.is_floating_point() else value for key, value in state.items()}
    assert state_dict_mismatch(module, half) is None

    del state["fc.weight"], state["fc.bias"]
    state["head.weight"] = torch.zeros(10, 512)
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    state["bn1.num_batches_tracked"] = torch.zeros((), dtype=torch.float32)
    message = state_dict_mismatch(module, state, name="resnet18")
    assert message == (
        f"expected the state dict of resnet18 ({len(module.state_dict())} tensors): 2 missing (fc.weight, "
        "fc.bias), 1 unexpected (head.weight), 1 shape mismatch (conv1.weight: expected (64, 3, 7, 7), got "
        "(64, 1, 7, 7)), 1 dtype mismatch (bn1.num_batches_tracked: expected a torch.int64 tensor, got "
        "torch.float32)")


def test_state_dict_mismatch_counts_beyond_its_limit_and_never_raises() -> None:
    module = build("mlp", (1, 4, 4), 3)
    many = {f"extra.{i}": torch.zeros(1) for i in range(9)}
    message = state_dict_mismatch(module, many, limit=2)
    assert message is not None and "4 missing (1.weight, 1.bias, ...)" in message
    assert "9 unexpected (extra.0, extra.1, ...)" in message
    hostile: list[object] = [
        [1, 2, 3],
        None,
        {"1.weight": "a string", 3: torch.zeros(1), "x" * 10_000: torch.zeros(1)},
        {key: torch.zeros(2, dtype=torch.complex64) for key in module.state_dict()},
        {key: torch.zeros(value.shape, dtype=torch.bool) for key, value in module.state_dict().items()},
    ]
    for state in hostile:
        message = state_dict_mismatch(module, state)  # type: ignore[arg-type]
        assert isinstance(message, str) and message.startswith("expected the state dict of Sequential")
        assert len(message) < 2_000
