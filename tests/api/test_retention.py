"""A job purged by the retention sweep is gone from the API: ``GET /v1/jobs/{id}`` and its
artifacts answer 404 ``unknown-job`` and ``GET /v1/jobs`` no longer lists it (in-process gateway,
real Redis, the settings' own history database and file store)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi.testclient import TestClient

from history.store import HistoryStore, JobRecord
from models.store import FileStore
from service.deps import PUBLIC_TEAM
from service.settings import Settings
from workers.specs import JobState
from workers.sweep import purge_expired


def test_a_purged_job_and_its_artifacts_answer_404_and_leave_the_listing(
        client: TestClient, settings: Settings) -> None:
    history = HistoryStore(settings.history_database_url)
    store = FileStore(settings.blob_root)
    try:
        for job_id, days in (("old1", 40), ("new1", 1)):
            end = datetime.now(UTC) - timedelta(days=days)
            history.record_finished(JobRecord(id=job_id, kind="attack", team=PUBLIC_TEAM, model=None,
                                              spec={}, status=JobState.succeeded, created_at=end,
                                              ended_at=end), {"artifacts": ["grid.png"]})
            store.put(f"jobs/{job_id}/grid.png", b"png")
        assert client.get("/v1/jobs/old1").status_code == 200
        assert client.get("/v1/jobs/old1/artifacts/grid.png").content == b"png"

        assert purge_expired(store, client.app.state.redis, history, 30) == ["old1"]

        for path in ("/v1/jobs/old1", "/v1/jobs/old1/artifacts/grid.png"):
            response = client.get(path)
            assert response.status_code == 404, response.text
            assert response.headers["content-type"].startswith("application/problem+json")
            assert response.json()["code"] == "unknown-job"
        assert [job["id"] for job in client.get("/v1/jobs").json()["jobs"]] == ["new1"]
        assert client.get("/v1/jobs/new1/artifacts/grid.png").content == b"png"
    finally:
        history.close()
