"""``/metrics`` on a real Redis, no worker process: requests labelled by route template whoever
answered them, queue depth and age, live workers, and the job outcomes that workers record."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.worker import Worker

from contracts import telemetry
from service.app import create_app
from service.settings import Settings

FGSM = {"model": "fmnist-cnn", "attack": {"name": "fgsm", "eps": 0.1},
        "inputs": {"dataset": "fashion-mnist:test", "offset": 0, "limit": 8}}


def scrape(client: TestClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def routes(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> set[str]:
    return {dict(labels)["route"] for name, labels in samples if name == "adversa_requests_total"}


def test_requests_are_labelled_by_route_template(settings: Settings, redis: Redis) -> None:
    small = settings.model_copy(update={"max_body_bytes": 1024})
    with TestClient(create_app(small), raise_server_exceptions=False) as client:
        assert client.get("/v1/jobs/0123abcd").status_code == 404  # the route's own answer
        assert client.get("/v1/jobs/not-an-id!").status_code == 422  # the path parameter's check
        assert client.put("/v1/jobs/0123abcd").status_code == 405  # no such method
        assert client.post("/v1/attacks", content=b"x" * 2048,  # the body limit, before routing
                           headers={"content-type": "application/json"}).status_code == 413
        assert client.get("/v2/models/nope").status_code == 404  # rewritten by the OIP middleware
        for path in ("/nope/1", "/nope/2", "/v1/nope"):
            assert client.get(path).status_code == 404
        samples = scrape(client)
    for route, method, status in (("/v1/jobs/{job_id}", "GET", "404"), ("/v1/jobs/{job_id}", "GET", "422"),
                                  ("/v1/jobs/{job_id}", "PUT", "405"), ("/v1/attacks", "POST", "413"),
                                  ("/v2/models/{name}", "GET", "404"), ("unmatched", "GET", "404")):
        assert value(samples, "adversa_requests_total", method=method, route=route, status=status) >= 1
    assert value(samples, "adversa_requests_total", method="GET", route="unmatched", status="404") >= 3
    assert not any("nope" in route or "0123abcd" in route for route in routes(samples))
    assert value(samples, "adversa_request_seconds_count", method="POST", route="/v1/attacks") >= 1


def test_queue_depth_age_and_live_workers(client: TestClient, redis: Redis) -> None:
    samples = scrape(client)
    assert value(samples, "adversa_redis_up") == 1
    assert value(samples, "adversa_queue_depth", queue="attacks") == 0
    assert value(samples, "adversa_queue_oldest_age_seconds", queue="attacks") == 0
    assert value(samples, "adversa_workers_live") == 0

    assert client.post("/v1/attacks", json=FGSM).status_code == 202
    assert client.post("/v1/attacks", json={**FGSM, "seed": 1}).status_code == 202
    samples = scrape(client)
    assert value(samples, "adversa_queue_depth", queue="attacks") == 2
    assert value(samples, "adversa_queue_depth", queue="predict") == 0
    assert value(samples, "adversa_queue_oldest_age_seconds", queue="attacks") > 0
    assert value(samples, "adversa_jobs_running", queue="attacks") == 0

    worker = Worker([Queue("attacks", connection=redis, serializer=JSONSerializer)], connection=redis,
                    name="metrics-test")
    worker.register_birth()
    try:
        assert value(scrape(client), "adversa_workers_live") == 1
    finally:
        worker.register_death()
    assert value(scrape(client), "adversa_workers_live") == 0


def test_job_outcomes_recorded_by_workers(client: TestClient, redis: Redis, settings: Settings) -> None:
    job_id = client.post("/v1/attacks", json=FGSM).json()["id"]
    job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    key = telemetry.metrics_key(settings.queue_prefix)
    telemetry.record_end(redis, key, job, "failed", 3.0)
    telemetry.record_end(redis, key, job, "succeeded", 0.2)
    telemetry.record_retry(redis, key, job)
    samples = scrape(client)
    failed: dict[str, Any] = {"kind": "attack", "outcome": "failed"}
    assert value(samples, "adversa_job_duration_seconds_bucket", le="2.5", **failed) == 0
    assert value(samples, "adversa_job_duration_seconds_bucket", le="5.0", **failed) == 1
    assert value(samples, "adversa_job_duration_seconds_bucket", le="+Inf", **failed) == 1
    assert value(samples, "adversa_job_duration_seconds_count", **failed) == 1
    assert value(samples, "adversa_job_duration_seconds_sum", **failed) == 3.0
    assert value(samples, "adversa_job_duration_seconds_count", kind="attack", outcome="succeeded") == 1
    assert value(samples, "adversa_job_retries_total", kind="attack") == 1


def test_metrics_answer_without_redis(settings: Settings) -> None:
    with TestClient(create_app(settings, redis=Redis(port=1, socket_connect_timeout=1)),
                    raise_server_exceptions=False) as client:
        samples = scrape(client)
    assert value(samples, "adversa_redis_up") == 0


def test_lost_workers_retries_and_losses(client: TestClient, redis: Redis, settings: Settings,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """What a live worker records when RQ's cleanup finds a job whose worker stopped beating."""
    from rq.exceptions import AbandonedJobError

    from workers.liveness import HeartbeatWorker

    monkeypatch.setenv("ADVERSA_VAR_DIR", str(settings.var_dir))  # the worker's history database
    job = Job.fetch(client.post("/v1/attacks", json=FGSM).json()["id"], connection=redis,
                    serializer=JSONSerializer)
    worker = HeartbeatWorker([Queue("attacks", connection=redis, serializer=JSONSerializer)],
                             heartbeat_ttl=15, retries=2, result_ttl=60, connection=redis,
                             serializer=JSONSerializer, queue_prefix=settings.queue_prefix)
    job.retries_left = 1
    worker._on_abandoned(job, AbandonedJobError, AbandonedJobError(), None)
    job.retries_left = 0
    worker._on_abandoned(job, AbandonedJobError, AbandonedJobError(), None)
    samples = scrape(client)
    assert value(samples, "adversa_job_retries_total", kind="attack") == 1
    assert value(samples, "adversa_job_duration_seconds_count", kind="attack", outcome="worker-lost") == 1
