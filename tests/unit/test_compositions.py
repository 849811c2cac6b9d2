"""Registry entries made by defenses: atomic publishing, composition cards, warm composite models,
and where detectors are found."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from models.architectures import build
from models.manifest import CARD_FILE, CardIndex, Composition, DetectorCard, Lineage, ModelCard
from models.registry import ModelLoadError, load_module, publish, sha256_hex, weights_bytes
from tests.unit.support import fmnist_test
from workers.cache import ModelCache
from workers.defenses.preprocess import bpda


def hosted_card() -> ModelCard:
    card = CardIndex.default().card("fmnist-cnn")
    assert card is not None
    return card


def composition_card(name: str, composition: Composition) -> ModelCard:
    return hosted_card().model_copy(update={
        "name": name, "architecture": composition.kind, "sha256": None, "composition": composition,
        "team": "public"})


def test_publish_takes_the_next_free_version_atomically(tmp_path: Path) -> None:
    weights = weights_bytes(build("mlp", (1, 28, 28), 10))
    card = hosted_card().model_copy(update={"name": "mine", "architecture": "mlp",
                                            "sha256": sha256_hex(weights)})
    first = publish(tmp_path, card, weights)
    second = publish(tmp_path, card, weights)
    assert (first.version, second.version) == (1, 2)
    # Versions held under another root (the hosted directory) are skipped.
    third = publish(tmp_path, card, weights, taken=[3, 4])
    assert third.version == 5
    index = CardIndex([tmp_path])
    assert index.versions("mine") == [1, 2, 5]
    assert ModelCard.read(tmp_path / "mine" / "5" / CARD_FILE).version == 5
    # No staging directory is left behind, and a leftover one is invisible to the index.
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["1", "2", "5"]
    (tmp_path / "mine" / ".staging-dead").mkdir()
    assert index.versions("mine") == [1, 2, 5]
    with pytest.raises(ModelLoadError, match="sha256"):
        publish(tmp_path, card, weights + b"x")
    assert index.versions("mine") == [1, 2, 5]


def test_a_composition_card_has_parts_instead_of_weights() -> None:
    steps = ({"name": "bit-depth", "bits": 4},)
    card = composition_card("wrapped", Composition(kind="preprocessing", base="fmnist-cnn@1", steps=steps,
                                                   differentiable=False))
    assert card.sha256 is None and not card.differentiable
    assert card.composition is not None and card.composition.parts == ("fmnist-cnn@1",)
    with pytest.raises(ValidationError, match="exactly one"):
        card.model_copy(update={"sha256": "0" * 64}).model_validate(
            {**card.model_dump(), "sha256": "0" * 64})
    with pytest.raises(ValidationError, match="exactly one"):
        ModelCard.model_validate({**hosted_card().model_dump(), "sha256": None})
    with pytest.raises(ValidationError, match="at least two members"):
        Composition(kind="ensemble", members=("a@1",), combine="majority-vote")
    with pytest.raises(ValidationError, match="architecture"):
        ModelCard.model_validate({**card.model_dump(), "architecture": "small-cnn"})


def test_the_cache_builds_compositions_from_warm_parts(tmp_path: Path) -> None:
    steps = ({"name": "bit-depth", "bits": 2},)
    publish(tmp_path, composition_card("wrapped", Composition(
        kind="preprocessing", base="fmnist-cnn@1", steps=steps, differentiable=False)), None)
    publish(tmp_path, composition_card("pair", Composition(
        kind="ensemble", members=("fmnist-cnn@1", "wrapped@1"), combine="mean-probabilities",
        differentiable=False)), None)
    cache = ModelCache(CardIndex.default([tmp_path]), torch.device("cpu"), capacity=4)
    _, base = cache.get("fmnist-cnn")
    card, wrapped = cache.get("wrapped")
    assert card.ref == "wrapped@1" and not wrapped.differentiable and base.differentiable
    x, _ = fmnist_test(16)
    squeezed = torch.round(x * 3) / 3
    torch.testing.assert_close(wrapped.logits(x), base.logits(squeezed))
    # Without BPDA the bit-depth step hides the gradient; with it, the gradient is the base's at
    # the squeezed point.
    loss = lambda logits: logits[:, 0].sum()  # noqa: E731
    _, grad = wrapped.value_and_grad(x, loss)
    assert grad.abs().max() == 0
    with bpda(wrapped.module):
        _, grad = wrapped.value_and_grad(x, loss)
    torch.testing.assert_close(grad, base.value_and_grad(squeezed, loss)[1])
    _, pair = cache.get("pair")
    expected = (base.logits(x).softmax(1) + wrapped.logits(x).softmax(1)) / 2
    torch.testing.assert_close(pair.logits(x).softmax(1), expected)
    with pytest.raises(ModelLoadError, match="composition"):
        load_module(tmp_path / "wrapped" / "1")


def test_detectors_are_found_for_the_team_first(tmp_path: Path) -> None:
    card = hosted_card()
    index = CardIndex([tmp_path / "hosted", tmp_path / "var"])

    def detector(threshold: float, team: str | None) -> DetectorCard:
        return DetectorCard(model=card.ref, team=team, squeezers=(({"name": "bit-depth", "bits": 2},),),
                            threshold=threshold, fpr=0.05,
                            lineage=Lineage(recipe="feature-squeezing", data="-", seed=0, created="-"))

    assert index.detector(card, "blue") is None
    detector(0.5, None).write(tmp_path / "hosted" / card.name / "1" / "detector.json")
    assert index.detector(card, "blue") == detector(0.5, None)
    detector(0.7, "blue").write(tmp_path / "var" / card.name / "1" / "detectors" / "blue.json")
    found = index.detector(card, "blue")
    assert found is not None and found.threshold == 0.7
    other = index.detector(card, "red")
    assert other is not None and other.threshold == 0.5
    # A team name that is not a safe file name is hashed, never used as a path.
    assert "/" not in index.detector_paths(card, "../../etc")[0].name
