"""History through HTTP, Redis and a real worker, over SQLite and PostgreSQL: a finished attack and
audit stay readable (result, listing, artifacts, the model's audit history) after their Redis keys
are flushed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis import Redis

from tests.integration.conftest import start_service, submit, wait


@pytest.fixture
def service(redis_url: str, history_url: str, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[httpx.Client]:
    Redis.from_url(redis_url).flushdb()
    monkeypatch.setenv("ADVERSA_HISTORY_URL", history_url)
    running = start_service(redis_url, tmp_path / "var", worker_name="history-worker")
    try:
        yield running.client
    finally:
        running.stop()
        Redis.from_url(redis_url).flushdb()


def test_finished_jobs_survive_a_redis_flush(service: httpx.Client, redis_url: str) -> None:
    attack_id = submit(service, {"model": "fmnist-cnn", "attack": {"name": "fgsm", "eps": 0.1}, "seed": 0,
                                 "inputs": {"dataset": "fashion-mnist:test", "offset": 0, "limit": 4}})
    audit = service.post("/v1/audits", json={
        "model": "fmnist-cnn", "suite": "quick", "eps": {"linf": [0.05, 0.1]}, "steps": 5, "seed": 0,
        "inputs": {"dataset": "fashion-mnist:test", "offset": 0, "limit": 8},
        "thresholds": ["robust_accuracy@linf:0.1 >= 0"]})
    assert audit.status_code == 202, audit.text
    audit_id = audit.json()["id"]
    attack = wait(service, attack_id)
    finished_audit = wait(service, audit_id)
    assert attack["status"] == "succeeded", attack
    assert finished_audit["status"] == "succeeded", finished_audit

    Redis.from_url(redis_url).flushdb()

    recorded = service.get(f"/v1/jobs/{attack_id}").json()
    assert recorded["status"] == "succeeded" and recorded["result"] == attack["result"]
    assert recorded["model"] == "fmnist-cnn@1" and recorded["ended_at"] is not None
    listed = service.get("/v1/jobs").json()["jobs"]
    assert {(j["id"], j["kind"], j["status"]) for j in listed} == {
        (attack_id, "attack", "succeeded"), (audit_id, "audit", "succeeded")}  # no chunk jobs
    grid = service.get(f"/v1/jobs/{attack_id}/artifacts/grid.png")
    assert grid.status_code == 200 and grid.content.startswith(b"\x89PNG")
    audits = service.get("/v1/models/fmnist-cnn/audits").json()["audits"]
    assert [(a["id"], a["verdict"]) for a in audits] == [(audit_id, "pass")]
    point = audits[0]["robust_accuracy"]["linf:0.1"]
    assert point["value"] == finished_audit["result"]["robust_accuracy"]["linf:0.1"]
    assert point["low"] <= point["value"] <= point["high"]
