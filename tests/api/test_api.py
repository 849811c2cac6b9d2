"""The gateway over HTTP (in-process) with a real Redis: status codes, problem bodies, auth,
idempotency. No worker runs here, so every accepted job stays queued and every refused request
must leave the queues untouched."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from service.app import create_app
from service.settings import Settings

PGD = {"name": "pgd", "eps": 0.1, "steps": 10}
DATASET = {"dataset": "fashion-mnist:test", "offset": 0, "limit": 8}


def queued(redis: Redis) -> int:
    return Queue("attacks", connection=redis, serializer=JSONSerializer).count


def npy_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return base64.b64encode(buffer.getvalue()).decode()


def png(size: tuple[int, int] = (28, 28), mode: str = "L", fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color=0 if mode in ("L", "1") else (0, 0, 0)).save(buffer, format=fmt)
    return buffer.getvalue()


def attack(client: TestClient, **overrides: Any) -> Any:
    body: dict[str, Any] = {"model": "fmnist-cnn", "attack": PGD, "inputs": DATASET, "seed": 0}
    body.update(overrides)
    return client.post("/v1/attacks", json=body)


def assert_problem(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["detail"] and body["title"]
    if field is not None:
        fields = [body.get("field")] + [e["field"] for e in body.get("errors", [])]
        assert field in fields, body
    return body  # type: ignore[no-any-return]


def assert_oip_error(response: Any, status: int, mentions: str) -> str:
    """The Open Inference Protocol's error: ``{"error": "..."}`` as JSON, naming ``mentions``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and mentions in body["error"], body
    return str(body["error"])


def test_health_and_readiness_without_worker(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    body = assert_problem(client.get("/readyz"), 503)
    assert "worker" in body["detail"]


def test_models_listing_and_card(client: TestClient) -> None:
    models = client.get("/v1/models").json()["models"]
    assert any(m["name"] == "fmnist-cnn" and m["hosted"] for m in models)
    card = client.get("/v1/models/fmnist-cnn").json()
    assert card["sha256"] and card["input_shape"] == [1, 28, 28] and card["versions"] == [1]
    assert card["lineage"]["data"] == "fashion-mnist:train"
    assert client.get("/v1/models/fmnist-cnn@1").status_code == 200
    assert_problem(client.get("/v1/models/nope"), 404, "model")
    assert_problem(client.get("/v1/models/fmnist-cnn@7"), 404, "model")


def test_attack_is_accepted_with_location(client: TestClient, redis: Redis) -> None:
    response = attack(client)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["kind"] == "attack" and job["model"] == "fmnist-cnn@1"
    assert queued(redis) == 1
    again = client.get(f"/v1/jobs/{job['id']}").json()
    assert again["status"] == "queued" and again["progress"] == 0.0
    assert_problem(client.get(f"/v1/jobs/{job['id']}/artifacts/grid.png"), 409)


ATTACKS_WITH_DEFAULTS = [
    {"name": "fgsm", "eps": 0.1},
    {"name": "pgd", "eps": 0.1},
    {"name": "deepfool"},
    {"name": "mi-fgsm", "eps": 0.1},
    {"name": "carlini-wagner-l2"},
    {"name": "jsma", "targeted": True, "target_mode": "random"},
    {"name": "apgd-ce", "eps": 0.1},
    {"name": "apgd-t", "eps": 0.1},
    {"name": "square", "eps": 0.1, "norm": "l2"},
    {"name": "hop-skip-jump", "targeted": True, "target_mode": "least-likely"},
]


@pytest.mark.parametrize("spec", ATTACKS_WITH_DEFAULTS, ids=[a["name"] for a in ATTACKS_WITH_DEFAULTS])
def test_every_attack_is_accepted_with_its_defaults(client: TestClient, redis: Redis,
                                                    spec: dict[str, Any]) -> None:
    response = attack(client, attack=spec)
    assert response.status_code == 202, response.text
    assert queued(redis) == 1


def test_inline_array_and_images_are_accepted(client: TestClient, redis: Redis) -> None:
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    assert attack(client, inputs={"array": npy_b64(x), "labels": [0, 1, 2]}).status_code == 202
    raw = np.zeros((2, 28, 28), dtype=np.uint8)
    assert attack(client, inputs={"array": npy_b64(raw)}).status_code == 202
    image = base64.b64encode(png()).decode()
    jpeg = base64.b64encode(png(fmt="JPEG")).decode()
    assert attack(client, inputs={"images": [image, jpeg], "labels": [3, 4]}).status_code == 202
    assert queued(redis) == 3


def test_multipart_upload(client: TestClient, redis: Redis) -> None:
    spec = '{"model": "fmnist-cnn", "attack": {"name": "fgsm", "eps": 0.1}}'
    files = [("files", ("a.png", png(), "image/png")), ("files", ("b.png", png(), "image/png"))]
    response = client.post("/v1/attacks", data={"spec": spec, "labels": "[1, 2]"}, files=files)
    assert response.status_code == 202, response.text
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((4, 1, 28, 28), dtype=np.float32))
    response = client.post("/v1/attacks", data={"spec": spec},
                           files=[("files", ("x.npy", buffer.getvalue(), "application/octet-stream"))])
    assert response.status_code == 202, response.text
    assert queued(redis) == 2
    bad = client.post("/v1/attacks", data={"spec": spec, "labels": "[1]"}, files=files)
    assert_problem(bad, 422, "labels")
    assert_problem(client.post("/v1/attacks", data={"spec": "{"}, files=files), 400, "spec")
    assert queued(redis) == 2


