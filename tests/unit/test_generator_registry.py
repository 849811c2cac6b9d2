"""The generator registry: cards, the index, atomic publishing and deletion (never reusing a
version), sha256-checked loading, the worker's cache, and the hook that runs a loaded generator
through the attack jobs' chunk loop."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from models.manifest import (
    CARD_FILE,
    DISCRIMINATOR_FILE,
    GENERATOR_FILE,
    CardIndex,
    GeneratorCard,
    GeneratorIndex,
    Lineage,
)
from models.publish import PublishError, publish_files, unpublish, used_versions
from models.registry import ModelLoadError, sha256_hex
from tests.unit.support import fmnist_test, hosted
from workers.attacks.advgan import AdvGANAttackSpec
from workers.cache import GeneratorCache, UnknownGeneratorError
from workers.generators.advgan import build_discriminator, build_generator, perturb
from workers.generators.registry import load_discriminator, load_generator, network_files
from workers.jobs import craft, kernel_spec
from workers.scores import evaluate, summarize
from workers.specs import AdvGANParams

FMNIST = (1, 28, 28)


def card_fields(**overrides: Any) -> dict[str, Any]:
    base = CardIndex.default().card("fmnist-cnn")
    assert base is not None
    fields: dict[str, Any] = {
        "name": "gen", "version": 1, "team": "public", "target_model": base.ref,
        "input_shape": base.input_shape, "bounds": base.bounds, "classes": base.classes, "eps": 0.2,
        "mode": "semi-white-box", "generator_sha256": "0" * 64, "discriminator_sha256": "1" * 64,
        "lineage": Lineage(base_model=base.ref, recipe="advgan", data="fashion-mnist:train", seed=0,
                           created="2025-01-01T00:00:00Z"),
    }
    fields.update(overrides)
    return fields


def networks(shape: tuple[int, int, int] = FMNIST, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_generator(shape).eval(), build_discriminator(shape).eval()


def store_generator(root: Path, name: str = "gen", team: str | None = "public", seed: int = 0,
                    **overrides: Any) -> GeneratorCard:
    """Publish a generator with seeded (untrained) weights under ``root``, as a job would."""
    shape = overrides.get("input_shape", FMNIST)
    gen, disc = networks(shape, seed)
    files = network_files(gen, disc)
    card = GeneratorCard(**card_fields(name=name, team=team, generator_sha256=sha256_hex(files[GENERATOR_FILE]),
                                       discriminator_sha256=sha256_hex(files[DISCRIMINATOR_FILE]), **overrides))
    return publish_files(root, card, files)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"targeted": True}, "target_class exactly when targeted"),
    ({"target_class": 3}, "target_class exactly when targeted"),
    ({"targeted": True, "target_class": 10}, "target_class < 10"),
    ({"eps": 1.5}, "eps <= 1"),
    ({"eps": 0.0}, "greater than 0"),
    ({"name": "Bad Name"}, "kebab-case"),
    ({"generator_sha256": "abc"}, "pattern"),
    ({"mode": "white-box"}, "semi-white-box"),
    ({"weights": "x"}, "Extra inputs"),
])
def test_card_validation(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GeneratorCard(**card_fields(**overrides))
    card = GeneratorCard(**card_fields(targeted=True, target_class=0))
    assert card.ref == "gen@1" and card.num_classes == 10
    assert card.files == {GENERATOR_FILE: "0" * 64, DISCRIMINATOR_FILE: "1" * 64}
    assert card.visible_to("public") and not card.visible_to("other")


def test_a_generator_fits_only_models_with_its_inputs_and_classes() -> None:
    card = GeneratorCard(**card_fields())
    model = CardIndex.default().card("fmnist-resnet18")
    assert model is not None and card.fits(model) is None  # same inputs and classes: a transfer
    reason = card.fits(model.model_copy(update={"input_shape": (1, 8, 8)}))
    assert reason is not None and "input_shape" in reason
    reason = card.fits(model.model_copy(update={"classes": model.classes[:5]}))
    assert reason is not None and "classes" in reason


def test_publish_numbers_versions_and_deletion_never_reuses_one(tmp_path: Path) -> None:
    first = store_generator(tmp_path)
    second = store_generator(tmp_path, seed=1)
    assert (first.version, second.version) == (1, 2)
    index = GeneratorIndex([tmp_path])
    assert index.names() == ["gen"] and index.versions("gen") == [1, 2]
    assert index.card("gen") == second and index.card("gen@1") == first
    assert sorted(p.name for p in (tmp_path / "gen" / "2").iterdir()) == [
        CARD_FILE, DISCRIMINATOR_FILE, GENERATOR_FILE]

    assert unpublish(tmp_path, "gen", 2)
    assert not unpublish(tmp_path, "gen", 2)  # already gone
    assert index.card("gen@2") is None and index.card("gen") == first and index.versions("gen") == [1]
    assert used_versions(tmp_path / "gen") == {1, 2}
    assert store_generator(tmp_path, seed=2).version == 3  # not 2: gen@2 names nothing for ever
    assert unpublish(tmp_path, "gen", 1) and unpublish(tmp_path, "gen", 3)
    assert index.names() == [] and index.card("gen") is None
    assert not any(p.name.startswith(".trash") for p in (tmp_path / "gen").iterdir())
    for name, version in (("gen", 9), ("../gen", 1), ("gen", 0)):
        assert not unpublish(tmp_path, name, version)


def test_a_publish_that_fails_half_way_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(src: object, dst: object) -> None:
        raise OSError(errno.EIO, "disk gone")

    monkeypatch.setattr(os, "rename", broken)
    with pytest.raises(OSError, match="disk gone"):
        store_generator(tmp_path)
    monkeypatch.undo()
    assert list((tmp_path / "gen").iterdir()) == []  # no version, no staging directory
    # A worker killed before the rename leaves a staging directory: the index never lists it.
    staging = tmp_path / "gen" / ".staging-killed"
    staging.mkdir()
    GeneratorCard(**card_fields()).write(staging / CARD_FILE)
    index = GeneratorIndex([tmp_path])
    assert index.names() == [] and index.card("gen") is None
    assert store_generator(tmp_path).version == 1
    with pytest.raises(PublishError, match="plain file names"):
        publish_files(tmp_path, GeneratorCard(**card_fields()), {"../x": b""})


def test_load_round_trip_and_tampered_files_are_refused(tmp_path: Path) -> None:
    card = store_generator(tmp_path)
    directory = tmp_path / "gen" / "1"
    loaded_card, gen = load_generator(directory)
    disc = load_discriminator(directory)
    assert loaded_card == card and not gen.training and not any(p.requires_grad for p in gen.parameters())
    original_gen, original_disc = networks()
    x = torch.rand(4, *FMNIST, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(gen(x), original_gen(x)) and torch.equal(disc(x), original_disc(x))
    data = bytearray((directory / GENERATOR_FILE).read_bytes())
    data[-1] ^= 0xFF
    (directory / GENERATOR_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="sha256"):
        load_generator(directory)
    (directory / DISCRIMINATOR_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="sha256"):
        load_discriminator(directory)
    # A card whose digests match files of the wrong shape: refused when the tensors are parsed.
    other = tmp_path / "other"
    gen_8, disc_8 = networks((3, 8, 8))
    files = network_files(gen_8, disc_8)
    publish_files(other, GeneratorCard(**card_fields(
        generator_sha256=sha256_hex(files[GENERATOR_FILE]),
        discriminator_sha256=sha256_hex(files[DISCRIMINATOR_FILE]))), files)
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_generator(other / "gen" / "1")


def test_the_cache_keeps_generators_warm_and_forgets_deleted_ones(tmp_path: Path) -> None:
    for seed in range(3):
        store_generator(tmp_path, name=f"gen-{seed}", seed=seed)
    cache = GeneratorCache(GeneratorIndex([tmp_path]), torch.device("cpu"), capacity=2)
    card, gen = cache.get("gen-0")
    assert card.ref == "gen-0@1" and cache.get("gen-0@1")[1] is gen
    cache.get("gen-1")
    cache.get("gen-2")  # evicts gen-0
    assert cache.get("gen-0")[1] is not gen
    assert unpublish(tmp_path, "gen-0", 1)
    with pytest.raises(UnknownGeneratorError, match="gen-0"):
        cache.get("gen-0")  # still in memory, but deleted
    with pytest.raises(UnknownGeneratorError):
        cache.get("never-trained")


def test_a_loaded_generator_runs_through_the_chunk_loop() -> None:
    model = hosted()
    x, y = fmnist_test(24)
    gen, _ = networks()
    attack = AdvGANParams(name="advgan", generator="gen@1")
    loaded = {"generator": gen, "eps": 0.05, "targeted": False}
    _, spec = kernel_spec(attack, loaded)
    assert spec == AdvGANAttackSpec(generator=gen, eps=0.05, targeted=False)
    x_adv, queries, gradients = craft(model, x, y, attack, 10, torch.Generator(), loaded=loaded)
    assert (x_adv - x).abs().max() <= 0.05 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    correct = model.logits(x).argmax(1) == y
    with torch.no_grad():  # chunks of 10 give what one pass over the batch gives
        assert torch.allclose(x_adv[correct], perturb(gen, x[correct], 0.05, (0.0, 1.0)), atol=1e-6)
    assert torch.equal(queries, torch.where(correct, 2, 1)) and int(gradients.sum()) == 0


def test_targeted_success_is_over_inputs_not_already_of_the_target() -> None:
    model = hosted()
    x, y = fmnist_test(64)
    clean_pred = model.logits(x).argmax(1)
    targets = torch.zeros_like(y)
    # "Adversarial" inputs equal to the clean ones: only class-0 inputs would "hit" class 0.
    ev = evaluate(model, x, y, x.clone(), clean_pred, targets, 64)
    scores = summarize(ev, y, clean_pred, True, False)
    assert int(((y == 0) & (clean_pred == y)).sum()) > 0
    assert scores["success_rate"] == 0.0 and scores["successes"] == 0
    assert not bool((ev.success & (y == 0)).any())


def test_generator_cards_are_plain_json(tmp_path: Path) -> None:
    card = store_generator(tmp_path, targeted=True, target_class=7)
    data = json.loads((tmp_path / "gen" / "1" / CARD_FILE).read_text())
    assert data["kind"] == "advgan" and data["target_class"] == 7 and data["targeted"] is True
    assert GeneratorCard.model_validate(data) == card
