"""Hostile input never gets a 500: JSON nested 100000 deep, .npy headers that declare more than was
sent (or than any limit), shapes whose product overflows int64, job ids outside ASCII, methods a path
does not have; and the OpenAPI document lists each of these answers."""

from __future__ import annotations

import base64
import io
import struct
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from service.forms import MAX_JSON_DEPTH, json_depth
from tests.api.test_api import assert_problem

DEEP = "[" * 100_000 + "]" * 100_000
FGSM = {"name": "fgsm", "eps": 0.1}


def npy_with_header(shape: tuple[int, ...], descr: str = "<f4", payload: bytes = b"\0" * 64) -> bytes:
    """A .npy file whose header declares ``shape`` and ``descr``, followed by ``payload``."""
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + payload


def attack_array(client: TestClient, data: bytes) -> Any:
    return client.post("/v1/attacks", json={"model": "fmnist-cnn", "attack": FGSM,
                                            "inputs": {"array": base64.b64encode(data).decode()}})


def queued(redis: Redis) -> int:
    return Queue("attacks", connection=redis, serializer=JSONSerializer).count


@pytest.mark.parametrize(("text", "depth"), [
    (b"{}", 1), (b"[[1], [2, [3]]]", 3), (b'{"a": "[[[[\\"[[", "b": {"c": []}}', 3),
    (b'{"a": "x\\\\", "b": [[]]}', 3), (b"", 0), (DEEP.encode(), 100_000),
])
def test_json_depth_counts_brackets_outside_strings(text: bytes, depth: int) -> None:
    assert json_depth(text, limit=10**6) == depth


@pytest.mark.parametrize("path", ["/v1/attacks", "/v1/audits", "/v1/defenses", "/v1/attacks/generators"])
def test_json_nested_100000_deep_is_400(client: TestClient, path: str) -> None:
    response = client.post(path, content=DEEP, headers={"content-type": "application/json"})
    body = assert_problem(response, 400, "body")
    assert f"at most {MAX_JSON_DEPTH} levels" in body["detail"]


def test_deep_json_in_a_multipart_field_or_without_content_type_is_400(client: TestClient) -> None:
    response = client.post("/v1/attacks", data={"spec": DEEP}, files={"files": ("x.npy", b"\x93NUMPY")})
    assert_problem(response, 400, "spec")
    assert_problem(client.post("/v1/attacks", content=DEEP), 400, "body")
    oip = client.post("/v2/models/fmnist-cnn/infer", content=DEEP, headers={"content-type": "application/json"})
    assert oip.status_code == 400 and "levels" in oip.json()["error"]


@pytest.mark.parametrize(("data", "status", "words"), [
    (npy_with_header((10**12, 1, 28, 28)), 413, "at most"),
    (npy_with_header((2**62, 2**62, 28, 28)), 413, "at most"),
    (npy_with_header((4, 1, 28, 28)), 422, "bytes of data"),
    (npy_with_header((-1, -1, 28, 28)), 422, "shape"),
    (npy_with_header((1, 1, 28, 28), descr="|O"), 422, "dtype"),
    (npy_with_header((1, 28, 28), descr="<f8"), 422, "dtype"),
    (b"\x93NUMPY\x01\x00\xff\xff{", 422, ".npy"),
])
def test_npy_headers_are_checked_before_allocation(client: TestClient, redis: Redis, data: bytes,
                                                   status: int, words: str) -> None:
    body = assert_problem(attack_array(client, data), status, "inputs.array")
    assert words in body["detail"]
    assert queued(redis) == 0


def test_a_valid_npy_still_passes(client: TestClient) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 28, 28), np.uint8))
    assert attack_array(client, buffer.getvalue()).status_code == 202


@pytest.mark.parametrize("shape", [[2**40, 2**40, 2**40, 1], [2**70, 1, 28, 28]])
def test_an_infer_shape_whose_product_overflows_is_4xx(client: TestClient, shape: list[int]) -> None:
    response = client.post("/v2/models/fmnist-cnn/infer", json={"inputs": [
        {"name": "x", "shape": shape, "datatype": "FP32", "data": [0.0]}]})
    assert 400 <= response.status_code < 500, response.text


@pytest.mark.parametrize("path", ["/v1/jobs/%C3%80", "/v1/jobs/%C3%80/artifacts/grid.png", "/v1/jobs/a%20b",
                                  "/v1/jobs/" + "a" * 65])
def test_job_ids_outside_ascii_letters_and_digits_are_422(client: TestClient, path: str) -> None:
    assert_problem(client.get(path), 422, "path.job_id")
    if not path.endswith(".png"):
        assert_problem(client.delete(path), 422, "path.job_id")


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("PUT", "/v1/models", "GET, POST"),
    ("PATCH", "/v1/jobs/abc", "DELETE, GET"),
    ("GET", "/v1/attacks", "POST"),
    ("OPTIONS", "/v1/datasets/x@1", "DELETE, GET"),
])
def test_405_carries_allow_with_every_method_of_the_path(client: TestClient, method: str, path: str,
                                                         allow: str) -> None:
    response = client.request(method, path)
    assert_problem(response, 405)
    assert response.headers["allow"] == allow


def test_openapi_lists_every_error_answer_as_a_problem(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    assert "Problem" in document["components"]["schemas"]
    operations = {(m, p): op for p, ops in document["paths"].items() for m, op in ops.items()}
    for (method, path), operation in operations.items():
        for status, response in operation["responses"].items():
            if int(status) >= 400:
                media = "application/json" if path.startswith("/v2") else "application/problem+json"
                assert media in response["content"], (method, path, status)
    for method, path in [("get", "/v1/jobs/{job_id}"), ("delete", "/v1/jobs/{job_id}"), ("post", "/v1/attacks"),
                         ("post", "/v1/audits"), ("post", "/v1/defenses"), ("post", "/v1/models"),
                         ("post", "/v1/attacks/generators"), ("post", "/v2/models/{name}/infer")]:
        unavailable = operations[(method, path)]["responses"]["503"]
        assert "Retry-After" in unavailable["headers"], (method, path)
    assert {"400", "413", "415", "422", "404", "409"} <= set(operations[("post", "/v1/attacks")]["responses"])