BAD_ATTACKS: list[tuple[str, dict[str, Any], int, str]] = [
    ("unknown model", {"model": "nope"}, 404, "model"),
    ("unknown attack", {"attack": {"name": "pgx", "eps": 0.1}}, 422, "attack"),
    ("unknown parameter", {"attack": {**PGD, "epsilon": 0.1}}, 422, "attack.epsilon"),
    ("negative eps", {"attack": {**PGD, "eps": -0.1}}, 422, "attack.eps"),
    ("eps above range", {"attack": {**PGD, "eps": 1.5}}, 422, "attack.eps"),
    ("l2 eps above range", {"attack": {**PGD, "norm": "l2", "eps": 29.0}}, 422, "attack.eps"),
    ("zero steps", {"attack": {**PGD, "steps": 0}}, 422, "attack.steps"),
    ("too many steps", {"attack": {**PGD, "steps": 5000}}, 422, "attack.steps"),
    ("bad norm", {"attack": {**PGD, "norm": "l3"}}, 422, "attack.norm"),
    ("targeted without targets", {"attack": {**PGD, "targeted": True}}, 422, "attack"),
    ("targets of wrong length", {"attack": {**PGD, "targeted": True, "targets": [1]}}, 422,
     "attack.targets"),
    ("target class out of range", {"attack": {**PGD, "targeted": True, "targets": [10] * 8}}, 422,
     "attack.targets"),
    ("target equal to label", {"attack": {**PGD, "targeted": True, "targets": [9] * 8}}, 422,
     "attack.targets"),
    ("deepfool targeted", {"attack": {"name": "deepfool", "targeted": True}}, 422,
     "attack.targeted"),
    ("deepfool candidates", {"attack": {"name": "deepfool", "candidates": 11}}, 422,
     "attack.candidates"),
    ("unknown data set", {"inputs": {"dataset": "mnist:test"}}, 422, "inputs.dataset"),
    ("slice past the end", {"inputs": {"dataset": "fashion-mnist:test", "offset": 9999,
                                       "limit": 5}}, 422, "inputs.limit"),
    ("offset past the end", {"inputs": {"dataset": "fashion-mnist:test", "offset": 10000}}, 422,
     "inputs.offset"),
    ("too many inputs", {"inputs": {"dataset": "fashion-mnist:train", "limit": 20000}}, 413,
     "inputs.limit"),
    ("no inputs", {"inputs": None}, 422, "inputs"),
    ("inputs of unknown kind", {"inputs": {"url": "x"}}, 422, "inputs"),
    ("negative seed", {"seed": -1}, 422, "seed"),
    ("mi-fgsm negative eps", {"attack": {"name": "mi-fgsm", "eps": -0.1}}, 422, "attack.eps"),
    ("apgd-ce is untargeted", {"attack": {"name": "apgd-ce", "eps": 0.1, "targeted": True}}, 422,
     "attack.targeted"),
    ("apgd-t target classes", {"attack": {"name": "apgd-t", "eps": 0.1, "steps": 10,
                                          "n_target_classes": 10}}, 422, "attack.n_target_classes"),
    ("apgd-t budget", {"attack": {"name": "apgd-t", "eps": 0.1, "steps": 200}}, 422, "attack.steps"),
    ("square query budget", {"attack": {"name": "square", "eps": 0.1, "max_queries": 10**6}}, 422,
     "attack.max_queries"),
    ("square eps", {"attack": {"name": "square", "eps": 0.0}}, 422, "attack.eps"),
    ("hop-skip-jump evals", {"attack": {"name": "hop-skip-jump", "initial_num_evals": 500,
                                        "max_num_evals": 100}}, 422, "attack.initial_num_evals"),
    ("carlini-wagner budget", {"attack": {"name": "carlini-wagner-l2", "binary_search_steps": 20,
                                          "max_iter": 500}}, 422, "attack.max_iter"),
    ("carlini-wagner confidence", {"attack": {"name": "carlini-wagner-l2", "confidence": -1}}, 422,
     "attack.confidence"),
    ("jsma zero theta", {"attack": {"name": "jsma", "theta": 0}}, 422, "attack"),
    ("jsma gamma", {"attack": {"name": "jsma", "gamma": 1.5}}, 422, "attack.gamma"),
    ("black-box transfer", {"attack": {"name": "square", "eps": 0.1},
                            "surrogate": "fmnist-resnet18"}, 422, "surrogate"),
]


