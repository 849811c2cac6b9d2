"""An audit's ``baseline`` as the gateway resolves it from the history database (SQLite and
PostgreSQL), on a real Redis without a worker: by audit id or model version, refused with a 422
saying what differs, never another team's. Recorded baselines are merged results (the real merge)
of audits the gateway itself queued."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from redis import Redis

from contracts.gate import evaluate_gate, parse_gate
from history.recording import audit_summary
from history.store import HistoryStore, JobRecord
from service.app import create_app
from service.settings import Settings
from workers.audit.merge import Chunk, merge
from workers.specs import JobState

A, B = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
GRID = [0.05, 0.1]
AUDIT = {"model": "fmnist-cnn", "suite": "quick", "eps": {"linf": GRID}, "steps": 5, "seed": 0,
         "inputs": {"dataset": "fashion-mnist:test", "offset": 0, "limit": 16}}
LINES = ["robust_accuracy@linf:0.1 >= baseline - 0.01", "clean_accuracy >= baseline"]


@pytest.fixture
def client(settings: Settings, history_url: str, redis: Redis) -> Iterator[TestClient]:
    keyed = settings.model_copy(update={"api_keys": {"key-a": "team-a", "key-b": "team-b"},
                                        "history_url": history_url})
    with TestClient(create_app(keyed), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def history(history_url: str) -> Iterator[HistoryStore]:
    store = HistoryStore(history_url)
    yield store
    store.close()


def problem(response: Any, status: int, field: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body.get("field") == field, body
    return body


def post(client: TestClient, headers: dict[str, str] = A, **overrides: Any) -> Any:
    return client.post("/v1/audits", json={**AUDIT, **overrides}, headers=headers)


def queued(client: TestClient, headers: dict[str, str] = A, **overrides: Any) -> tuple[str, dict[str, Any]]:
    """Submit an audit; its id and the audit spec its merge job carries."""
    response = post(client, headers, **overrides)
    assert response.status_code == 202, response.text
    audit_id = response.json()["id"]
    job = client.app.state.queues.fetch(audit_id)  # type: ignore[attr-defined]
    return audit_id, job.args[0]["audit"]


def merged(spec: dict[str, Any], correct: int, robust: tuple[int, int], n: int = 16) -> dict[str, Any]:
    """The result the merge would write for ``spec``: ``correct`` of ``n`` right, ``robust[e]``
    still right at the grid's eps ``e``."""
    labels = np.arange(n) % 10
    predictions = labels.copy()
    predictions[correct:] = (labels[correct:] + 1) % 10
    held = np.zeros((2, len(GRID), n), dtype=bool)
    for e, k in enumerate(robust):
        held[:, e, :k] = True
    result = merge([Chunk(labels=labels, clean_pred=predictions, robust={"linf": held})], spec["grids"],
                   {"linf": ["fgsm", "pgd"]}, {}, [str(c) for c in range(10)])
    return {**result, "model": "fmnist-cnn@1", "suite": spec["suite"],
            "settings": {k: v for k, v in spec.items() if k != "attacks"}}


def finish(history: HistoryStore, audit_id: str, team: str, result: dict[str, Any] | None,
           age_s: float = 0) -> None:
    """Record the audit as its merge job would when it ends (``None``: it failed)."""
    created = datetime.now(UTC) - timedelta(seconds=age_s)
    record = JobRecord(id=audit_id, kind="audit", team=team, model="fmnist-cnn@1", spec={},
                       status=JobState.succeeded if result else JobState.failed, created_at=created,
                       ended_at=created)
    history.record_finished(record, result, audit_summary(result) if result else None)


