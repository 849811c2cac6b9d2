"""The registry in the blob store (``models.registry_store``), for both backends: the filesystem
store and the S3 store against a real S3-speaking server (tests/s3server.py). Two indexes with
their own cache directories over one store stand for two machines that share no disk."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models.architectures import build
from models.datasets import DataCatalog, DatasetCard, DatasetIndex, blob_key, pack
from models.manifest import (
    CARD_FILE,
    HOSTED_DIR,
    WEIGHTS_FILE,
    CardIndex,
    DetectorCard,
    GeneratorIndex,
    Lineage,
    ModelCard,
)
from models.publish import PublishError
from models.registry import load_module, sha256_hex, weights_bytes
from models.registry_store import (
    CACHE_DIR,
    StoredFileError,
    StoreRegistry,
    open_registries,
    sweep_unpublished,
)
from models.store import BlobStore, BlobStoreUnavailable, FileStore
from tests.s3server import S3Server, any_store, s3_server  # noqa: F401 - fixtures
from workers.settings import CommonSettings

HOSTED = CardIndex.default().names()
LINEAGE = Lineage(recipe="upload", data="-", seed=0, created="2026-01-01T00:00:00Z")


def machine(store: BlobStore, var: Path) -> CardIndex:
    """The model index of one machine: hosted models, then the store's registry cached under ``var``."""
    cache = var / CACHE_DIR / "models"
    return CardIndex([HOSTED_DIR, cache], StoreRegistry(store, "models", cache))


def tiny(name: str = "tiny", team: str | None = "blue", seed: int = 0) -> tuple[ModelCard, bytes]:
    torch.manual_seed(seed)
    weights = weights_bytes(build("mlp", (1, 28, 28), 10))
    card = ModelCard(name=name, version=1, team=team, architecture="mlp", input_shape=(1, 28, 28),
                     mean=(0.0,), std=(1.0,), classes=tuple(str(i) for i in range(10)),
                     sha256=sha256_hex(weights), lineage=LINEAGE)
    return card, weights