@pytest.mark.parametrize("case", BAD_ATTACKS, ids=[c[0] for c in BAD_ATTACKS])
def test_bad_attack_requests(client: TestClient, redis: Redis,
                             case: tuple[str, dict[str, Any], int, str]) -> None:
    _, overrides, status, field = case
    assert_problem(attack(client, **overrides), status, field)
    assert queued(redis) == 0


def test_bad_arrays(client: TestClient, redis: Redis) -> None:
    cases = [
        (np.zeros((2, 1, 32, 32), dtype=np.float32), "(N, 1, 28, 28)"),
        (np.zeros((2, 28, 28, 1), dtype=np.float32), "NCHW"),
        (np.zeros((2, 1, 28, 28), dtype=np.float64), "float32 or uint8"),
        (np.full((2, 1, 28, 28), 2.0, dtype=np.float32), "[0, 1]"),
        (np.full((2, 1, 28, 28), np.nan, dtype=np.float32), "finite"),
        (np.zeros((2, 3, 28, 28), dtype=np.uint8), "uint8"),
    ]
    for array, expected in cases:
        body = assert_problem(attack(client, inputs={"array": npy_b64(array)}), 422, "inputs.array")
        assert expected in body["detail"], body["detail"]
    assert_problem(attack(client, inputs={"array": "not base64!"}), 422, "inputs.array")
    assert_problem(attack(client, inputs={"array": base64.b64encode(b"junk").decode()}), 422,
                   "inputs.array")
    labels = {"array": npy_b64(np.zeros((2, 1, 28, 28), np.float32)), "labels": [0, 12]}
    assert_problem(attack(client, inputs=labels), 422, "inputs.labels")
    assert queued(redis) == 0


def test_bad_images(client: TestClient, redis: Redis) -> None:
    cases = [
        (png(size=(32, 32)), "28x28"),
        (png(mode="RGB"), "grayscale"),
        (b"\x89PNG\r\n\x1a\nbroken", "decodable"),
    ]
    for data, expected in cases:
        images = {"images": [base64.b64encode(data).decode()]}
        body = assert_problem(attack(client, inputs=images), 422, "inputs.images[0]")
        assert expected in body["detail"], body["detail"]
    assert queued(redis) == 0


def test_oversized_body(settings: Settings, redis: Redis) -> None:
    small = settings.model_copy(update={"max_body_bytes": 2048})
    with TestClient(create_app(small), raise_server_exceptions=False) as client:
        x = np.zeros((4, 1, 28, 28), dtype=np.float32)
        assert_problem(attack(client, inputs={"array": npy_b64(x)}), 413)
        # Chunked upload without Content-Length is refused as well.
        chunks = iter([b"{" + b" " * 4096, b"}"])
        response = client.post("/v1/attacks", content=chunks,
                               headers={"content-type": "application/json"})
        assert_problem(response, 413)
    assert queued(redis) == 0


