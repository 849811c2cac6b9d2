"""``Idempotency-Key``: the same request (however its JSON is spaced or ordered) replays its job; a
different one (the same file bytes split differently across files) is refused with 409. One digest
for every job-creating route: ``service.routes.accept.request_digest``."""

from __future__ import annotations

import io
import json
from typing import Any

from fastapi.testclient import TestClient
from PIL import Image
from redis import Redis

from service.routes.accept import request_digest
from workers.specs import AttackRequest

from .test_api import DATASET, PGD, assert_problem, queued


def gray_png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (28, 28), color=value).save(buffer, format="PNG")
    return buffer.getvalue()


def post_json(client: TestClient, text: str, key: str) -> Any:
    return client.post("/v1/attacks", content=text.encode(),
                       headers={"Content-Type": "application/json", "Idempotency-Key": key})


def test_a_whitespace_change_replays_the_json_job(client: TestClient, redis: Redis) -> None:
    body = {"model": "fmnist-cnn", "attack": PGD, "inputs": DATASET, "seed": 3}
    first = post_json(client, json.dumps(body), "retry-1")
    assert first.status_code == 202, first.text
    # Re-serialized by a client library: other spacing, other key order, a default written out.
    spaced = json.dumps({"seed": 3, "inputs": DATASET, "model": "fmnist-cnn",
                         "attack": {**PGD, "norm": "linf"}}, indent=2)
    again = post_json(client, spaced, "retry-1")
    assert again.status_code == 202, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.headers.get("idempotent-replayed") == "true"
    assert queued(redis) == 1
    assert_problem(post_json(client, json.dumps({**body, "seed": 4}), "retry-1"), 409, "Idempotency-Key")
    assert queued(redis) == 1


def test_a_whitespace_change_replays_the_multipart_job(client: TestClient, redis: Redis) -> None:
    files = [("files", ("a.png", gray_png(10), "image/png")), ("files", ("b.png", gray_png(200), "image/png"))]
    headers = {"Idempotency-Key": "retry-2"}
    spec = '{"model": "fmnist-cnn", "attack": {"name": "fgsm", "eps": 0.1}, "seed": 1}'
    first = client.post("/v1/attacks", data={"spec": spec, "labels": "[1, 2]"}, files=files, headers=headers)
    assert first.status_code == 202, first.text
    respaced = '{ "seed":1,\n  "attack":{"eps":0.1,"name":"fgsm"},"model":"fmnist-cnn" }'
    again = client.post("/v1/attacks", data={"spec": respaced, "labels": "[1,2]"}, files=files, headers=headers)
    assert again.status_code == 202, again.text
    assert again.json()["id"] == first.json()["id"] and again.headers.get("idempotent-replayed") == "true"
    assert queued(redis) == 1
    other_labels = client.post("/v1/attacks", data={"spec": spec, "labels": "[2, 1]"}, files=files,
                               headers=headers)
    assert_problem(other_labels, 409, "Idempotency-Key")
    assert queued(redis) == 1


def test_the_same_bytes_split_differently_across_files_is_a_different_request(
        client: TestClient, redis: Redis) -> None:
    # A PNG decoder stops at the image's end, so both splits are valid uploads of two images, but
    # different ones: (10, 100) and (10, 200).
    p1, p2, p3 = gray_png(10), gray_png(100), gray_png(200)
    spec = '{"model": "fmnist-cnn", "attack": {"name": "fgsm", "eps": 0.1}, "seed": 1}'
    headers = {"Idempotency-Key": "retry-3"}

    def upload(a: bytes, b: bytes) -> Any:
        files = [("files", ("a.png", a, "image/png")), ("files", ("b.png", b, "image/png"))]
        return client.post("/v1/attacks", data={"spec": spec}, files=files, headers=headers)

    first = upload(p1, p2 + p3)
    assert first.status_code == 202, first.text
    split = upload(p1 + p2, p3)
    assert_problem(split, 409, "Idempotency-Key")
    assert queued(redis) == 1


def test_the_digest_describes_each_file() -> None:
    request = AttackRequest.model_validate({"model": "m", "attack": {"name": "fgsm", "eps": 0.1}})
    same = AttackRequest.model_validate_json('{"attack": {"eps": 0.10, "name": "fgsm"},  "model": "m"}')
    assert request_digest(request) == request_digest(same)
    files = [("a.png", b"abc"), ("b.png", b"de")]
    assert request_digest(request, files) == request_digest(same, list(files))
    assert request_digest(request, files) != request_digest(request, [("a.png", b"ab"), ("b.png", b"cde")])
    assert request_digest(request, files) != request_digest(request, [("b.png", b"de"), ("a.png", b"abc")])
    assert request_digest(request, files) != request_digest(request, [("x.png", b"abc"), ("b.png", b"de")])
    assert request_digest(request, files) != request_digest(request, files, {"labels": [1, 2]})
    assert request_digest(request) != request_digest(request, files)
