"""The gateway on the S3 store (a real S3-speaking server, tests/s3server.py): an accepted job's
inputs are in the bucket; the registry is the store's (what another machine published is listed,
counted in quotas and deleted for every machine); a store that does not answer is a 503 and no
job is queued."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from redis import Redis

from models.manifest import CardIndex
from models.registry_store import StoreRegistry
from models.store import S3Store
from service.app import create_app
from service.settings import Settings
from tests.api.test_api import attack, npy_b64, queued
from tests.s3server import S3Server, s3_server  # noqa: F401 - the session fixture


def test_inputs_go_to_the_bucket(settings: Settings, redis: Redis, s3_server: S3Server) -> None:  # noqa: F811
    bucket = s3_server.new_bucket()
    s3 = settings.model_copy(update={"blob_store": "s3", "s3_bucket": bucket,
                                     "s3_endpoint_url": s3_server.endpoint_url})
    with TestClient(create_app(s3), raise_server_exceptions=False) as client:
        x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
        response = attack(client, inputs={"array": npy_b64(x), "labels": [0, 1, 2]})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert S3Store(bucket, endpoint_url=s3_server.endpoint_url).list("inputs") == [f"inputs/{job_id}.npz"]
    assert queued(redis) == 1
    assert not (settings.var_dir / "blobs").exists()


def test_a_store_that_does_not_answer_is_a_503(settings: Settings, redis: Redis) -> None:
    down = settings.model_copy(update={"blob_store": "s3", "s3_bucket": "nowhere",
                                       "s3_endpoint_url": "http://127.0.0.1:1"})
    with TestClient(create_app(down), raise_server_exceptions=False) as client:
        x = np.zeros((2, 1, 28, 28), dtype=np.float32)
        response = attack(client, inputs={"array": npy_b64(x), "labels": [0, 1]})
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "blob store" in response.json()["detail"] and "Retry-After" in response.headers
    assert queued(redis) == 0
    with TestClient(create_app(down), raise_server_exceptions=False) as client:
        for method, path in (("GET", "/v1/models"), ("GET", "/v1/models/theirs"),
                             ("DELETE", "/v1/models/theirs@1"), ("GET", "/v1/datasets")):
            answer = client.request(method, path)
            assert answer.status_code == 503, (path, answer.text)
            assert answer.headers["content-type"].startswith("application/problem+json")
        assert client.get("/v1/models/fmnist-cnn").status_code == 200  # hosted: no store request


def test_the_registry_is_the_stores(settings: Settings, redis: Redis, s3_server: S3Server,  # noqa: F811
                                    tmp_path: Path) -> None:
    bucket = s3_server.new_bucket()
    s3 = settings.model_copy(update={"blob_store": "s3", "s3_bucket": bucket, "max_models_per_team": 1,
                                     "s3_endpoint_url": s3_server.endpoint_url})
    store = S3Store(bucket, endpoint_url=s3_server.endpoint_url)
    hosted = CardIndex.default().card("fmnist-cnn")
    assert hosted is not None
    weights = b"weights published by a worker on another machine"
    card = hosted.model_copy(update={"name": "theirs", "team": "public",
                                     "sha256": hashlib.sha256(weights).hexdigest()})
    elsewhere = StoreRegistry(store, "models", tmp_path / "worker-cache")  # another machine's worker
    assert elsewhere.publish(card, {"weights.safetensors": weights}).ref == "theirs@1"
    with TestClient(create_app(s3), raise_server_exceptions=False) as client:
        listed = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
        assert listed["theirs"]["version"] == 1 and not listed["theirs"]["hosted"]
        assert client.get("/v1/models/theirs@1").json()["sha256"] == card.sha256
        directory = CardIndex.default().directory("fmnist-cnn")
        assert directory is not None
        upload = client.post("/v1/models", data={"card": json.dumps({
            "name": "mine", "input_shape": [1, 28, 28], "classes": list(hosted.classes),
            "architecture": hosted.architecture})},
            files={"weights": ("w.safetensors", (directory / "weights.safetensors").read_bytes())})
        assert upload.status_code == 429, upload.text  # the store's version counts against the quota
        assert upload.json()["code"] == "quota-models"
        assert client.delete("/v1/models/theirs@1").status_code == 204
        assert client.get("/v1/models/theirs").status_code == 404
        assert client.delete("/v1/models/theirs@1").status_code == 404
    assert elsewhere.versions("theirs") == [] and store.list("registry/models/theirs") == [
        "registry/models/theirs/1.claim"]
    assert not (settings.var_dir / "models").exists()
