"""``POST /v1/models`` and ``DELETE /v1/models/{name}@{version}`` at the gateway (no worker):
what is refused before anything is stored or queued, and what is queued."""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from redis import Redis
from safetensors.torch import save as save_safetensors

from models.architectures import build
from models.manifest import Lineage, ModelCard
from models.publish import publish_files
from service.app import create_app
from service.settings import Settings

A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}


@pytest.fixture
def teams(redis_url: str, redis: Redis, tmp_path: Path) -> Iterator[tuple[TestClient, Settings]]:
    settings = Settings(redis_url=redis_url, var_dir=tmp_path / "var", api_keys={"key-a": "a", "key-b": "b"},
                        max_models_per_team=2)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client, settings


def card(**extra: Any) -> str:
    return json.dumps({"name": "my-net", "input_shape": [3, 8, 8], "classes": ["cat", "dog", "eel"],
                       "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}, **extra})


def weights(architecture: str = "mlp") -> bytes:
    body = build(architecture, (3, 8, 8), 3)
    return save_safetensors({k: v.contiguous() for k, v in body.state_dict().items()})


def onnx_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.onnx.export(build("mlp", (3, 8, 8), 3).eval(), (torch.rand(2, 3, 8, 8),), buffer, dynamo=False,
                      opset_version=17, input_names=["x"], dynamic_axes={"x": {0: "n"}})
    return buffer.getvalue()


def push(client: TestClient, text: str, field: str, name: str, data: bytes,
         headers: dict[str, str] = A) -> Any:
    return client.post("/v1/models", data={"card": text}, files={field: (name, data)}, headers=headers)


def staged(settings: Settings) -> list[Path]:
    root = settings.blob_root / "uploads"
    return [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []


def test_safetensors_and_onnx_uploads_are_queued_as_registration_jobs(
        teams: tuple[TestClient, Settings]) -> None:
    client, settings = teams
    response = push(client, card(architecture="mlp"), "weights", "weights.safetensors", weights())
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["kind"] == "registration" and job["status"] == "queued"
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert client.get(f"/v1/jobs/{job['id']}", headers=A).status_code == 200
    assert client.get(f"/v1/jobs/{job['id']}", headers=B).status_code == 404
    response = push(client, card(), "model", "model.onnx", onnx_bytes())
    assert response.status_code == 202, response.text
    assert len(staged(settings)) == 2  # the files wait for the worker in the blob store


@pytest.mark.parametrize(("field", "name", "data", "fragment"), [
    ("model", "model.onnx", pickle.dumps({"w": [1.0]}), "a pickle"),
    ("weights", "model.pth", b"anything", "model.pth"),
    ("weights", "weights.bin", weights(), "weights.bin"),
])
def test_pickles_and_pytorch_files_are_refused_with_415(teams: tuple[TestClient, Settings], field: str,
                                                        name: str, data: bytes, fragment: str) -> None:
    client, settings = teams
    response = push(client, card(architecture="mlp"), field, name, data)
    assert response.status_code == 415, response.text
    body = response.json()
    assert fragment in body["detail"] and ".safetensors" in body["detail"] and ".onnx" in body["detail"]
    assert response.headers["content-type"].startswith("application/problem+json")
    assert staged(settings) == []


def test_torchscript_is_refused_with_415(teams: tuple[TestClient, Settings]) -> None:
    client, _ = teams
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), buffer)
    response = push(client, card(), "model", "model.onnx", buffer.getvalue())
    assert response.status_code == 415 and "TorchScript" in response.json()["detail"]


@pytest.mark.parametrize(("text", "field", "name", "data", "where"), [
    (card(architecture="mlp"), "weights", "weights.safetensors", weights()[:-10], "weights"),
    (card(architecture="no-such-net"), "weights", "weights.safetensors", weights(), "card.architecture"),
    (card(), "weights", "weights.safetensors", weights(), "card.architecture"),
    (card(architecture="mlp"), "model", "model.onnx", b"not an onnx graph", "card.architecture"),
    (card(), "model", "model.onnx", b"\x08\x07garbage that is no protobuf", "model"),
    (card(normalization={"mean": [0.5], "std": [0.5]}), "model", "model.onnx", b"x", "card"),
    (card(classes=["only-one"]), "model", "model.onnx", b"x", "card.classes"),
    (card(input_shape=[3, 8000, 8000]), "model", "model.onnx", b"x", "card.input_shape"),
    (card(name="Bad Name"), "model", "model.onnx", b"x", "card.name"),
])
def test_bad_uploads_are_422_naming_the_field(teams: tuple[TestClient, Settings], text: str, field: str,
                                              name: str, data: bytes, where: str) -> None:
    client, settings = teams
    response = push(client, text, field, name, data)
    assert response.status_code == 422, response.text
    assert response.json()["field"].startswith(where), response.json()
    assert staged(settings) == []


def test_an_onnx_input_that_contradicts_the_card_is_refused(teams: tuple[TestClient, Settings]) -> None:
    client, _ = teams
    response = push(client, card(input_shape=[3, 9, 9]), "model", "model.onnx", onnx_bytes())
    assert response.status_code == 422 and response.json()["field"] == "card.input_shape"


def test_form_shape_errors(teams: tuple[TestClient, Settings]) -> None:
    client, _ = teams
    both = client.post("/v1/models", data={"card": card(architecture="mlp")}, headers=A,
                       files={"weights": ("w.safetensors", weights()), "model": ("m.onnx", onnx_bytes())})
    assert both.status_code == 422 and both.json()["field"] == "model"
    json_body = client.post("/v1/models", json={"card": {}}, headers=A)
    assert json_body.status_code == 415
    no_card = client.post("/v1/models", files={"model": ("m.onnx", onnx_bytes())}, headers=A)
    assert no_card.status_code == 400 and no_card.json()["field"] == "card"


def _publish(settings: Settings, team: str | None, name: str = "my-net") -> ModelCard:
    data = weights()
    import hashlib

    draft = ModelCard(name=name, version=1, team=team, architecture="mlp", input_shape=(3, 8, 8),
                      mean=(0.0,) * 3, std=(1.0,) * 3, classes=("cat", "dog", "eel"),
                      sha256=hashlib.sha256(data).hexdigest(),
                      lineage=Lineage(recipe="upload", data="-", seed=0, created="2026-12-04T00:00:00Z"))
    return publish_files(settings.models_root, draft, {"weights.safetensors": data})


def test_names_quotas_and_deletion(teams: tuple[TestClient, Settings]) -> None:
    client, settings = teams
    hosted = push(client, card(name="fmnist-cnn"), "model", "model.onnx", onnx_bytes())
    assert hosted.status_code == 409 and hosted.json()["field"] == "card.name"
    first, second = _publish(settings, "a"), _publish(settings, "a")
    assert (first.version, second.version) == (1, 2)
    over = push(client, card(), "model", "model.onnx", onnx_bytes())
    assert over.status_code == 429 and "2 model versions" in over.json()["detail"]
    taken = push(client, card(), "model", "model.onnx", onnx_bytes(), headers=B)
    assert taken.status_code == 409  # team a's name

    assert client.delete("/v1/models/my-net@1", headers=B).status_code == 404
    assert client.delete("/v1/models/fmnist-cnn@1", headers=A).status_code == 403
    assert client.delete("/v1/models/my-net", headers=A).status_code == 422
    assert client.delete("/v1/models/my-net@1", headers=A).status_code == 204
    assert client.get("/v1/models/my-net@1", headers=A).status_code == 404
    assert client.get("/v1/models/my-net", headers=A).json()["versions"] == [2]
    assert client.delete("/v1/models/my-net@1", headers=A).status_code == 404
    # A deleted number is never given again.
    assert _publish(settings, "a").version == 3


def test_an_unsupported_onnx_operator_is_named(teams: tuple[TestClient, Settings]) -> None:
    client, settings = teams

    class Det(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.det(x[:, :, :4, :4]).flatten(1)[:, :1].repeat(1, 3)

    buffer = io.BytesIO()
    torch.onnx.export(Det(), (torch.rand(2, 3, 8, 8),), buffer, dynamo=False, opset_version=17,
                      input_names=["x"])
    response = push(client, card(), "model", "model.onnx", buffer.getvalue())
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "unsupported-operator" and "Det" in body["detail"]
    assert body["errors"] == [{"field": "model", "message": "unsupported operator Det"}]
    assert staged(settings) == []
