"""Bring your own model and data, end to end: a team exports a classifier to ONNX and to
safetensors + a catalog architecture, uploads both and an RGB evaluation set (an image-folder
archive), then attacks, audits with a gate and adversarially trains its model through HTTP, Redis
and a real worker; another team sees none of it; bad uploads are refused or fail validation and
leave the registry and the blob store as they were."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from redis import Redis
from safetensors.torch import save as save_safetensors
from torch import nn

from models.architectures import build
from models.datasets import build_skimage_patches
from models.manifest import CardIndex
from models.registry import load_module
from tests.integration.conftest import Running, start_service, wait

KEYS = {"key-a": "team-a", "key-b": "team-b"}
A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}
SHAPE = (3, 32, 32)


@pytest.fixture(scope="module")
def running(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    Redis.from_url(redis_url).flushdb()
    os.environ["ADVERSA_API_KEYS"] = json.dumps(KEYS)
    try:
        service = start_service(redis_url, tmp_path_factory.mktemp("var"), worker_name="byom-worker")
    finally:
        del os.environ["ADVERSA_API_KEYS"]
    service.client.headers.update(A)  # team A unless a request says otherwise
    try:
        yield service
    finally:
        service.stop()
        Redis.from_url(redis_url).flushdb()


def _hosted_rgb() -> tuple[Any, nn.Module]:
    """The hosted RGB model: the team 'trained' this one (its body, without normalisation)."""
    directory = CardIndex.default().directory("skimage-cnn")
    assert directory is not None
    card, module = load_module(directory)
    return card, module[1]


def _card(name: str, card: Any, **extra: Any) -> str:
    return json.dumps({"name": name, "input_shape": list(card.input_shape), "classes": list(card.classes),
                       "bounds": [0.0, 1.0], "normalization": {"mean": list(card.mean), "std": list(card.std)},
                       **extra})


def _onnx(module: nn.Module, dynamic: bool = True) -> bytes:
    buffer = io.BytesIO()
    torch.onnx.export(module, (torch.rand(2, *SHAPE),), buffer, dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}} if dynamic else None)
    return buffer.getvalue()


def _weights(module: nn.Module) -> bytes:
    return save_safetensors({k: v.detach().contiguous() for k, v in module.state_dict().items()})


def _push(client: httpx.Client, card: str, field: str, filename: str, data: bytes,
          headers: dict[str, str] = A) -> httpx.Response:
    return client.post("/v1/models", data={"card": card}, files={field: (filename, data)}, headers=headers)


def _registered(client: httpx.Client, response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
    job = wait(client, response.json()["id"])
    return dict(job)


def _image_folder(x: np.ndarray, y: np.ndarray, classes: tuple[str, ...]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i, (image, label) in enumerate(zip(x, y, strict=True)):
            png = io.BytesIO()
            Image.fromarray(image.transpose(1, 2, 0)).save(png, "PNG")
            archive.writestr(f"eval/{classes[label].replace(' ', '_')}/{i:04d}.png", png.getvalue())
    return buffer.getvalue()


def _huge_png() -> bytes:
    """A valid PNG header that declares 40000 x 40000 pixels (the data is tiny)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def _tree(var: Path) -> list[str]:
    return sorted(str(p.relative_to(var)) for p in var.rglob("*")
                  if p.is_file() and "logs" not in p.parts and not p.name.endswith(".json.tmp"))


