"""The Open Inference Protocol v2 as teams call it: Triton's ``tritonclient.http`` and KServe's
``InferenceRESTClient`` against a real gateway (uvicorn on a free port) and a real worker."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput
from redis import Redis
from tritonclient.utils import InferenceServerException

from contracts.specs import PREDICT_INPUT_KEY
from models.datasets import load_split
from models.manifest import HOSTED_DIR, CardIndex, ModelCard
from tests.integration.conftest import Running, start_service
from workers.cache import ModelCache

MODEL = "fmnist-cnn"
UPLOADED = "team-cnn"


@pytest.fixture(scope="module")
def running(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    Redis.from_url(redis_url).flushdb()
    var = tmp_path_factory.mktemp("var")
    # A team's registered model, as a registration job leaves it: the hosted CNN under a team name.
    target = var / "models" / UPLOADED / "1"
    shutil.copytree(HOSTED_DIR / MODEL / "1", target, ignore=shutil.ignore_patterns("detector.json"))
    card = ModelCard.read(target / "card.json")
    card.model_copy(update={"name": UPLOADED, "team": "public"}).write(target / "card.json")
    service = start_service(redis_url, var, queue_prefix="oip-", worker_name="oip-worker")
    try:
        yield service
    finally:
        service.stop()
        Redis.from_url(redis_url).flushdb()


@pytest.fixture(scope="module")
def url(running: Running) -> str:
    return str(running.client.base_url).rstrip("/")


@pytest.fixture(scope="module")
def triton_client(url: str) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=120,
                                          connection_timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_split("fashion-mnist:test").slice(0, 16)
    return x.astype(np.float32), y


def kserve(coroutine: Any) -> Any:
    """Run one call of KServe's asynchronous client (a fresh client per event loop)."""

    async def call() -> Any:
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120))
        try:
            return await coroutine(client)
        finally:
            await client.close()

    return asyncio.run(call())


def test_health_and_metadata_with_tritonclient(triton_client: triton.InferenceServerClient) -> None:
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready(MODEL) and triton_client.is_model_ready(MODEL, "1")
    assert triton_client.is_model_ready(UPLOADED, "1")
    assert not triton_client.is_model_ready("nope") and not triton_client.is_model_ready(MODEL, "9")
    server = triton_client.get_server_metadata()
    assert server["name"] == "adversa" and "binary_tensor_data" in server["extensions"]
    for name, version in ((MODEL, ""), (MODEL, "1"), (UPLOADED, ""), (UPLOADED, "1")):
        meta = triton_client.get_model_metadata(name, version)
        assert meta["name"] == name and meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
        outputs = {o["name"]: o for o in meta["outputs"]}
        assert outputs["label"]["datatype"] == "INT64" and outputs["logits"]["shape"] == [-1, 10]
        assert ("rejected" in outputs) == (name == MODEL)  # the hosted CNN has a detector
    with pytest.raises(InferenceServerException) as missing:
        triton_client.get_model_metadata("nope")
    assert missing.value.status() == "404" and "nope" in missing.value.message()


def test_health_with_kserve(url: str) -> None:
    assert kserve(lambda c: c.is_server_live(url)) is True
    assert kserve(lambda c: c.is_server_ready(url)) is True
    assert kserve(lambda c: c.is_model_ready(url, MODEL)) is True
    assert kserve(lambda c: c.is_model_ready(url, "nope")) is False


def test_infer_json_binary_and_requested_outputs_with_tritonclient(
        triton_client: triton.InferenceServerClient, images: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = images
    # JSON in, every output as JSON
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=False)
    outputs = [triton.InferRequestedOutput(n, binary_data=False) for n in ("label", "probabilities", "logits")]
    plain = triton_client.infer(MODEL, [tensor], outputs=outputs, request_id="req-1",
                                parameters={"note": "ci"})
    response = plain.get_response()
    assert response["id"] == "req-1" and response["parameters"]["note"] == "ci"
    assert response["model_name"] == MODEL and response["model_version"] == "1"
    labels = plain.as_numpy("label")
    assert labels.dtype == np.int64 and labels.shape == (16,) and (labels == y).mean() >= 0.75
    probabilities = plain.as_numpy("probabilities")
    assert probabilities.shape == (16, 10) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)

    # binary in, every output binary (tritonclient's default when no output is named)
    tensor.set_data_from_numpy(x, binary_data=True)
    binary = triton_client.infer(MODEL, [tensor], model_version="1")
    assert all("binary_data_size" in o["parameters"] for o in binary.get_response()["outputs"])
    assert (binary.as_numpy("label") == labels).all()
    assert np.allclose(binary.as_numpy("logits"), plain.as_numpy("logits"), atol=1e-5)

    # requested outputs only, in the order asked, one binary and one JSON
    asked = [triton.InferRequestedOutput("logits", binary_data=True),
             triton.InferRequestedOutput("label", binary_data=False)]
    some = triton_client.infer(MODEL, [tensor], outputs=asked)
    assert [o["name"] for o in some.get_response()["outputs"]] == ["logits", "label"]
    assert some.get_output("probabilities") is None and (some.as_numpy("label") == labels).all()

    # FP64 (converted) and UINT8 NHWC pixels give the same answer; an uploaded model answers too
    fp64 = triton.InferInput("input", list(x.shape), "FP64")
    fp64.set_data_from_numpy(x.astype(np.float64), binary_data=True)
    assert (triton_client.infer(MODEL, [fp64]).as_numpy("label") == labels).all()
    pixels = (x[:, 0] * 255).round().astype(np.uint8)[..., None]
    uint8 = triton.InferInput("input", list(pixels.shape), "UINT8")
    uint8.set_data_from_numpy(pixels, binary_data=False)
    assert (triton_client.infer(MODEL, [uint8]).as_numpy("label") == labels).mean() >= 0.9
    assert (triton_client.infer(UPLOADED, [tensor], model_version="1").as_numpy("label") == labels).all()

    # detection-and-reject stays a parameters extension
    rejected = triton_client.infer(MODEL, [tensor], parameters={"reject": True})
    flags, scores = rejected.as_numpy("rejected"), rejected.as_numpy("detector_score")
    threshold = rejected.get_response()["parameters"]["threshold"]
    assert flags.dtype == bool and (flags == (scores > threshold)).all()


