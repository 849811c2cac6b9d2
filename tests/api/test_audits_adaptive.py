"""``adaptive_steps`` and the adaptive detect-and-reject gate line at the gateway (no worker): the
setting reaches the chunk and merge jobs, out-of-range values and gate lines off the grid are 422
problems naming their field, and the metric is in the OpenAPI description."""

from __future__ import annotations

from fastapi.testclient import TestClient
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer

from tests.api.test_api import assert_problem
from tests.api.test_audits import audit


def test_adaptive_steps_reach_the_jobs_and_bad_values_are_refused(client: TestClient, redis: Redis) -> None:
    response = audit(client, adaptive_steps=7, eps={"linf": [0.1]},
                     thresholds=["adaptive_detect_reject_accuracy@linf:0.1.lower >= 0.2"])
    assert response.status_code == 202, response.text
    audit_id = response.json()["id"]
    for job_id in (f"{audit_id}c0", audit_id):
        payload = Job.fetch(job_id, connection=redis, serializer=JSONSerializer).args[0]
        assert payload["audit"]["adaptive_steps"] == 7
    default = audit(client, eps={"linf": [0.1]})
    payload = Job.fetch(default.json()["id"], connection=redis, serializer=JSONSerializer).args[0]
    assert payload["audit"]["adaptive_steps"] == 50

    for bad in (0, -1, "many", 2.5):
        assert_problem(audit(client, adaptive_steps=bad), 422, "adaptive_steps")
    body = assert_problem(audit(client, adaptive_steps=5000), 422, "adaptive_steps")
    assert "expected at most" in body["detail"] and "5000" in body["detail"]
    line = "adaptive_detect_reject_accuracy@linf:0.3 >= 0.2"
    off_grid = audit(client, eps={"linf": [0.1]}, thresholds=[line])
    body = assert_problem(off_grid, 422, "thresholds[0]")
    assert "expected an eps of the linf grid [linf:0.1], got linf:0.3" in body["detail"]
    no_eps = audit(client, thresholds=["adaptive_detect_reject_accuracy >= 0.2"])
    body = assert_problem(no_eps, 422, "thresholds[0]")
    assert "needs @<norm>:<eps>" in body["detail"]


def test_the_openapi_describes_the_adaptive_metric(client: TestClient) -> None:
    fields = client.get("/openapi.json").json()["components"]["schemas"]["AuditRequest"]["properties"]
    assert "adaptive" in fields["adaptive_steps"]["description"]
    assert "adaptive_detect_reject_accuracy@<norm>:<eps>" in fields["thresholds"]["description"]
