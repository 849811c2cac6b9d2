"""A prediction's input travels beside its job (raw float32 bytes at
``contracts.specs.PREDICT_INPUT_KEY``, not base64 in the payload): nothing of it stays behind when
no worker answers."""

from __future__ import annotations

from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from contracts.specs import PREDICT_INPUT_KEY
from service.settings import Settings
from tests.api.test_api import assert_oip_error


def test_a_prediction_given_up_leaves_neither_job_nor_input(client: TestClient, redis: Redis,
                                                            settings: Settings) -> None:
    tensor = {"name": "x", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": [0.25] * (2 * 784)}
    assert_oip_error(client.post("/v2/models/fmnist-cnn/infer", json={"inputs": [tensor]}), 504,
                     f"{settings.predict_timeout_s}s")
    queue = Queue("predict", connection=redis, serializer=JSONSerializer)
    (job_id,) = queue.canceled_job_registry.get_job_ids()
    job = queue.fetch_job(job_id)
    assert job is not None
    payload = job.args[0]
    assert payload["shape"] == [2, 1, 28, 28] and "array" not in payload  # the bytes went beside it
    assert redis.keys(PREDICT_INPUT_KEY.format("*")) == []
