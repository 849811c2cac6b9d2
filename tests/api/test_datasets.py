"""``/v1/datasets`` through the gateway (in-process, real Redis, no worker): uploads, listing, cards,
deletion, teams, refusals that leave nothing behind, and data-set references in job requests."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from models.datasets import DataCatalog, build_skimage_patches
from models.manifest import CardIndex
from models.store import FileStore
from service.app import create_app
from service.settings import Settings
from tests.api.test_api import PGD, assert_problem

A, B = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}


@pytest.fixture
def keyed(settings: Settings) -> Settings:
    return settings.model_copy(update={"api_keys": {"key-a": "team-a", "key-b": "team-b"},
                                       "max_datasets_per_team": 3, "max_dataset_files": 100})


@pytest.fixture
def teams(keyed: Settings, redis: Redis) -> Iterator[TestClient]:
    with TestClient(create_app(keyed), raise_server_exceptions=False) as client:
        yield client


def npz(x: np.ndarray, y: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=y)
    return buffer.getvalue()


def eval_set(n: int = 12, shape: tuple[int, ...] = (28, 28), classes: int = 10, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return npz(rng.integers(0, 256, (n, *shape), dtype=np.uint8), np.arange(n) % classes)


def image_zip(size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for k, name in enumerate(("bird", "cat")):
            for i in range(2):
                image = io.BytesIO()
                Image.new("RGB", size, (40 * k, 10 * i, 0)).save(image, format="PNG")
                archive.writestr(f"{name}/{i}.png", image.getvalue())
    return buffer.getvalue()


def upload(client: TestClient, spec: dict[str, Any] | str, data: bytes, filename: str = "eval.npz",
           headers: dict[str, str] | None = None) -> Any:
    text = spec if isinstance(spec, str) else json.dumps(spec)
    return client.post("/v1/datasets", data={"spec": text}, files={"data": (filename, data)},
                       headers=headers or A)


def attack(client: TestClient, inputs: dict[str, Any], model: str = "fmnist-cnn",
           headers: dict[str, str] | None = None, **attack: Any) -> Any:
    return client.post("/v1/attacks", json={"model": model, "attack": {**PGD, **attack}, "inputs": inputs,
                                            "seed": 0}, headers=headers or A)


def attack_payloads(redis: Redis) -> list[dict[str, Any]]:
    return [job.args[0] for job in Queue("attacks", connection=redis, serializer=JSONSerializer).jobs]


def state(client: TestClient, settings: Settings) -> tuple[Any, list[str], list[str]]:
    """What a refused upload must leave unchanged: the listing, the blobs and the card directories."""
    listing = client.get("/v1/datasets", headers=A).json()
    blobs = FileStore(settings.blob_root).list("datasets")
    root = settings.datasets_root
    dirs = sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.is_dir() else []
    return listing, blobs, [d for d in dirs if "/" in d]


def test_upload_list_get_and_delete(teams: TestClient, keyed: Settings) -> None:
    response = upload(teams, {"name": "my-eval", "description": "ten shirts"}, eval_set())
    assert response.status_code == 201, response.text
    card = response.json()
    assert response.headers["location"] == "/v1/datasets/my-eval@1"
    assert card["version"] == 1 and card["team"] == "team-a" and card["input_shape"] == [1, 28, 28]
    assert card["splits"] == {"all": 12} and card["references"] == ["my-eval@1:all"]
    assert card["dtype"] == "uint8" and card["format"] == "npz"
    assert card["classes"] == [str(i) for i in range(10)]
    assert card["class_counts"] == {"all": [2, 2, 1, 1, 1, 1, 1, 1, 1, 1]}
    assert FileStore(keyed.blob_root).list("datasets") == [f"datasets/{card['sha256']}.npz"]

    # The same content again is a new version of the same data, stored once.
    again = upload(teams, {"name": "my-eval"}, eval_set())
    assert again.status_code == 201 and again.json()["version"] == 2
    assert again.json()["sha256"] == card["sha256"]
    assert len(FileStore(keyed.blob_root).list("datasets")) == 1
    images = upload(teams, {"name": "pets", "classes": ["cat", "bird", "fish"]}, image_zip(), "pets.zip")
    assert images.status_code == 201, images.text
    assert images.json()["format"] == "image-folder" and images.json()["input_shape"] == [3, 8, 8]
    assert images.json()["class_counts"] == {"all": [2, 2, 0]}

    listing = teams.get("/v1/datasets", headers=A).json()["datasets"]
    hosted = {d["name"]: d for d in listing if d["hosted"]}
    assert hosted["fashion-mnist"]["splits"] == {"train": 60_000, "test": 10_000}
    assert hosted["skimage-patches"]["input_shape"] == [3, 32, 32]
    assert hosted["skimage-patches"]["splits"] == {"train": 4800, "test": 1200}
    own = [(d["name"], d["version"], d["versions"]) for d in listing if not d["hosted"]]
    assert own == [("my-eval", 2, [1, 2]), ("pets", 1, [1])]
    assert teams.get("/v1/datasets/my-eval", headers=A).json()["version"] == 2
    assert teams.get("/v1/datasets/my-eval@1", headers=A).json()["versions"] == [1, 2]
    assert teams.get("/v1/datasets/skimage-patches", headers=A).json()["classes"][1] == "cat (chelsea)"
    assert_problem(teams.get("/v1/datasets/my-eval@7", headers=A), 404, "dataset")
    assert_problem(teams.get("/v1/datasets/nope", headers=A), 404, "dataset")

    # Deleting a version keeps the data while another version uses it; the last one takes it along.
    assert_problem(teams.delete("/v1/datasets/my-eval", headers=A), 422, "dataset")
    assert_problem(teams.delete("/v1/datasets/fashion-mnist@1", headers=A), 403, "dataset")
    assert teams.delete("/v1/datasets/my-eval@1", headers=A).status_code == 204
    assert_problem(teams.delete("/v1/datasets/my-eval@1", headers=A), 404, "dataset")
    assert len(FileStore(keyed.blob_root).list("datasets")) == 2
    assert teams.delete("/v1/datasets/my-eval@2", headers=A).status_code == 204
    assert FileStore(keyed.blob_root).list("datasets") == [f"datasets/{images.json()['sha256']}.npz"]
    # Numbers are never reused.
    assert upload(teams, {"name": "my-eval"}, eval_set()).json()["version"] == 3


def test_another_team_cannot_see_use_or_delete_it(teams: TestClient, redis: Redis) -> None:
    assert upload(teams, {"name": "my-eval"}, eval_set()).status_code == 201
    assert [d["name"] for d in teams.get("/v1/datasets", headers=B).json()["datasets"] if not d["hosted"]] == []
    assert_problem(teams.get("/v1/datasets/my-eval", headers=B), 404, "dataset")
    assert_problem(teams.get("/v1/datasets/my-eval@1", headers=B), 404, "dataset")
    assert_problem(teams.delete("/v1/datasets/my-eval@1", headers=B), 404, "dataset")
    body = assert_problem(attack(teams, {"dataset": "my-eval:all", "limit": 4}, headers=B), 422,
                          "inputs.dataset")
    assert "my-eval" in body["detail"] and "team-a" not in body["detail"]
    # The name is taken (names are global), and hosted names are reserved.
    assert_problem(upload(teams, {"name": "my-eval"}, eval_set(), headers=B), 409, "spec.name")
    assert_problem(upload(teams, {"name": "fashion-mnist"}, eval_set()), 409, "spec.name")
    assert_problem(teams.get("/v1/datasets", headers={"Authorization": "Bearer nope"}), 401)
    assert attack_payloads(redis) == []


BAD_UPLOADS = [
    ("not multipart", None, None, 415, None),
    ("no spec", "", eval_set(), 400, "spec"),
    ("spec not JSON", "{", eval_set(), 400, "spec"),
    ("bad name", {"name": "My Eval"}, eval_set(), 422, "spec.name"),
    ("unknown spec field", {"name": "x", "labels": [1]}, eval_set(), 422, "spec.labels"),
    ("too few classes", {"name": "x", "classes": ["a"]}, eval_set(), 422, "spec.classes"),
    ("labels past the classes", {"name": "x", "classes": ["a", "b"]}, eval_set(), 422, "data"),
    ("pickled member", {"name": "x"}, npz(np.array([{"a": 1}], dtype=object), np.array([0])), 422, "data"),
    ("float out of range", {"name": "x"}, npz(np.full((2, 1, 4, 4), 3.0, np.float32), np.arange(2)), 422,
     "data"),
    ("too many samples", {"name": "x"}, eval_set(n=200_000, shape=(1, 1)), 413, "data"),
    ("traversal", {"name": "x"}, None, 422, "data"),
    ("too many files", {"name": "x"}, None, 413, "data"),
    ("mixed sizes", {"name": "x"}, None, 422, "data"),
    ("a text file named .npz", {"name": "x"}, b"just text", 422, "data"),
]


def _archive(case: str) -> bytes:
    buffer = io.BytesIO()
    image = io.BytesIO()
    Image.new("L", (8, 8)).save(image, format="PNG")
    with zipfile.ZipFile(buffer, "w") as archive:
        if case == "traversal":
            archive.writestr("../../etc/cat/0.png", image.getvalue())
        elif case == "too many files":
            for i in range(101):
                archive.writestr(f"cat/{i}.png", image.getvalue())
        else:
            archive.writestr("cat/0.png", image.getvalue())
            other = io.BytesIO()
            Image.new("L", (9, 8)).save(other, format="PNG")
            archive.writestr("dog/0.png", other.getvalue())
    return buffer.getvalue()


@pytest.mark.parametrize(("case", "spec", "data", "status", "field"), BAD_UPLOADS,
                         ids=[c[0] for c in BAD_UPLOADS])
def test_bad_uploads_are_refused_and_leave_nothing(teams: TestClient, keyed: Settings, case: str, spec: Any,
                                                   data: bytes | None, status: int, field: str | None) -> None:
    assert upload(teams, {"name": "kept"}, eval_set()).status_code == 201
    before = state(teams, keyed)
    if case == "not multipart":
        response = teams.post("/v1/datasets", json={"name": "x"}, headers=A)
    elif spec == "":
        response = teams.post("/v1/datasets", files={"data": ("d.npz", data)}, headers=A)
    else:
        response = upload(teams, spec, data if data is not None else _archive(case),
                          "d.zip" if data is None else "d.npz")
    assert_problem(response, status, field)
    assert state(teams, keyed) == before


def test_quota_of_versions_per_team(teams: TestClient) -> None:
    for seed in range(3):
        assert upload(teams, {"name": "q"}, eval_set(seed=seed)).status_code == 201
    assert_problem(upload(teams, {"name": "q"}, eval_set(seed=9)), 429)
    assert upload(teams, {"name": "q"}, eval_set(seed=9), headers=B).status_code == 409  # name taken, not quota
    assert teams.delete("/v1/datasets/q@1", headers=A).status_code == 204
    assert upload(teams, {"name": "q"}, eval_set(seed=9)).status_code == 201


def test_jobs_name_team_sets_pinned_and_checked_against_the_model(teams: TestClient, redis: Redis) -> None:
    assert upload(teams, {"name": "my-eval"}, eval_set()).status_code == 201
    response = attack(teams, {"dataset": "my-eval:all", "offset": 2, "limit": 8})
    assert response.status_code == 202, response.text
    inputs = attack_payloads(redis)[0]["inputs"]
    assert inputs == {"kind": "dataset", "n": 8, "dataset": "my-eval@1:all", "offset": 2, "key": None,
                      "has_labels": True}
    assert attack(teams, {"dataset": "my-eval@1:all", "limit": 12}).status_code == 202
    assert_problem(attack(teams, {"dataset": "my-eval:all", "offset": 4, "limit": 12}), 422, "inputs.limit")
    assert_problem(attack(teams, {"dataset": "my-eval:test"}), 422, "inputs.dataset")
    assert_problem(attack(teams, {"dataset": "my-eval@2:all"}), 422, "inputs.dataset")
    # Targets are checked against the set's labels (label i % 10 here).
    assert_problem(attack(teams, {"dataset": "my-eval:all", "limit": 2}, targeted=True, targets=[3, 1]),
                   422, "attack.targets")

    # A set whose samples are not the model's input shape.
    assert upload(teams, {"name": "rgb"}, eval_set(shape=(8, 8, 3))).status_code == 201
    body = assert_problem(attack(teams, {"dataset": "rgb:all", "limit": 4}), 422, "inputs.dataset")
    assert "(1, 28, 28)" in body["detail"] and "(3, 8, 8)" in body["detail"]

    # More classes than the model: only slices whose labels fit pass.
    assert upload(teams, {"name": "wide"}, npz(np.zeros((24, 28, 28), np.uint8), np.arange(24) % 12)
                  ).status_code == 201
    assert attack(teams, {"dataset": "wide:all", "limit": 10}).status_code == 202
    body = assert_problem(attack(teams, {"dataset": "wide:all", "limit": 12}), 422, "inputs.dataset")
    assert "labels below 10" in body["detail"] and "label 11" in body["detail"]

    # Audits and defenses take team sets too, pinned.
    audit = teams.post("/v1/audits", json={"model": "fmnist-cnn", "suite": "quick",
                                           "inputs": {"dataset": "my-eval:all", "limit": 12}}, headers=A)
    assert audit.status_code == 202, audit.text
    chunk = Queue("audits", connection=redis, serializer=JSONSerializer).jobs[0].args[0]
    assert chunk["inputs"]["dataset"] == "my-eval@1:all"
    defense = teams.post("/v1/defenses", json={
        "model": "fmnist-cnn", "defense": {"name": "fgsm-adversarial-training", "data": "wide:all"},
        "evaluation": {"data": "my-eval:all", "robust_limit": 10}, "output": "mine"}, headers=A)
    assert_problem(defense, 422, "defense.data.dataset")  # labels 10 and 11 do not fit
    defense = teams.post("/v1/defenses", json={
        "model": "fmnist-cnn", "defense": {"name": "fgsm-adversarial-training", "data": "my-eval:all"},
        "evaluation": {"data": "my-eval:all", "robust_limit": 10}, "output": "mine"}, headers=A)
    assert defense.status_code == 202, defense.text
    payload = Queue("defenses", connection=redis, serializer=JSONSerializer).jobs[0].args[0]
    assert payload["defense"]["data"] == "my-eval@1:all" and payload["evaluation"]["data"] == "my-eval@1:all"


def test_skimage_patches_with_the_skimage_cnn_model(teams: TestClient, redis: Redis) -> None:
    card = CardIndex.default().card("skimage-cnn")
    assert card is not None and card.input_shape == (3, 32, 32) and card.num_classes == 8
    assert card.lineage.data == "skimage-patches:train" and card.metrics["clean_accuracy"] > 0.7
    response = attack(teams, {"dataset": "skimage-patches:test", "limit": 16}, model="skimage-cnn", eps=8 / 255)
    assert response.status_code == 202, response.text
    assert attack_payloads(redis)[0]["inputs"]["dataset"] == "skimage-patches:test"
    assert_problem(attack(teams, {"dataset": "skimage-patches:test"}), 422, "inputs.dataset")
    assert_problem(attack(teams, {"dataset": "fashion-mnist:test"}, model="skimage-cnn"), 422, "inputs.dataset")
    assert_problem(attack(teams, {"dataset": "skimage-patches:test", "offset": 1200}, model="skimage-cnn"),
                   422, "inputs.offset")
    assert_problem(attack(teams, {"dataset": "skimage-patches@1:test"}, model="skimage-cnn"), 422,
                   "inputs.dataset")


def test_the_catalog_loads_what_was_uploaded(teams: TestClient, keyed: Settings) -> None:
    x = np.random.default_rng(3).random((5, 3, 4, 4), dtype=np.float32)
    response = upload(teams, {"name": "floats", "split": "val"}, npz(x, np.array([0, 1, 0, 1, 1])))
    assert response.status_code == 201
    catalog = DataCatalog(keyed.data_dir, keyed.datasets_root, FileStore(keyed.blob_root))
    info = catalog.describe("floats:val", "team-a")
    assert (info.ref, info.size, info.input_shape, info.max_label) == ("floats@1:val", 5, (3, 4, 4), 1)
    loaded, labels = catalog.load("floats@1:val", 1, 3, "team-a")
    assert np.array_equal(loaded, x[1:4]) and labels.tolist() == [1, 0, 1]
    from workers.errors import JobFailure
    from workers.jobs import load_dataset

    fmnist = CardIndex.default().card("fmnist-cnn")
    assert fmnist is not None
    model = fmnist.model_copy(update={"input_shape": (3, 4, 4), "bounds": (-1.0, 1.0), "classes": ("a", "b")})
    scaled, _ = load_dataset(catalog, "floats:val", 0, None, "team-a", model)
    assert np.allclose(scaled, x * 2 - 1) and scaled.dtype == np.float32
    with pytest.raises(JobFailure, match="labels below 1"):
        load_dataset(catalog, "floats:val", 0, None, "team-a", model.model_copy(update={"classes": ("a",)}))
    with pytest.raises(JobFailure, match="shape"):
        load_dataset(catalog, "skimage-patches:test", 0, 4, "team-a", model)
    with pytest.raises(JobFailure, match="floats@9"):
        load_dataset(catalog, "floats@9:val", 0, None, "team-a", model)
    gray = eval_set(n=4)
    assert upload(teams, {"name": "bytes"}, gray).status_code == 201
    loaded, _ = catalog.load("bytes:all", 0, None, "team-a")
    assert loaded.dtype == np.float32 and loaded.shape == (4, 1, 28, 28) and loaded.max() <= 1.0
    patches, patch_labels = catalog.load("skimage-patches:train", 0, 10)
    assert patches.shape == (10, 3, 32, 32)
    assert np.array_equal(patch_labels, build_skimage_patches("train")[1][:10])
    assert np.array_equal(catalog.labels("skimage-patches:test", 5, 5), build_skimage_patches("test")[1][5:10])


def test_a_failed_publish_leaves_no_blob_behind(teams: TestClient, keyed: Settings,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from models import datasets
    from models.publish import PublishError

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise PublishError("disk full")

    monkeypatch.setattr(datasets.DatasetIndex, "publish", fail)
    before = state(teams, keyed)
    assert upload(teams, {"name": "my-eval"}, eval_set()).status_code == 500
    assert state(teams, keyed) == before