def test_a_baseline_by_id_or_version_travels_to_the_merge(client: TestClient, history: HistoryStore) -> None:
    old_id, spec = queued(client)
    assert spec["data"].endswith("[0:16]") and spec["baseline"] is None
    finish(history, old_id, "team-a", merged(spec, 14, (12, 10)), age_s=60)
    # a newer audit of the same version on another grid is skipped by a version baseline
    other_id, other = queued(client, eps={"linf": [0.1, 0.3]})
    finish(history, other_id, "team-a", merged(other, 14, (10, 2)))

    for ref in (old_id, "fmnist-cnn@1"):
        _, spec = queued(client, baseline=ref, thresholds=LINES)
        baseline = spec["baseline"]
        assert (baseline["audit"], baseline["model"]) == (old_id, "fmnist-cnn@1")
        robust = baseline["metrics"]["robust_accuracy@linf:0.1"]
        assert robust["value"] == 0.625 and (robust["interval"]["k"], robust["interval"]["n"]) == (10, 16)
        assert baseline["metrics"]["clean_accuracy"]["value"] == 0.875

    # what the merge then concludes: the same figures pass, a weaker model fails on both lines
    lines = parse_gate(spec["thresholds"])
    assert evaluate_gate(lines, merged(spec, 14, (12, 10)), baseline)["verdict"] == "pass"
    weaker = evaluate_gate(lines, merged(spec, 13, (9, 0)), baseline)
    assert weaker["verdict"] == "fail" and [line["passed"] for line in weaker["lines"]] == [False, False]
    assert (weaker["lines"][0]["value"], weaker["lines"][0]["baseline_value"]) == (0.0, 0.625)
    assert weaker["lines"][0]["significant"] is True


def test_another_teams_baseline_is_invisible(client: TestClient, history: HistoryStore) -> None:
    theirs, spec = queued(client)
    finish(history, theirs, "team-a", merged(spec, 14, (13, 11)))
    body = problem(post(client, B, baseline=theirs, thresholds=LINES), 404, "baseline")
    assert body["code"] == "unknown-baseline" and "0.6875" not in str(body) and "0.875" not in str(body)
    # team B's own history of the hosted model is empty: team A's audits do not count
    body = problem(post(client, B, baseline="fmnist-cnn@1", thresholds=LINES), 422, "baseline")
    assert "has none" in body["detail"] and theirs not in body["detail"]
    # and team A's still resolves
    assert post(client, A, baseline=theirs, thresholds=LINES).status_code == 202


def test_a_baseline_that_differs_is_422_saying_what_differs(client: TestClient, history: HistoryStore) -> None:
    old_id, spec = queued(client)
    finish(history, old_id, "team-a", merged(spec, 14, (12, 10)))
    moved = {**AUDIT["inputs"], "offset": 16}  # type: ignore[dict-item]
    body = problem(post(client, baseline=old_id, inputs=moved, thresholds=LINES), 422, "baseline")
    assert "data: " in body["detail"] and "[16:32] here" in body["detail"]
    assert "[0:16] in the baseline" in body["detail"]
    body = problem(post(client, baseline=old_id, eps={"linf": [0.1]}), 422, "baseline")
    assert "eps grid linf: [0.1] here, [0.05, 0.1] in the baseline" in body["detail"]
    body = problem(post(client, baseline="fmnist-cnn@1", suite="standard", steps=5, n_target_classes=1),
                   422, "baseline")
    assert "suite: standard here, quick in the baseline" in body["detail"] and old_id in body["detail"]


def test_bad_baselines_are_clear_4xx(client: TestClient, history: HistoryStore) -> None:
    problem(post(client, thresholds=["clean_accuracy >= 0.5", "clean_accuracy >= baseline"]), 422,
            "thresholds[1]")
    problem(post(client, baseline="0" * 32, thresholds=LINES), 404, "baseline")
    problem(post(client, baseline="no-such-model@1", thresholds=LINES), 404, "baseline")
    problem(post(client, baseline="fmnist-cnn@one"), 422, "baseline")
    problem(post(client, baseline="not an id!"), 422, "baseline")
    problem(post(client, thresholds=["clean_accuracy >= baseline - 5"]), 422, "thresholds[0]")
    failed_id, _ = queued(client)
    finish(history, failed_id, "team-a", None)
    assert "failed" in problem(post(client, baseline=failed_id), 422, "baseline")["detail"]
    attack = client.post("/v1/attacks", headers=A, json={
        "model": "fmnist-cnn", "attack": {"name": "fgsm", "eps": 0.1}, "inputs": AUDIT["inputs"]})
    assert attack.status_code == 202, attack.text
    assert "attack job" in problem(post(client, baseline=attack.json()["id"]), 422, "baseline")["detail"]
    # a baseline without the compared figure: which line, which metric
    old_id, spec = queued(client)
    finish(history, old_id, "team-a", merged(spec, 14, (12, 10)))
    body = problem(post(client, baseline=old_id, thresholds=["clean_accuracy >= baseline",
                                                              "detect_reject_accuracy@linf:0.1 >= baseline"]),
                   422, "thresholds[1]")
    assert "detect_reject_accuracy@linf:0.1" in body["detail"] and old_id in body["detail"]
