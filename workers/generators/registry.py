"""Stored AdvGAN generators: trained networks -> checked files, and back.

A generator lives in the generator registry as ``<root>/<name>/<version>/`` with ``card.json``
(``models.manifest.GeneratorCard``), ``generator.safetensors`` and ``discriminator.safetensors``.
Only safetensors are read (never a pickle), and each file's sha256 must match the card before any
byte of it is parsed as tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from models.manifest import CARD_FILE, DISCRIMINATOR_FILE, GENERATOR_FILE, GeneratorCard
from models.registry import ModelLoadError, sha256_hex, weights_bytes
from workers.generators.advgan import build_discriminator, build_generator


def network_files(generator: nn.Module, discriminator: nn.Module) -> dict[str, bytes]:
    """The two networks' weights as safetensors, by file name (what ``publish_files`` writes)."""
    return {GENERATOR_FILE: weights_bytes(generator), DISCRIMINATOR_FILE: weights_bytes(discriminator)}


def _checked(directory: Path, card: GeneratorCard, name: str) -> bytes:
    try:
        raw = (directory / name).read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{card.ref}: cannot read {name}: {exc}") from exc
    digest = sha256_hex(raw)
    if digest != card.files[name]:
        raise ModelLoadError(f"{card.ref}: {name} sha256 {digest} does not match the card's "
                             f"{card.files[name]}")
    return raw


def _frozen(module: nn.Module, raw: bytes, card: GeneratorCard, device: torch.device | str) -> nn.Module:
    try:
        module.load_state_dict(load_safetensors(raw), strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{card.ref}: weights do not fit an AdvGAN network for inputs "
                             f"{card.input_shape}: {exc}") from exc
    module = module.to(device).eval()
    module.requires_grad_(False)
    return module


def load_generator(directory: Path, device: torch.device | str = "cpu") -> tuple[GeneratorCard, nn.Module]:
    """The generator stored in ``directory``: eval mode, frozen, on ``device``."""
    card = GeneratorCard.read(directory / CARD_FILE)
    raw = _checked(directory, card, GENERATOR_FILE)
    with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten at once
        module = build_generator(card.input_shape)
    return card, _frozen(module, raw, card, device)


def load_discriminator(directory: Path, device: torch.device | str = "cpu") -> nn.Module:
    """The discriminator trained with the generator in ``directory``: eval mode, frozen."""
    card = GeneratorCard.read(directory / CARD_FILE)
    raw = _checked(directory, card, DISCRIMINATOR_FILE)
    with torch.random.fork_rng(devices=[]):
        module = build_discriminator(card.input_shape)
    return _frozen(module, raw, card, device)
