"""Limits per team on a real Redis, no worker: request rate, active jobs and queue length answer 429
with ``Retry-After`` and a detail naming the setting; another team is unaffected; a place comes back
when a job is canceled or ends, however it ends."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from service.app import create_app
from service.settings import Settings
from tests.api.test_api import assert_oip_error, assert_problem

A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}
FGSM = {"model": "fmnist-cnn", "attack": {"name": "fgsm", "eps": 0.1},
        "inputs": {"dataset": "fashion-mnist:test", "offset": 0, "limit": 8}}
AUDIT = {"model": "fmnist-cnn", "suite": "quick", "chunk_size": 8,
         "inputs": {"dataset": "fashion-mnist:test", "offset": 0, "limit": 24}}


@pytest.fixture
def limited(settings: Settings, redis: Redis, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    update: dict[str, Any] = {"api_keys": {"key-a": "team-a", "key-b": "team-b"}, **request.param}
    with TestClient(create_app(settings.model_copy(update=update)), raise_server_exceptions=False) as client:
        yield client


def assert_limited(response: Any, setting: str) -> int:
    body = assert_problem(response, 429)
    assert setting in body["detail"], body
    wait = int(response.headers["Retry-After"])
    assert wait >= 1
    return wait


def attacks_queued(redis: Redis) -> int:
    return Queue("attacks", connection=redis, serializer=JSONSerializer).count


@pytest.mark.parametrize("limited", [{"rate_limit": "3/minute"}], indirect=True)
def test_request_rate_per_team(limited: TestClient) -> None:
    for _ in range(3):
        assert limited.get("/v1/models", headers=A).status_code == 200
    wait = assert_limited(limited.get("/v1/models", headers=A), "ADVERSA_RATE_LIMIT")
    assert wait <= 60
    # Every team route counts, /v2 answers in the protocol's shape with the same header.
    refused = limited.get("/v2/models/fmnist-cnn", headers=A)
    assert_oip_error(refused, 429, "ADVERSA_RATE_LIMIT")
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert limited.get("/v1/models", headers=B).status_code == 200
    assert limited.get("/healthz").status_code == 200
    assert 'adversa_limited_total{limit="rate"}' in limited.get("/metrics").text


@pytest.mark.parametrize("limited", [{"max_active_jobs_per_team": 2}], indirect=True)
def test_active_jobs_per_team(limited: TestClient, redis: Redis) -> None:
    first = limited.post("/v1/attacks", json=FGSM, headers={**A, "Idempotency-Key": "one"})
    assert first.status_code == 202, first.text
    second = limited.post("/v1/attacks", json={**FGSM, "seed": 2}, headers=A).json()["id"]
    assert_limited(limited.post("/v1/attacks", json={**FGSM, "seed": 3}, headers=A),
                   "ADVERSA_MAX_ACTIVE_JOBS_PER_TEAM")
    assert attacks_queued(redis) == 2  # the refused request left nothing behind
    # A retry of an accepted request is answered with its job, not refused.
    replay = limited.post("/v1/attacks", json=FGSM, headers={**A, "Idempotency-Key": "one"})
    assert replay.status_code == 202 and replay.json()["id"] == first.json()["id"]
    assert limited.post("/v1/attacks", json=FGSM, headers=B).status_code == 202  # another team

    assert limited.delete(f"/v1/jobs/{second}", headers=A).status_code == 202
    third = limited.post("/v1/attacks", json={**FGSM, "seed": 4}, headers=A)
    assert third.status_code == 202, third.text
    assert_limited(limited.post("/v1/attacks", json={**FGSM, "seed": 5}, headers=A),
                   "ADVERSA_MAX_ACTIVE_JOBS_PER_TEAM")

    # A job whose worker died with no retries left frees its place; one with retries does not.
    job = Job.fetch(third.json()["id"], connection=redis, serializer=JSONSerializer)
    job.worker_name = "gone-worker"
    job.retries_left = 1
    job.set_status(JobStatus.STARTED)
    job.save()
    assert_limited(limited.post("/v1/attacks", json={**FGSM, "seed": 6}, headers=A),
                   "ADVERSA_MAX_ACTIVE_JOBS_PER_TEAM")
    job.retries_left = 0
    job.save()
    assert limited.post("/v1/attacks", json={**FGSM, "seed": 7}, headers=A).status_code == 202
    # So does one that ends (here: fails) on a worker.
    Job.fetch(first.json()["id"], connection=redis, serializer=JSONSerializer).set_status(JobStatus.FAILED)
    assert limited.post("/v1/attacks", json={**FGSM, "seed": 8}, headers=A).status_code == 202


@pytest.mark.parametrize("limited", [{"max_active_jobs_per_team": 2, "max_queued_jobs_per_team": 5}],
                         indirect=True)
def test_an_audit_is_one_job_and_its_chunks_fill_the_queue(limited: TestClient, redis: Redis) -> None:
    audit = limited.post("/v1/audits", json=AUDIT, headers=A)
    assert audit.status_code == 202, audit.text
    assert Queue("audits", connection=redis, serializer=JSONSerializer).count == 3  # chunks; the merge waits
    assert limited.post("/v1/attacks", json=FGSM, headers=A).status_code == 202  # the audit is one job
    # 3 chunks + the merge + the attack wait: the queue length limit refuses even a prediction.
    assert_limited(limited.post("/v1/attacks", json=FGSM, headers=A), "ADVERSA_MAX_QUEUED_JOBS_PER_TEAM")
    infer = {"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]}
    assert_oip_error(limited.post("/v2/models/fmnist-cnn/infer", json=infer, headers=A), 429,
                     "ADVERSA_MAX_QUEUED_JOBS_PER_TEAM")
    assert limited.post("/v1/attacks", json=FGSM, headers=B).status_code == 202
    # Canceling the audit cancels its chunks and frees both places.
    assert limited.delete(f"/v1/jobs/{audit.json()['id']}", headers=A).status_code == 202
    assert limited.post("/v1/attacks", json=FGSM, headers=A).status_code == 202
    text = limited.get("/metrics").text
    assert 'adversa_limited_total{limit="queued-jobs"}' in text


def test_openapi_lists_429_with_retry_after(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path, method in (("/v1/attacks", "post"), ("/v1/audits", "post"), ("/v1/defenses", "post"),
                         ("/v1/models", "post"), ("/v2/models/{name}/infer", "post"),
                         ("/v1/jobs/{job_id}", "get")):
        assert "Retry-After" in paths[path][method]["responses"]["429"]["headers"], (method, path)
    assert "429" not in paths["/healthz"]["get"]["responses"]
