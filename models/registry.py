"""Safe loading of registered models: card -> checked safetensors weights -> frozen module.

Only safetensors are read (never a pickle); the file's sha256 must match the card before any
byte of it is parsed as tensors. The returned module has normalisation folded in, so it takes
inputs in the card's bounds and returns logits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from models.architectures import Normalize, build
from models.manifest import CARD_FILE, WEIGHTS_FILE, ModelCard
from models.publish import PublishError, publish_files


class ModelLoadError(RuntimeError):
    """A model's files are missing, corrupt, or do not fit its architecture."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assemble(card: ModelCard, body: nn.Module) -> nn.Sequential:
    """Fold the card's normalisation in front of an architecture body."""
    return nn.Sequential(Normalize(card.mean, card.std), body)


def load_module(directory: Path, device: torch.device | str = "cpu") -> tuple[ModelCard, nn.Module]:
    """Load the model stored in ``directory`` (card + weights), in eval mode, frozen, on ``device``.

    Compositions (preprocessing, ensembles) are built by the workers from their parts.
    """
    card = ModelCard.read(directory / CARD_FILE)
    if card.composition is not None:
        raise ModelLoadError(f"{card.ref} is a {card.composition.kind} composition, not weights")
    raw = (directory / WEIGHTS_FILE).read_bytes()
    digest = sha256_hex(raw)
    if digest != card.sha256:
        raise ModelLoadError(f"{card.ref}: weights sha256 {digest} does not match card {card.sha256}")
    body = build(card.architecture, card.input_shape, card.num_classes)
    try:
        body.load_state_dict(load_safetensors(raw), strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{card.ref}: weights do not fit {card.architecture}: {exc}") from exc
    module = assemble(card, body).to(device).eval()
    module.requires_grad_(False)
    return card, module


def weights_bytes(body: nn.Module) -> bytes:
    """Serialise an architecture body's weights as safetensors (contiguous CPU copies)."""
    state = {k: v.detach().cpu().contiguous() for k, v in body.state_dict().items()}
    return save_safetensors(state)


def write_model(root: Path, card: ModelCard, weights: bytes) -> Path:
    """Write weights then card into ``root/<name>/<version>``; the card last, so that a reader
    never finds a card without its weights (the index only lists directories with a card)."""
    if sha256_hex(weights) != card.sha256:
        raise ModelLoadError(f"{card.ref}: sha256 of the weights does not match the card")
    directory = root / card.name / str(card.version)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    tmp.write_bytes(weights)
    tmp.replace(directory / WEIGHTS_FILE)
    tmp_card = directory / (CARD_FILE + ".tmp")
    card.write(tmp_card)
    tmp_card.replace(directory / CARD_FILE)
    return directory


def publish(root: Path, card: ModelCard, weights: bytes | None, taken: Iterable[int] = ()) -> ModelCard:
    """Add ``card`` (and its weights) to the registry under ``root`` as the next free version.

    Everything is written into a staging directory first, which is then renamed to
    ``root/<name>/<version>`` in one step (``models.publish.publish_files``): a worker killed
    half-way leaves no visible entry, and two jobs publishing the same name at once get different
    versions. ``taken`` lists versions used under other roots (hosted models).
    """
    if (weights is None) != (card.sha256 is None) or (
        weights is not None and sha256_hex(weights) != card.sha256
    ):
        raise ModelLoadError(f"{card.name}: weights and the card's sha256 do not match")
    try:
        return publish_files(root, card, {} if weights is None else {WEIGHTS_FILE: weights}, taken)
    except PublishError as exc:
        raise ModelLoadError(str(exc)) from exc