def test_malformed_bodies(client: TestClient, redis: Redis) -> None:
    assert_problem(client.post("/v1/attacks", content=b"{nope",
                               headers={"content-type": "application/json"}), 400)
    assert_problem(client.post("/v1/attacks", content=b"x",
                               headers={"content-type": "text/plain"}), 415)
    assert queued(redis) == 0


def test_infer_validation(client: TestClient, redis: Redis) -> None:
    tensor = {"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}
    response = client.post("/v2/models/fmnist-resnet18/infer",
                           json={"inputs": [tensor], "parameters": {"reject": True}})
    assert "calibrate" in assert_oip_error(response, 409, "parameters.reject")
    bad_shape = {**tensor, "shape": [1, 1, 27, 28]}
    assert_oip_error(client.post("/v2/models/fmnist-cnn/infer", json={"inputs": [bad_shape]}), 422,
                     "inputs[0].data")
    wrong = {**tensor, "shape": [1, 1, 14, 56], "data": [0.0] * 784}
    assert_oip_error(client.post("/v2/models/fmnist-cnn/infer", json={"inputs": [wrong]}), 422,
                     "inputs[0]")
    out_of_range = {**tensor, "data": [3.0] * 784}
    assert_oip_error(client.post("/v2/models/fmnist-cnn/infer", json={"inputs": [out_of_range]}),
                     422, "inputs[0]")
    uint8 = {**tensor, "datatype": "UINT8", "shape": [1, 28, 28, 1], "data": [300] * 784}
    assert_oip_error(client.post("/v2/models/fmnist-cnn/infer", json={"inputs": [uint8]}), 422,
                     "inputs[0].data")
    assert_oip_error(client.post("/v2/models/nope/infer", json={"inputs": [tensor]}), 404, "model")
    assert_oip_error(client.post("/v2/models/fmnist-cnn/infer", json={"inputs": []}), 422, "inputs")
    assert_oip_error(client.post("/v2/models/fmnist-cnn/infer", json={"inputs": [tensor], "extra": 1}),
                     422, "extra")
    assert_oip_error(client.post("/v2/models/fmnist-cnn/infer", json={
        "inputs": [tensor], "model_name": "fmnist-resnet18"}), 422, "model_name")
    # the binary tensor extension: the byte counts must add up
    def binary(size: int, sent: int) -> Any:
        header = ('{"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", '
                  f'"parameters": {{"binary_data_size": {size}}}}}]}}').encode()
        return client.post("/v2/models/fmnist-cnn/infer", content=header + bytes(sent),
                           headers={"Inference-Header-Content-Length": str(len(header))})

    assert_oip_error(binary(3136, 100), 400, "expected 3136 bytes of binary tensors")
    assert_oip_error(binary(3132, 3132), 422, "expected 3136 bytes for FP32 of shape")
    header = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0]}]}'
    assert_oip_error(client.post("/v2/models/fmnist-cnn/infer", content=header, headers={
        "Inference-Header-Content-Length": "99999"}), 400, "Inference-Header-Content-Length")
    assert Queue("predict", connection=redis, serializer=JSONSerializer).count == 0


def test_infer_without_worker_answers_504_and_leaves_nothing_queued(client: TestClient, redis: Redis,
                                                                   settings: Settings) -> None:
    tensor = {"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP64", "data": [0.5] * 784}
    response = client.post("/v2/models/fmnist-cnn/infer", json={"inputs": [tensor]})
    assert_oip_error(response, 504, f"{settings.predict_timeout_s}s")
    queue = Queue("predict", connection=redis, serializer=JSONSerializer)
    assert queue.count == 0 and len(queue.canceled_job_registry) == 1
    assert_oip_error(client.get("/v2/health/ready"), 503, "worker")
    assert_oip_error(client.get("/v2/models/fmnist-cnn/ready"), 503, "worker")
    assert client.get("/v2/health/live").json() == {"live": True}


