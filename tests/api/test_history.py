"""GET /v1/jobs, GET /v1/models/{name}/audits and GET /v1/jobs/{id} after Redis forgot the job,
through the in-process gateway on a real Redis, over SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from history.recording import audit_summary
from history.store import HistoryStore, JobRecord
from service.app import create_app
from service.settings import Settings
from workers.specs import JobState

A, B = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
ATTACK = {"model": "fmnist-cnn", "attack": {"name": "fgsm", "eps": 0.1},
          "inputs": {"dataset": "fashion-mnist:test", "offset": 0, "limit": 4}, "seed": 0}


@pytest.fixture
def keyed(settings: Settings, history_url: str) -> Settings:
    return settings.model_copy(update={"api_keys": {"key-a": "team-a", "key-b": "team-b"},
                                       "history_url": history_url})


@pytest.fixture
def client(keyed: Settings, redis: Redis) -> Iterator[TestClient]:
    with TestClient(create_app(keyed), raise_server_exceptions=False) as test_client:
        yield test_client


def problem(response: Any, status: int, field: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert field in (body.get("field") or ""), body
    return body


def submit(client: TestClient, headers: dict[str, str], **overrides: Any) -> str:
    response = client.post("/v1/attacks", json={**ATTACK, **overrides}, headers=headers)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def test_a_teams_jobs_newest_first_paged_and_invisible_to_other_teams(client: TestClient) -> None:
    ids = [submit(client, A) for _ in range(3)]
    other = submit(client, B)
    first = client.get("/v1/jobs", params={"limit": 2}, headers=A)
    assert first.status_code == 200, first.text
    page = first.json()
    assert [j["id"] for j in page["jobs"]] == ids[:0:-1]
    assert all(j["status"] == "queued" and j["kind"] == "attack" for j in page["jobs"])
    rest = client.get("/v1/jobs", params={"limit": 2, "cursor": page["next_cursor"]}, headers=A).json()
    assert [j["id"] for j in rest["jobs"]] == ids[:1] and rest["next_cursor"] is None
    assert [j["id"] for j in client.get("/v1/jobs", headers=B).json()["jobs"]] == [other]
    filtered = client.get("/v1/jobs", params={"model": "fmnist-cnn", "kind": "attack", "status": "queued",
                                              "created_after": "2000-01-01T00:00:00"}, headers=A).json()
    assert len(filtered["jobs"]) == 3
    assert client.get("/v1/jobs", params={"kind": "audit"}, headers=A).json()["jobs"] == []
    problem(client.get(f"/v1/jobs/{other}", headers=A), 404, "id")


@pytest.mark.parametrize(("params", "field"), [
    ({"status": "done"}, "status"), ({"kind": "bake"}, "kind"), ({"limit": 0}, "limit"),
    ({"created_before": "yesterday"}, "created_before"), ({"model_version": 0}, "model_version"),
    ({"cursor": "bm90LWEtY3Vyc29y"}, "cursor"),
])
def test_bad_filters_are_422_naming_the_parameter(client: TestClient, params: dict[str, Any],
                                                  field: str) -> None:
    problem(client.get("/v1/jobs", params=params, headers=A), 422, field)


def test_a_job_stays_readable_after_redis_forgets_it(client: TestClient, redis: Redis,
                                                     history_url: str) -> None:
    job_id = submit(client, A)
    redis.flushdb()
    job = client.get(f"/v1/jobs/{job_id}", headers=A)
    assert job.status_code == 200, job.text
    # Recorded as queued, but the queue lost it: it can never run, and says so.
    assert (job.json()["id"], job.json()["model"], job.json()["status"], job.json()["error"]["code"]) == (
        job_id, "fmnist-cnn@1", "failed", "lost")
    listed = client.get("/v1/jobs", headers=A).json()["jobs"]
    assert [(j["id"], j["status"]) for j in listed] == [(job_id, "failed")]
    problem(client.get(f"/v1/jobs/{job_id}", headers=B), 404, "id")
    assert problem(client.get(f"/v1/jobs/{job_id}/artifacts/grid.png", headers=A), 409, "")["code"] == \
        "job-not-finished"


def test_a_models_audit_history_is_the_callers_teams(client: TestClient, history_url: str) -> None:
    problem(client.get("/v1/models/no-such-model/audits", headers=A), 404, "name")
    problem(client.get("/v1/models/fmnist-cnn@1/audits", headers=A), 422, "name")
    assert client.get("/v1/models/fmnist-cnn/audits", headers=A).json() == {"model": "fmnist-cnn", "audits": []}
    history = HistoryStore(history_url)
    result = {"n": 20, "suite": "quick", "clean_accuracy": 0.9, "robust_accuracy": {"linf:0.1": 0.45},
              "gate": None}
    audit = JobRecord(id="audit1", kind="audit", team="team-a", model="fmnist-cnn@1", spec={},
                      status=JobState.succeeded, created_at=datetime.now(UTC))
    history.record_finished(replace(audit, ended_at=audit.created_at), result, audit_summary(result))
    history.close()
    audits = client.get("/v1/models/fmnist-cnn/audits", headers=A).json()["audits"]
    assert [(a["id"], a["version"], a["verdict"]) for a in audits] == [("audit1", 1, None)]
    assert audits[0]["robust_accuracy"]["linf:0.1"]["value"] == 0.45
    assert client.get("/v1/models/fmnist-cnn/audits", headers=B).json()["audits"] == []


def test_a_job_canceled_before_it_ran_is_recorded_canceled(client: TestClient, redis: Redis) -> None:
    job_id = submit(client, A)
    canceled = client.delete(f"/v1/jobs/{job_id}", headers=A)
    assert canceled.status_code == 202, canceled.text
    redis.flushdb()
    job = client.get(f"/v1/jobs/{job_id}", headers=A).json()
    assert (job["status"], job["error"]["code"]) == ("canceled", "canceled")
    listed = client.get("/v1/jobs", params={"status": "canceled"}, headers=A).json()["jobs"]
    assert [j["id"] for j in listed] == [job_id]


def test_a_history_outage_refuses_no_job_and_the_listing_says_503(settings: Settings, redis: Redis) -> None:
    down = settings.model_copy(update={"history_url": "postgresql://nobody@127.0.0.1:1/none"})
    with TestClient(create_app(down), raise_server_exceptions=False) as client:
        job_id = submit(client, {})
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"  # Redis still has it
        body = problem(client.get("/v1/jobs"), 503, "")
        assert body["code"] == "history-unavailable"
        assert client.get("/v1/jobs").headers["Retry-After"] == "5"