def test_answered_predictions_leave_no_input_behind(
        triton_client: triton.InferenceServerClient, images: tuple[np.ndarray, np.ndarray],
        redis_url: str) -> None:
    """Each prediction's input travels beside its job (raw bytes, contracts.specs.PREDICT_INPUT_KEY);
    once answered it is gone, and the answer is the model's on exactly those bytes."""
    x, _ = images
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    logits = triton_client.infer(MODEL, [tensor], outputs=[triton.InferRequestedOutput("logits")]
                                 ).as_numpy("logits")
    direct = ModelCache(CardIndex([HOSTED_DIR]), torch.device("cpu")).get(MODEL)[1].predict(torch.from_numpy(x))
    assert np.allclose(logits, direct.numpy(), atol=1e-5)  # another process: its own thread count
    assert Redis.from_url(redis_url).keys(PREDICT_INPUT_KEY.format("*")) == []


def test_infer_json_and_binary_with_kserve(url: str, images: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = images
    answers = []
    for binary in (False, True):
        tensor = InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        request = InferRequest(MODEL, [tensor], request_id=f"kserve-{binary}",
                               request_outputs=[RequestedOutput("label", {"binary_data": binary}),
                                                RequestedOutput("logits", {"binary_data": binary})])
        answer = kserve(lambda c, r=request: c.infer(url, r, model_name=MODEL))
        assert answer.id == f"kserve-{binary}" and [o.name for o in answer.outputs] == ["label", "logits"]
        answers.append(answer)
    labels = [a.outputs[0].as_numpy() for a in answers]
    assert (labels[0] == labels[1]).all() and (labels[0] == y).mean() >= 0.75
    assert np.allclose(answers[0].outputs[1].as_numpy(), answers[1].outputs[1].as_numpy(), atol=1e-5)


def test_errors_with_both_clients(url: str, triton_client: triton.InferenceServerClient,
                                  images: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = images
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)

    def triton_error(model: str, inputs: list[Any], **kwargs: Any) -> InferenceServerException:
        with pytest.raises(InferenceServerException) as raised:
            triton_client.infer(model, inputs, **kwargs)
        return raised.value

    unknown = triton_error("nope", [tensor])
    assert unknown.status() == "404" and "'nope'" in unknown.message()
    version = triton_error(MODEL, [tensor], model_version="7")
    assert version.status() == "404" and "version: expected one of 1" in version.message()
    wrong = triton.InferInput("input", [16, 28, 28, 1], "FP32")
    wrong.set_data_from_numpy(x.reshape(16, 28, 28, 1), binary_data=True)
    shape = triton_error(MODEL, [wrong])
    assert shape.status() == "422" and "(N, 1, 28, 28)" in shape.message()
    integers = triton.InferInput("input", list(x.shape), "INT32")
    integers.set_data_from_numpy(x.astype(np.int32), binary_data=True)
    assert "inputs[0].datatype" in triton_error(MODEL, [integers]).message()
    bad_output = triton_error(MODEL, [tensor], outputs=[triton.InferRequestedOutput("scores")])
    assert bad_output.status() == "422" and "outputs[0].name" in bad_output.message()
    no_detector = triton_error(UPLOADED, [tensor], parameters={"reject": True})
    assert no_detector.status() == "409" and "calibrate" in no_detector.message()

    kserve_input = InferInput("input", list(x.shape), "FP32")
    kserve_input.set_data_from_numpy(x, binary_data=False)
    with pytest.raises(httpx.HTTPStatusError) as raised:
        kserve(lambda c: c.infer(url, InferRequest("nope", [kserve_input]), model_name="nope"))
    assert raised.value.response.status_code == 404 and "'nope'" in str(raised.value)

    # the protocol's {"error": ...} body on any /v2 answer, with or without a Content-Type
    with httpx.Client(base_url=url, timeout=60) as client:
        for response in (client.get("/v2/no/such/route"), client.post(f"/v2/models/{MODEL}/infer"),
                         client.post(f"/v2/models/{MODEL}/infer", content=b'{"inputs": [}'),
                         client.post(f"/v2/models/{MODEL}/infer", json={"inputs": []})):
            assert response.status_code in (400, 404, 422), response.text
            assert response.headers["content-type"] == "application/json"
            assert set(response.json()) == {"error"} and response.json()["error"]
        empty = client.post(f"/v2/models/{MODEL}/infer", json={"inputs": []}).json()["error"]
        assert empty.startswith("inputs")
        ready = client.get(f"/v2/models/{MODEL}/ready")
        assert ready.status_code == 200 and ready.json()["ready"] is True


def test_openapi_documents_the_infer_body(url: str) -> None:
    schema = httpx.get(f"{url}/openapi.json", timeout=60).json()
    body = schema["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]
    assert "inputs" in body["application/json"]["schema"]["properties"]
    assert "application/octet-stream" in body
    assert {"/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{name}/versions/{version}/ready",
            "/v2/models/{name}/versions/{version}/infer"} <= set(schema["paths"])
