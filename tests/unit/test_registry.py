"""Model cards, the blob store, safe loading and the data set loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models import datasets
from models.architectures import build
from models.manifest import CARD_FILE, WEIGHTS_FILE, CardIndex, ModelCard, parse_ref
from models.registry import ModelLoadError, load_module, sha256_hex, weights_bytes, write_model
from models.store import BlobNotFoundError, FileStore


def hosted_card() -> ModelCard:
    card = CardIndex.default().card("fmnist-cnn")
    assert card is not None
    return card


@pytest.mark.parametrize("name", ["fmnist-cnn", "fmnist-resnet18"])
def test_hosted_model_card_and_weights(name: str) -> None:
    card = CardIndex.default().card(name)
    assert card is not None and card.ref == f"{name}@1"
    assert card.metrics["clean_accuracy"] >= 0.90
    assert card.input_shape == (1, 28, 28) and card.num_classes == 10
    directory = CardIndex.default().directory(name)
    assert directory is not None
    assert sha256_hex((directory / WEIGHTS_FILE).read_bytes()) == card.sha256
    _, module = load_module(directory)
    assert not module.training
    assert not any(p.requires_grad for p in module.parameters())


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    card = hosted_card()
    source = CardIndex.default().directory("fmnist-cnn")
    assert source is not None
    target = tmp_path / "fmnist-cnn" / "1"
    target.mkdir(parents=True)
    data = bytearray((source / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (target / WEIGHTS_FILE).write_bytes(bytes(data))
    card.write(target / CARD_FILE)
    with pytest.raises(ModelLoadError, match="sha256"):
        load_module(target)


def test_write_model_round_trip_and_index(tmp_path: Path) -> None:
    base = hosted_card()
    body = build("mlp", (1, 28, 28), 10)
    weights = weights_bytes(body)
    card = base.model_copy(update={"name": "tiny", "architecture": "mlp",
                                   "sha256": sha256_hex(weights)})
    write_model(tmp_path, card, weights)
    index = CardIndex([tmp_path])
    assert index.names() == ["tiny"]
    assert index.card("tiny@1") == card
    assert index.card("tiny@2") is None and index.card("nope") is None
    assert index.card("../etc") is None
    _, module = load_module(tmp_path / "tiny" / "1")
    x = torch.rand(3, 1, 28, 28)
    assert module(x).shape == (3, 10)


def test_card_validation() -> None:
    data = json.loads(hosted_card().model_dump_json())
    with pytest.raises(ValueError):
        ModelCard.model_validate({**data, "name": "Bad Name"})
    with pytest.raises(ValueError):
        ModelCard.model_validate({**data, "mean": [0.1, 0.2]})
    with pytest.raises(ValueError):
        ModelCard.model_validate({**data, "unexpected": 1})
    assert parse_ref("a@3") == ("a", 3) and parse_ref("a") == ("a", None)
    with pytest.raises(ValueError):
        parse_ref("a@x")


@pytest.mark.parametrize("name", ["linear", "mlp", "resnet18-small", "small-cnn"])
def test_catalog_builds_28x28(name: str) -> None:
    """The Fashion-MNIST architectures (the whole catalog: tests/unit/test_architectures.py)."""
    module = build(name, (1, 28, 28), 10).eval()
    assert module(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_file_store(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.put("jobs/a/x.bin", b"abc")
    assert store.get("jobs/a/x.bin") == b"abc"
    assert store.exists("jobs/a/x.bin") and store.list("jobs") == ["jobs/a/x.bin"]
    with pytest.raises(BlobNotFoundError):
        store.get("jobs/a/missing")
    for bad in ("../x", "/abs", "a//b", "a/../b"):
        with pytest.raises(ValueError):
            store.put(bad, b"")
    store.delete_prefix("jobs/a")
    assert not store.exists("jobs/a/x.bin")


def test_fashion_mnist_loader() -> None:
    assert datasets.split_size("fashion-mnist:test") == 10_000
    assert datasets.split_size("fashion-mnist:train") == 60_000
    x, y = datasets.load_split("fashion-mnist:test").slice(10, 5)
    assert x.shape == (5, 1, 28, 28) and x.dtype == np.float32
    assert x.min() >= 0 and x.max() <= 1 and y.dtype == np.int64
    assert set(np.unique(datasets.load_split("fashion-mnist:test").labels)) == set(range(10))
    with pytest.raises(ValueError, match="fashion-mnist:test"):
        datasets.parse_name("mnist:test")


def test_missing_dataset_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    monkeypatch.setattr(datasets, "DEFAULT_DIRS", (tmp_path / "none",))
    monkeypatch.delenv("ADVERSA_DATA_DIR", raising=False)
    with pytest.raises(datasets.DatasetMissingError, match="apt-get install dataset-fashion-mnist"):
        datasets.data_dir()
