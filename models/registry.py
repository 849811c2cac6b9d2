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
from models.manifest import CARD_FILE, ONNX_ARCHITECTURE, ONNX_FILE, WEIGHTS_FILE, ModelCard
from models.publish import PublishError, publish_files


class ModelLoadError(RuntimeError):
    """A model's files are missing, corrupt, or do not fit its architecture."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assemble(card: ModelCard, body: nn.Module) -> nn.Sequential:
    """Fold the card's normalisation in front of an architecture body."""
    return nn.Sequential(Normalize(card.mean, card.std), body)


class FixedBatch(nn.Module):
    """Runs a graph exported with a fixed batch size on any batch: inputs are split into chunks of
    ``batch`` and the last chunk is padded with copies of its first row; padded outputs are
    dropped. In eval mode every row's output depends on that row alone, so this changes nothing
    but the cost of a partial chunk."""

    def __init__(self, inner: nn.Module, batch: int) -> None:
        super().__init__()
        self.inner = inner
        self.batch = batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for chunk in x.split(self.batch):
            n = chunk.shape[0]
            if n < self.batch:
                chunk = torch.cat([chunk, chunk[:1].expand(self.batch - n, *chunk.shape[1:])])
            outputs.append(self.inner(chunk)[:n])
        return torch.cat(outputs)


def _checked(path: Path, digest: str | None, ref: str) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{ref}: cannot read {path.name}: {exc}") from exc
    found = sha256_hex(raw)
    if found != digest:
        raise ModelLoadError(f"{ref}: {path.name} sha256 {found} does not match the card ({digest})")
    return raw


def load_state(module: nn.Module, raw: bytes, ref: str, what: str) -> None:
    """Load safetensors ``raw`` into ``module`` strictly; a state dict that does not fit is a
    ``ModelLoadError`` listing missing/unexpected keys and shape mismatches."""
    from models.architectures import state_dict_mismatch

    try:
        state = load_safetensors(raw)
    except Exception as exc:  # safetensors raises its own error types on corrupt input
        raise ModelLoadError(f"{ref}: expected safetensors weights: {exc}") from exc
    mismatch = state_dict_mismatch(module, state)
    if mismatch is not None:
        raise ModelLoadError(f"{ref}: weights do not fit {what}: {mismatch}")
    module.load_state_dict(state, strict=True)


def build_body(card: ModelCard, directory: Path) -> nn.Module:
    """The architecture body of a stored model with its weights (normalisation not folded in):
    a catalog architecture with ``weights.safetensors``, or an ONNX graph converted with
    onnx2torch (its own weights, or ``weights.safetensors`` from a defense that trained it)."""
    if card.architecture == ONNX_ARCHITECTURE:
        from models.onnx_import import load_onnx

        body = load_onnx(_checked(directory / ONNX_FILE, card.sha256, card.ref))
        if WEIGHTS_FILE in card.files:
            raw = _checked(directory / WEIGHTS_FILE, card.files[WEIGHTS_FILE], card.ref)
            load_state(body, raw, card.ref, "its ONNX graph")
        return FixedBatch(body, card.static_batch) if card.static_batch else body
    body = build(card.architecture, card.input_shape, card.num_classes)
    load_state(body, _checked(directory / WEIGHTS_FILE, card.sha256, card.ref), card.ref, card.architecture)
    return body


def trainable_body(body: nn.Module) -> nn.Module:
    """The module whose state dict is a model's weights (a fixed-batch wrapper's inner graph)."""
    return body.inner if isinstance(body, FixedBatch) else body


def load_module(directory: Path, device: torch.device | str = "cpu") -> tuple[ModelCard, nn.Module]:
    """Load the model stored in ``directory`` (card + weights), in eval mode, frozen, on ``device``.

    Compositions (preprocessing, ensembles) are built by the workers from their parts.
    """
    card = ModelCard.read(directory / CARD_FILE)
    if card.composition is not None:
        raise ModelLoadError(f"{card.ref} is a {card.composition.kind} composition, not weights")
    module = assemble(card, build_body(card, directory)).to(device).eval()
    module.requires_grad_(False)
    if torch.device(device).type == "cpu":
        # oneDNN's channels-last convolutions and max-pooling skip the reorders NCHW needs. Measured
        # on fmnist-cnn-pgd-at, 1 thread, 71 images: a forward 2.1x and a forward+backward 1.3x
        # faster (bench/results/layout-fmnist-cnn.md: 1.2-1.7x per attack). Convolutions then sum
        # in another order, so logits move in the last bits (about 1e-6). Inputs stay NCHW; the
        # first convolution reorders them. Not applied on accelerators, where it was not measured.
        module.to(memory_format=torch.channels_last)
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