def test_idempotency_key(client: TestClient, redis: Redis) -> None:
    headers = {"Idempotency-Key": "ci-run-42"}
    body = {"model": "fmnist-cnn", "attack": PGD, "inputs": DATASET, "seed": 1}
    first = client.post("/v1/attacks", json=body, headers=headers)
    second = client.post("/v1/attacks", json=body, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert second.headers.get("idempotent-replayed") == "true"
    assert queued(redis) == 1
    other = client.post("/v1/attacks", json={**body, "seed": 2}, headers=headers)
    assert_problem(other, 409, "Idempotency-Key")
    assert queued(redis) == 1


def test_cancel_queued_job(client: TestClient, redis: Redis) -> None:
    job_id = attack(client).json()["id"]
    response = client.delete(f"/v1/jobs/{job_id}")
    assert response.status_code == 202
    assert response.json()["status"] == "canceled"
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "canceled"
    assert queued(redis) == 0
    assert client.delete(f"/v1/jobs/{job_id}").json()["status"] == "canceled"


def test_unknown_jobs(client: TestClient) -> None:
    assert_problem(client.get("/v1/jobs/0123abcd"), 404, "id")
    assert_problem(client.get("/v1/jobs/..%2F..%2Fetc"), 404)
    assert_problem(client.delete("/v1/jobs/0123abcd"), 404, "id")


def test_auth_and_team_isolation(settings: Settings, redis: Redis) -> None:
    keyed = settings.model_copy(update={"api_keys": {"key-a": "team-a", "key-b": "team-b"}})
    with TestClient(create_app(keyed), raise_server_exceptions=False) as client:
        assert_problem(client.get("/v1/models"), 401)
        assert_problem(client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        a = {"Authorization": "Bearer key-a"}
        b = {"Authorization": "Bearer key-b"}
        assert client.get("/v1/models", headers=a).status_code == 200
        body = {"model": "fmnist-cnn", "attack": PGD, "inputs": DATASET}
        job_id = client.post("/v1/attacks", json=body, headers=a).json()["id"]
        assert client.get(f"/v1/jobs/{job_id}", headers=a).status_code == 200
        assert_problem(client.get(f"/v1/jobs/{job_id}", headers=b), 404)
        assert_problem(client.delete(f"/v1/jobs/{job_id}", headers=b), 404)
        assert client.get("/healthz").status_code == 200


def test_openapi_documents_the_attack_schemas(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/attacks"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    components = schema["components"]["schemas"]
    for name in ("AttackRequest", "PGDParams", "FGSMParams", "DeepFoolParams", "DatasetInputs"):
        assert name in components
    assert client.get("/docs").status_code == 200


def test_metrics(client: TestClient) -> None:
    client.get("/healthz")
    text = client.get("/metrics").text
    assert "adversa_requests_total" in text and "adversa_queue_depth" in text


def test_job_of_a_lost_worker_is_reported_failed(client: TestClient, redis: Redis) -> None:
    from rq.job import Job, JobStatus

    from contracts.errors import ALIVE_KEY

    job_id = attack(client).json()["id"]
    job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    job.worker_name = "gone-worker"
    job.set_status(JobStatus.STARTED)
    job.save()
    redis.set(ALIVE_KEY.format("gone-worker"), 1, ex=30)
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
    redis.delete(ALIVE_KEY.format("gone-worker"))
    body = client.get(f"/v1/jobs/{job_id}").json()
    assert body["status"] == "failed"
    assert body["error"]["code"] == "worker-lost" and "gone-worker" in body["error"]["message"]


def test_surrogate_checks(client: TestClient, redis: Redis, settings: Settings) -> None:
    from models.architectures import build
    from models.manifest import CardIndex
    from models.registry import sha256_hex, weights_bytes, write_model

    ok = attack(client, surrogate="fmnist-resnet18")
    assert ok.status_code == 202, ok.text
    assert queued(redis) == 1
    assert_problem(attack(client, surrogate="nope"), 404, "surrogate")
    base = CardIndex.default().card("fmnist-cnn")
    assert base is not None
    weights = weights_bytes(build("linear", (1, 8, 8), 10))
    small = base.model_copy(update={"name": "tiny-8x8", "architecture": "linear",
                                    "input_shape": (1, 8, 8), "sha256": sha256_hex(weights)})
    write_model(settings.models_root, small, weights)
    body = assert_problem(attack(client, surrogate="tiny-8x8"), 422, "surrogate")
    assert "input_shape" in body["detail"]
    assert queued(redis) == 1
