"""Compositions: registry models made of other registry models (preprocessing, ensembles).

A composition has no weights of its own; its card names its parts, and the worker builds the
module from the parts' warm modules. The result is an ordinary logits module, so every attack runs
against a defended model unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from models.manifest import ModelCard
from workers.defenses.ensemble import Ensemble
from workers.defenses.preprocess import Preprocess, Preprocessed


def build_composite(card: ModelCard, parts: Sequence[nn.Module]) -> nn.Module:
    """The module of a composition card from its parts' modules (in the card's order)."""
    composition = card.composition
    assert composition is not None, f"{card.ref} is not a composition"
    module: nn.Module
    if composition.kind == "preprocessing":
        (base,) = parts
        module = Preprocessed(Preprocess(list(composition.steps), card.bounds), base)
    else:
        assert composition.combine is not None
        module = Ensemble(list(parts), composition.combine)
    module.eval()
    module.requires_grad_(False)
    return module