def test_a_team_brings_its_model_and_data(running: Running) -> None:
    client = running.client
    card, body = _hosted_rgb()
    x, y = build_skimage_patches("test")
    pick = np.concatenate([np.flatnonzero(y == k)[:6] for k in range(len(card.classes))])

    # 1. Two formats of the same classifier.
    onnx_job = _registered(client, _push(client, _card("team-cnn-onnx", card), "model", "model.onnx",
                                         _onnx(body)))
    assert onnx_job["status"] == "succeeded", onnx_job
    st_job = _registered(client, _push(client, _card("team-cnn", card, architecture="small-cnn"),
                                       "weights", "weights.safetensors", _weights(body)))
    assert st_job["status"] == "succeeded", st_job
    onnx_card = client.get("/v1/models/team-cnn-onnx", headers=A).json()
    assert onnx_card["team"] == "team-a" and onnx_card["architecture"] == "onnx"
    registration = onnx_card["registration"]
    assert registration["format"] == "onnx" and registration["opset"] == 17
    assert registration["parameters"] == sum(p.numel() for p in body.parameters())
    assert set(registration["checks"]) >= {"output_shape", "finite", "deterministic", "gradients", "throughput"}
    assert onnx_card["gradients"] is True and onnx_card["batch_size"]["cpu"] >= 1
    assert client.get("/v1/models/team-cnn", headers=A).json()["registration"]["format"] == "safetensors"

    # 2. An RGB evaluation set as an image-folder archive.
    classes = tuple(c.replace(" ", "_") for c in card.classes)
    archive = _image_folder(x[pick], y[pick], classes)
    spec = json.dumps({"name": "team-eval", "classes": list(classes)})
    stored = client.post("/v1/datasets", data={"spec": spec}, files={"data": ("eval.zip", archive)}, headers=A)
    assert stored.status_code == 201, stored.text
    assert stored.json()["input_shape"] == list(SHAPE) and stored.json()["splits"] == {"all": len(pick)}
    data = {"dataset": "team-eval@1:all", "offset": 0, "limit": len(pick)}

    # 3. An attack on the ONNX-converted model, scored on the team's data.
    attack = client.post("/v1/attacks", headers=A, json={
        "model": "team-cnn-onnx", "attack": {"name": "pgd", "eps": 8 / 255, "steps": 10}, "inputs": data,
        "seed": 0})
    assert attack.status_code == 202, attack.text
    done = wait(client, attack.json()["id"])
    assert done["status"] == "succeeded", done
    scores = done["result"]["scores"]
    assert scores["n"] == len(pick) and scores["clean_accuracy"] > 0.5
    assert scores["robust_accuracy"] < scores["clean_accuracy"]
    grid = client.get(f"/v1/jobs/{done['id']}/artifacts/grid.png", headers=A)
    assert Image.open(io.BytesIO(grid.content)).mode == "RGB"
    # Transfer from the safetensors copy, and predictions: the two formats agree.
    transfer = client.post("/v1/attacks", headers=A, json={
        "model": "team-cnn-onnx", "surrogate": "team-cnn", "attack": {"name": "fgsm", "eps": 8 / 255},
        "inputs": data, "seed": 0})
    moved = wait(client, transfer.json()["id"])
    assert moved["status"] == "succeeded" and moved["result"]["surrogate"] == "team-cnn@1", moved
    assert moved["result"]["scores"]["transfer"]["transfer_rate"] > 0.9  # the same weights
    batch = (x[pick[:3]].astype(np.float32) / 255).tolist()
    answers = [client.post(f"/v2/models/{name}/infer", headers=A, json={"inputs": [
        {"name": "x", "shape": [3, *SHAPE], "datatype": "FP32", "data": batch}]}) for name in
        ("team-cnn-onnx", "team-cnn")]
    assert [a.status_code for a in answers] == [200, 200], answers[0].text
    logits = [np.asarray(next(o["data"] for o in a.json()["outputs"] if o["name"] == "logits"))
              for a in answers]
    assert np.allclose(logits[0], logits[1], atol=1e-4)

    # 4. An audit with a gate on the safetensors model.
    audit = client.post("/v1/audits", headers=A, json={
        "model": "team-cnn", "suite": "quick", "eps": {"linf": [2 / 255, 8 / 255]}, "steps": 5,
        "inputs": data, "chunk_size": 24, "seed": 0,
        "thresholds": ["clean_accuracy >= 0.5", "robust_accuracy@linf:8/255 >= 0.99"]})
    assert audit.status_code == 202, audit.text
    report = wait(client, audit.json()["id"])
    assert report["status"] == "succeeded", report
    gate = report["result"]["gate"]
    assert gate["verdict"] == "fail" and [line["passed"] for line in gate["lines"]] == [True, False]
    assert client.get(f"/v1/jobs/{report['id']}/artifacts/report.html", headers=A).status_code == 200

    # 5. PGD adversarial training makes a new version of the team's (ONNX) model.
    defense = client.post("/v1/defenses", headers=A, json={
        "model": "team-cnn-onnx", "output": "team-cnn-onnx", "seed": 0,
        "defense": {"name": "pgd-adversarial-training", "eps": 4 / 255, "steps": 3, "epochs": 1,
                    "limit": 256, "batch_size": 64, "init": "base", "data": "skimage-patches:train"},
        "evaluation": {"data": "team-eval@1:all", "clean_limit": len(pick), "robust_limit": 16, "steps": 5,
                       "eps": 4 / 255}})
    assert defense.status_code == 202, defense.text
    trained = wait(client, defense.json()["id"])
    assert trained["status"] == "succeeded", trained
    assert trained["result"]["model"] == "team-cnn-onnx@2"
    v2 = client.get("/v1/models/team-cnn-onnx@2", headers=A).json()
    assert v2["team"] == "team-a" and v2["lineage"]["base_model"] == "team-cnn-onnx@1"
    assert v2["architecture"] == "onnx" and v2["sha256"] == onnx_card["sha256"]  # same graph, new weights
    assert set(v2["files"]) == {"weights.safetensors"}
    robust = v2["metrics"][f"robust_accuracy@linf:{4 / 255:g}"]
    assert 0 <= robust <= v2["metrics"]["clean_accuracy"]
    again = client.post("/v1/attacks", headers=A, json={
        "model": "team-cnn-onnx@2", "attack": {"name": "fgsm", "eps": 4 / 255}, "inputs": data, "seed": 0})
    assert wait(client, again.json()["id"])["status"] == "succeeded"

    # 6. Another team sees none of it.
    names = {m["name"] for m in client.get("/v1/models", headers=B).json()["models"]}
    assert not names & {"team-cnn", "team-cnn-onnx"} and "skimage-cnn" in names
    assert client.get("/v1/models/team-cnn", headers=B).status_code == 404
    assert client.get("/v1/datasets/team-eval", headers=B).status_code == 404
    refused = client.post("/v1/attacks", headers=B, json={
        "model": "skimage-cnn", "attack": {"name": "fgsm", "eps": 0.03}, "inputs": data})
    assert refused.status_code in (404, 422) and "team-eval" in refused.text
    assert client.delete("/v1/models/team-cnn@1", headers=B).status_code == 404
    for job_id in (onnx_job["id"], done["id"], report["id"], trained["id"]):
        assert client.get(f"/v1/jobs/{job_id}", headers=B).status_code == 404
        assert client.get(f"/v1/jobs/{job_id}", headers=A).status_code == 200


