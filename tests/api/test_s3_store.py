"""The gateway on the S3 store (a real S3-speaking server, tests/s3server.py): an accepted job's
inputs are in the bucket; a store that does not answer is a 503 and no job is queued."""

from __future__ import annotations

import numpy as np
from fastapi.testclient import TestClient
from redis import Redis

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
