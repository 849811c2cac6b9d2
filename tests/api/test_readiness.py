"""/readyz and warm workers: ready only once a live worker has loaded its models (a real RQ worker
registration on a real Redis, publishing its status as ``workers.warm.WarmWorker`` does)."""

from __future__ import annotations

from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from service.settings import Settings
from workers.warm import WarmWorker


def test_readyz_waits_for_a_warm_worker(client: TestClient, settings: Settings, redis: Redis) -> None:
    queue = Queue(settings.queue_name("predict"), connection=redis, serializer=JSONSerializer)
    worker = WarmWorker([queue], connection=redis, serializer=JSONSerializer, name="warm-test",
                        heartbeat_ttl=15, retries=0, result_ttl=60,
                        status={"device": "cpu", "threads": 1})
    worker.register_birth()  # alive, and publishing "loading"
    try:
        response = client.get("/readyz")
        assert response.status_code == 503, response.text
        assert "loading" in response.json()["detail"] and response.headers["retry-after"] == "5"
        worker.publish({**worker.status, "loading": "fmnist-cnn@1"})
        assert "fmnist-cnn@1" in client.get("/readyz").json()["detail"]

        worker.publish({**worker.status, "state": "warm", "loading": None,
                        "models": {"fmnist-cnn@1": {"batch_size": 128}}})
        body = client.get("/readyz").json()
        assert body["status"] == "ready" and body["warm"] == 1 and body["worker_names"] == ["warm-test"]
        assert body["worker_status"]["warm-test"]["models"] == {"fmnist-cnn@1": {"batch_size": 128}}
        assert body["worker_status"]["warm-test"]["threads"] == 1
    finally:
        worker.register_death()
    assert redis.get("adversa:warm:warm-test") is None
    assert client.get("/readyz").status_code == 503