def test_bad_uploads_change_nothing(running: Running) -> None:
    client = running.client
    card, body = _hosted_rgb()
    before_models = client.get("/v1/models", headers=A).json()
    before_sets = client.get("/v1/datasets", headers=A).json()
    before_tree = _tree(running.var)

    # Refused by the gateway.
    pickled = _push(client, _card("bad-pickle", card), "model", "model.onnx", pickle.dumps({"w": [1.0]}))
    assert pickled.status_code == 415 and "safetensors" in pickled.json()["detail"]
    truncated = _push(client, _card("bad-trunc", card, architecture="small-cnn"), "weights",
                      "weights.safetensors", _weights(body)[:-100])
    assert truncated.status_code == 422 and truncated.json()["field"] == "weights"

    class Odd(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # exported as Det, which the converter lacks
            return torch.linalg.det(x[:, :, :8, :8]).flatten(1)[:, :1].repeat(1, 8)

    odd = _push(client, _card("bad-op", card), "model", "model.onnx", _onnx(Odd()))
    assert odd.status_code == 422 and odd.json()["code"] == "unsupported-operator", odd.text
    assert "Det" in odd.json()["detail"]

    # Refused by the registration job.
    wrong = _registered(client, _push(client, _card("bad-keys", card, architecture="small-cnn"), "weights",
                                      "weights.safetensors", _weights(build("mlp", SHAPE, len(card.classes)))))
    assert wrong["status"] == "failed" and wrong["error"]["code"] == "invalid-weights"
    assert "missing" in wrong["error"]["message"] and "unexpected" in wrong["error"]["message"]

    class NaNs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = body

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x) * torch.log(x.mean() - 2.0)  # log of a negative number: NaN

    nan = _registered(client, _push(client, _card("bad-nan", card), "model", "model.onnx", _onnx(NaNs())))
    assert nan["status"] == "failed" and nan["error"]["code"] == "non-finite-logits", nan

    # Hostile archives for the data sets.
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a/0.png", b"\0" * (300 * 1024 * 1024))
    response = client.post("/v1/datasets", data={"spec": json.dumps({"name": "bad-bomb"})},
                           files={"data": ("bomb.zip", bomb.getvalue())}, headers=A)
    assert 400 <= response.status_code < 500, response.text
    huge = io.BytesIO()
    with zipfile.ZipFile(huge, "w") as archive:
        archive.writestr("a/0.png", _huge_png())
        archive.writestr("b/0.png", _huge_png())
    response = client.post("/v1/datasets", data={"spec": json.dumps({"name": "bad-huge"})},
                           files={"data": ("huge.zip", huge.getvalue())}, headers=A)
    assert 400 <= response.status_code < 500, response.text

    assert client.get("/v1/models", headers=A).json() == before_models
    assert client.get("/v1/datasets", headers=A).json() == before_sets
    assert _tree(running.var) == before_tree