def test_a_version_published_on_one_machine_loads_on_another(any_store: BlobStore, tmp_path: Path  # noqa: F811
                                                              ) -> None:
    a, b = machine(any_store, tmp_path / "a"), machine(any_store, tmp_path / "b")
    card, weights = tiny()
    published = a.publish(card, {WEIGHTS_FILE: weights})
    assert published.ref == "tiny@1"
    assert set(b.names()) - set(HOSTED) == {"tiny"} and b.versions("tiny") == [1]
    assert b.card("tiny") == published and b.card("tiny@1") == published
    assert not (tmp_path / "b" / CACHE_DIR / "models" / "tiny" / "1" / WEIGHTS_FILE).exists()
    directory = b.directory("tiny", 1)  # a worker loading it fetches the weights
    assert directory == tmp_path / "b" / CACHE_DIR / "models" / "tiny" / "1"
    assert (directory / WEIGHTS_FILE).read_bytes() == weights
    loaded, module = load_module(directory)
    assert loaded == published and module(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    # hosted models stay where the code ships them, next to the store's entries
    assert {"fmnist-cnn", "tiny"} <= set(b.names())
    hosted = b.directory("fmnist-cnn")
    assert hosted is not None and hosted.parent.parent == HOSTED_DIR
    assert [card.ref for card, _ in b.entries()] == ["tiny@1"]
    assert next(iter(b.entries()))[1] > len(weights)  # the weights and the card


def test_versions_are_never_reused_and_deletion_reaches_every_machine(any_store: BlobStore,  # noqa: F811
                                                                      tmp_path: Path) -> None:
    a, b = machine(any_store, tmp_path / "a"), machine(any_store, tmp_path / "b")
    card, weights = tiny()
    assert a.publish(card, {WEIGHTS_FILE: weights}).version == 1
    assert b.publish(card, {WEIGHTS_FILE: weights}).version == 2
    assert b.directory("tiny", 1) is not None and a.directory("tiny", 2) is not None
    assert b.unpublish("tiny", 2)
    assert not b.unpublish("tiny", 2) and not b.unpublish("tiny", 9) and not b.unpublish("../x", 1)
    assert a.versions("tiny") == [1] and a.card("tiny@2") is None and a.card("tiny").version == 1
    assert not (tmp_path / "a" / CACHE_DIR / "models" / "tiny" / "2").exists()  # A's copy is gone too
    assert any_store.list("registry/models/tiny/2") == []
    assert a.publish(card, {WEIGHTS_FILE: weights}).version == 3  # 2 names nothing, for ever
    assert a.unpublish("tiny", 1) and a.unpublish("tiny", 3)
    assert "tiny" not in b.names()
    assert b.card("tiny") is None
    assert b.publish(card, {WEIGHTS_FILE: weights}).version == 4


def test_concurrent_publications_get_distinct_versions(any_store: BlobStore, tmp_path: Path  # noqa: F811
                                                       ) -> None:
    indexes = [machine(any_store, tmp_path / str(i)) for i in range(6)]
    card, weights = tiny()
    versions: list[int] = []
    barrier = threading.Barrier(len(indexes))

    def publish(index: CardIndex) -> None:
        barrier.wait()
        versions.append(index.publish(card, {WEIGHTS_FILE: weights}).version)

    threads = [threading.Thread(target=publish, args=(index,)) for index in indexes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(versions) == sorted(set(versions)) and len(versions) == len(indexes)
    assert indexes[0].versions("tiny") == sorted(versions)


class FailingCardStore:
    """A store whose card writes fail (the store went away mid-publication)."""

    def __init__(self, inner: BlobStore) -> None:
        self.inner = inner

    def put(self, key: str, data: bytes) -> None:
        if key.endswith("/" + CARD_FILE):
            raise BlobStoreUnavailable("the store went away")
        self.inner.put(key, data)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_a_publication_that_fails_midway_leaves_no_version(any_store: BlobStore, tmp_path: Path  # noqa: F811
                                                           ) -> None:
    broken = CardIndex([tmp_path / "c"], StoreRegistry(FailingCardStore(any_store), "models",  # type: ignore[arg-type]
                                                       tmp_path / "c"))
    card, weights = tiny()
    with pytest.raises(BlobStoreUnavailable):
        broken.publish(card, {WEIGHTS_FILE: weights})
    other = machine(any_store, tmp_path / "b")
    assert other.names() == HOSTED and other.card("tiny@1") is None
    assert any_store.list("registry/models/tiny/1") == []  # the weights went again
    assert other.publish(card, {WEIGHTS_FILE: weights}).version == 2  # the claim stays


def test_the_sweep_removes_what_a_killed_publisher_left(any_store: BlobStore, tmp_path: Path  # noqa: F811
                                                         ) -> None:
    a = machine(any_store, tmp_path / "a")
    card, weights = tiny()
    a.publish(card, {WEIGHTS_FILE: weights})
    any_store.put("registry/models/tiny/2.claim", b"{}")  # a worker killed after its upload
    any_store.put(f"registry/models/tiny/2/{WEIGHTS_FILE}", weights)
    any_store.put("registry/models/fmnist-cnn/1/detectors/blue.json", b"{}")  # no claim: not a version
    assert sweep_unpublished(any_store, 3600) == []  # still within the grace: it may be uploading
    later = time.time() + 7200
    assert sweep_unpublished(any_store, 3600, now=later) == [f"registry/models/tiny/2/{WEIGHTS_FILE}"]
    assert any_store.exists("registry/models/tiny/2.claim")  # the number stays used
    assert any_store.exists("registry/models/fmnist-cnn/1/detectors/blue.json")
    assert any_store.exists(f"registry/models/tiny/1/{WEIGHTS_FILE}") and a.versions("tiny") == [1]
    assert a.publish(card, {WEIGHTS_FILE: weights}).version == 3


def test_files_are_checked_against_the_card(any_store: BlobStore, tmp_path: Path) -> None:  # noqa: F811
    a, b = machine(any_store, tmp_path / "a"), machine(any_store, tmp_path / "b")
    card, weights = tiny()
    a.publish(card, {WEIGHTS_FILE: weights})
    any_store.put(f"registry/models/tiny/1/{WEIGHTS_FILE}", weights[:-1] + bytes([weights[-1] ^ 1]))
    with pytest.raises(StoredFileError, match="sha256"):
        b.directory("tiny", 1)
    assert not (tmp_path / "b" / CACHE_DIR / "models" / "tiny" / "1" / WEIGHTS_FILE).exists()
    with pytest.raises(PublishError, match="plain file names"):
        a.publish(card, {"../x": weights})


def test_detectors_live_in_the_store(any_store: BlobStore, tmp_path: Path) -> None:  # noqa: F811
    a, b = machine(any_store, tmp_path / "a"), machine(any_store, tmp_path / "b")
    hosted = b.card("fmnist-cnn")
    assert hosted is not None
    shipped = b.detector(hosted, "blue")  # the hosted calibration, shipped with the code
    assert shipped is not None and shipped.team is None
    lineage = Lineage(recipe="feature-squeezing", data="-", seed=0, created="2026-01-01T00:00:00Z")
    mine = DetectorCard(model=hosted.ref, team="blue", squeezers=(({"name": "bit-depth", "bits": 4},),),
                        threshold=0.5, fpr=0.05, lineage=lineage)
    a.write_detector(hosted, mine)  # a team's calibration of a hosted model, from machine A
    assert b.detector(hosted, "blue") == mine
    assert b.detector(hosted, "red") == shipped
    assert any_store.exists("registry/models/fmnist-cnn/1/detectors/blue.json")
    assert "fmnist-cnn" not in b.mirror.names()  # a detector is no version  # type: ignore[union-attr]


def test_data_sets_published_on_the_gateway_load_on_a_worker(any_store: BlobStore, tmp_path: Path  # noqa: F811
                                                             ) -> None:
    def catalog(var: Path) -> DataCatalog:
        cache = var / CACHE_DIR / "datasets"
        return DataCatalog(None, var / "datasets", any_store,
                           index=DatasetIndex([cache], StoreRegistry(any_store, "datasets", cache)))

    gateway, worker = catalog(tmp_path / "a"), catalog(tmp_path / "b")
    x = np.random.default_rng(0).integers(0, 256, (5, 1, 4, 4), dtype=np.uint8)
    y = np.arange(5, dtype=np.int64) % 2
    blob = pack("test", x, y)
    draft = DatasetCard(name="mine", version=1, team="blue", input_shape=(1, 4, 4), classes=("a", "b"),
                        dtype="uint8", splits={"test": 5}, class_counts={"test": [3, 2]},
                        sha256=sha256_hex(blob), bytes=len(blob), format="npz", created="2026-01-01T00:00:00Z")
    published = gateway.publish(draft, blob)
    assert published.ref == "mine@1"
    xs, ys = worker.load("mine:test", team="blue")
    assert np.array_equal(ys, y) and np.allclose(xs, x / 255.0)
    assert not (tmp_path / "a" / "datasets").exists() and not (tmp_path / "b" / "datasets").exists()
    assert worker.delete("mine", 1)
    assert gateway.index.card("mine") is None and not any_store.exists(blob_key(draft.sha256))


def test_settings_place_the_registries(tmp_path: Path, s3_server: S3Server) -> None:  # noqa: F811
    local = open_registries(CommonSettings(var_dir=tmp_path), FileStore(tmp_path / "blobs"))
    assert local.models.roots == [HOSTED_DIR, tmp_path / "models"] and local.models.mirror is None
    assert local.generators.writable == tmp_path / "generators"
    assert local.datasets.writable == tmp_path / "datasets"
    settings = CommonSettings(var_dir=tmp_path, blob_store="s3", s3_bucket=s3_server.new_bucket(),
                              s3_endpoint_url=s3_server.endpoint_url)
    from models.store import open_store

    shared = open_registries(settings, open_store(settings))
    for index, kind in ((shared.models, "models"), (shared.generators, "generators"),
                        (shared.datasets, "datasets")):
        assert index.mirror is not None and index.mirror.prefix == f"registry/{kind}"
        assert index.writable == tmp_path / CACHE_DIR / kind
    assert isinstance(shared.generators, GeneratorIndex)
    assert shared.models.card("fmnist-cnn") is not None  # hosted, without asking the store
