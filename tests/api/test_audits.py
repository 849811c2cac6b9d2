"""``POST /v1/audits`` at the gateway (no worker): chunk jobs and their merge job are queued, every
refusal names its field and queues nothing, and an audit's status follows its chunks."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from tests.api.test_api import assert_problem

DATASET = {"dataset": "fashion-mnist:test", "offset": 0, "limit": 100}


def queue(redis: Redis) -> Queue:
    return Queue("audits", connection=redis, serializer=JSONSerializer)


def audit(client: TestClient, **overrides: Any) -> Any:
    body: dict[str, Any] = {"model": "fmnist-cnn", "inputs": DATASET, "suite": "quick", "seed": 0}
    body.update(overrides)
    return client.post("/v1/audits", json={k: v for k, v in body.items() if v is not None})


def test_an_audit_is_split_into_chunks_and_a_merge(client: TestClient, redis: Redis) -> None:
    response = audit(client, chunk_size=40, thresholds=["robust_accuracy@linf:8/255 >= 0.4",
                                                         "clean_accuracy >= 0.9", "masking_checks == pass"])
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["kind"] == "audit" and job["status"] == "queued"
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["stage"] == {"chunks": 3, "chunks_done": 0, "chunks_running": 0}
    chunks = [Job.fetch(f"{job['id']}c{i}", connection=redis, serializer=JSONSerializer) for i in range(3)]
    payloads = [c.args[0] for c in chunks]
    assert [(p["inputs"]["offset"], p["inputs"]["n"]) for p in payloads] == [(0, 40), (40, 40), (80, 20)]
    audit_spec = payloads[0]["audit"]
    assert audit_spec["suite"] == "quick" and list(audit_spec["grids"]) == ["linf"]
    assert audit_spec["grids"]["linf"][3] == 8 / 255 and audit_spec["check_eps"] == {"linf": 0.1}
    assert queue(redis).count == 3  # the merge job waits for its dependencies
    merge = Job.fetch(job["id"], connection=redis, serializer=JSONSerializer)
    assert merge.get_status() == JobStatus.DEFERRED and merge.args[0]["chunk_ids"] == [c.id for c in chunks]

    # A chunk taken by a worker makes the audit running; a failed chunk makes it failed.
    chunks[0].set_status(JobStatus.STARTED)
    chunks[0].meta["progress"] = 0.5
    chunks[0].save_meta()
    redis.set("adversa:alive:w", 1, ex=30)
    chunks[0].worker_name = "w"
    chunks[0].save()
    view = client.get(f"/v1/jobs/{job['id']}").json()
    assert view["status"] == "running" and 0 < view["progress"] < 0.2
    assert view["stage"]["chunks_running"] == 1

    # Canceling the audit cancels its chunks that have not run.
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 202
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "canceled"
    later = Job.fetch(chunks[2].id, connection=redis, serializer=JSONSerializer)
    assert later.get_status() == JobStatus.CANCELED


def uint8_images(n: int) -> str:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((n, 28, 28), dtype=np.uint8))
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_failed_chunk_fails_the_audit(client: TestClient, redis: Redis) -> None:
    job = audit(client, chunk_size=50).json()
    chunk = Job.fetch(f"{job['id']}c1", connection=redis, serializer=JSONSerializer)
    chunk.meta["error"] = {"code": "internal", "message": "boom"}
    chunk.save_meta()
    chunk.set_status(JobStatus.FAILED)
    view = client.get(f"/v1/jobs/{job['id']}").json()
    assert view["status"] == "failed" and view["error"]["code"] == "internal"
    assert view["error"]["message"] == "chunk 1: boom"


@pytest.mark.parametrize("body", [
    {"suite": "standard"},
    {"suite": "minimal"},
    {"suite": None, "attacks": [{"name": "pgd", "eps": 0.1}, {"name": "deepfool"},
                                {"name": "square", "eps": 0.1, "norm": "l2", "max_queries": 100}],
     "norms": ["linf", "l2"]},
    {"eps": {"linf": [0.1, 0.05]}, "surrogates": ["fmnist-resnet18"]},
    {"inputs": {"array": "<3 images>", "labels": [0, 1, 2]}},
])
def test_audit_variants_are_accepted(client: TestClient, redis: Redis, body: dict[str, Any]) -> None:
    if "inputs" in body:
        body = {"inputs": {**body["inputs"], "array": uint8_images(3)}}
    response = audit(client, **body)
    assert response.status_code == 202, response.text
    assert queue(redis).count >= 1


@pytest.mark.parametrize(("overrides", "status", "field"), [
    ({"model": "nope"}, 404, "model"),
    ({"suite": "heavy"}, 422, "suite"),
    ({"suite": "custom"}, 422, "attacks"),
    ({"suite": "quick", "attacks": [{"name": "fgsm", "eps": 0.1}]}, 422, "attacks"),
    ({"suite": None, "attacks": [{"name": "pgd", "eps": 0.1, "steps": 0}]}, 422, "attacks[0].steps"),
    ({"suite": None, "attacks": [{"name": "fgsm", "eps": 0.1, "targeted": True, "target_mode": "random"}]},
     422, "attacks[0].targeted"),
    ({"suite": None, "attacks": [{"name": "pgd", "eps": 0.1}, {"name": "pgd", "eps": 0.2}]}, 422, "attacks"),
    ({"suite": None, "attacks": [{"name": "square", "eps": 0.1, "max_queries": 10**6}]}, 422,
     "attacks[0]"),
    ({"suite": None, "attacks": [{"name": "advgan", "generator": "g"}]}, 422, "attacks[0].name"),
    ({"eps": {"linf": [0.1, 2.0]}}, 422, "eps.linf"),
    ({"eps": {"linf": [-0.1]}}, 422, "eps.linf[0]"),
    ({"eps": {"l3": [0.1]}}, 422, "eps.l3"),
    ({"norms": ["linf"], "eps": {"l2": [0.5]}}, 422, "eps"),
    ({"steps": 5000}, 422, "steps"),
    ({"suite": "standard", "steps": 200}, 422, "steps"),
    ({"square_queries": 10**6}, 422, "square_queries"),
    ({"n_target_classes": 10}, 422, "n_target_classes"),
    ({"surrogates": ["ghost"]}, 404, "surrogates[0]"),
    ({"thresholds": ["clean_accuracy >= 0.9", "robust_acc@linf:0.1 >= 0.4"]}, 422, "thresholds[1]"),
    ({"thresholds": ["robust_accuracy@linf:0.15 >= 0.4"]}, 422, "thresholds[0]"),
    ({"thresholds": ["robust_accuracy@l2:0.5 >= 0.4"]}, 422, "thresholds[0]"),
    ({"inputs": {"dataset": "fashion-mnist:test", "offset": 9990, "limit": 20}}, 422, "inputs.limit"),
    ({"chunk_size": 1}, 422, "chunk_size"),
    ({"colour": "red"}, 422, "colour"),
])
def test_bad_audits_are_refused(client: TestClient, redis: Redis, overrides: dict[str, Any], status: int,
                                field: str) -> None:
    assert_problem(audit(client, **overrides), status, field)
    assert queue(redis).count == 0


def test_audit_idempotency_and_openapi(client: TestClient, redis: Redis) -> None:
    headers = {"Idempotency-Key": "ci-123"}
    body = {"model": "fmnist-cnn", "inputs": DATASET, "suite": "quick", "seed": 0}
    first = client.post("/v1/audits", json=body, headers=headers)
    second = client.post("/v1/audits", json=body, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"] and queue(redis).count == 1
    schema = client.get("/openapi.json").json()
    assert "/v1/audits" in schema["paths"] and "AuditRequest" in schema["components"]["schemas"]


def test_the_autoattack_suite_and_fab_t_are_accepted(client: TestClient, redis: Redis) -> None:
    response = audit(client, suite="autoattack", eps={"linf": [0.1], "l2": [1.0]}, chunk_size=100)
    assert response.status_code == 202, response.text
    payload = Job.fetch(f"{response.json()['id']}c0", connection=redis, serializer=JSONSerializer).args[0]
    assert payload["audit"]["suite"] == "autoattack" and set(payload["audit"]["grids"]) == {"linf", "l2"}
    custom = audit(client, suite=None, attacks=[{"name": "fab-t", "eps": 0.1, "steps": 20}])
    assert custom.status_code == 202, custom.text
    assert_problem(audit(client, suite="autoattack", steps=200), 422, "steps")
    assert_problem(audit(client, suite="quick", per_attack_curves=True), 422, "per_attack_curves")
    curves = audit(client, suite="standard", per_attack_curves=True)
    assert curves.status_code == 202, curves.text
    payload = Job.fetch(f"{curves.json()['id']}c0", connection=redis, serializer=JSONSerializer).args[0]
    assert payload["audit"]["per_attack_curves"] is True
    assert_problem(audit(client, suite=None, attacks=[{"name": "fab-t", "eps": 0.1, "eta": 5}]), 422,
                   "attacks[0].eta")
