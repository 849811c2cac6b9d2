"""Defense jobs end to end: HTTP -> Redis -> a real worker -> the registry, and detection-and-reject
predictions. Training runs on small slices (a few hundred images, one epoch) to stay quick."""

from __future__ import annotations

import base64
import io
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from models.datasets import load_split
from tests.integration.conftest import start_service, wait, wait_for_training

QUICK = {"clean_limit": 300, "robust_limit": 64, "steps": 5}


def defend(client: httpx.Client, body: dict[str, Any]) -> str:
    response = client.post("/v1/defenses", json={"seed": 0, "evaluation": QUICK, **body})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def test_adversarial_training_publishes_a_model_with_lineage(service: httpx.Client) -> None:
    job_id = defend(service, {"model": "fmnist-cnn", "output": "e2e-fgsm", "defense": {
        "name": "fgsm-adversarial-training", "eps": 0.1, "alpha": 0.5, "epochs": 1, "limit": 640,
        "batch_size": 64}})
    job = wait(service, job_id)
    assert job["status"] == "succeeded", job
    assert job["kind"] == "defense" and job["result"]["model"] == "e2e-fgsm@1"
    card = service.get("/v1/models/e2e-fgsm").json()
    assert card["version"] == 1 and card["team"] == "public" and card["architecture"] == "small-cnn"
    lineage = card["lineage"]
    assert lineage["base_model"] == "fmnist-cnn@1" and lineage["recipe"] == "fgsm-adversarial-training"
    assert lineage["seed"] == 0 and lineage["data"] == "fashion-mnist:train"
    assert lineage["parameters"]["alpha"] == 0.5 and lineage["parameters"]["limit"] == 640
    assert lineage["parameters"]["training"]["train"]["steps"] == 10
    metrics = card["metrics"]
    assert 0.3 < metrics["clean_accuracy"] <= 1.0  # one epoch on 640 images: well above chance
    assert 0.0 <= metrics["robust_accuracy@linf:0.1"] <= metrics["clean_accuracy"]
    # The new model is a registry model like any other: it can be attacked at once.
    attack = service.post("/v1/attacks", json={
        "model": "e2e-fgsm", "attack": {"name": "fgsm", "eps": 0.1},
        "inputs": {"dataset": "fashion-mnist:test", "limit": 16}})
    assert attack.status_code == 202
    assert wait(service, attack.json()["id"])["status"] == "succeeded"
    # The same output name again is a new version, not an overwrite.
    again = wait(service, defend(service, {"model": "fmnist-cnn", "output": "e2e-fgsm", "defense": {
        "name": "fgsm-adversarial-training", "epochs": 1, "limit": 128, "batch_size": 64}}))
    assert again["status"] == "succeeded" and again["result"]["model"] == "e2e-fgsm@2"
    assert service.get("/v1/models/e2e-fgsm").json()["versions"] == [1, 2]
    assert service.get("/v1/models/e2e-fgsm@1").json()["lineage"]["parameters"]["limit"] == 640


def test_distillation_preprocessing_and_ensemble(service: httpx.Client) -> None:
    distilled = wait(service, defend(service, {"model": "fmnist-cnn", "output": "e2e-distilled", "defense": {
        "name": "distillation", "temperature": 20, "epochs": 1, "limit": 512, "batch_size": 64}}))
    assert distilled["status"] == "succeeded", distilled
    card = service.get("/v1/models/e2e-distilled").json()
    training = card["lineage"]["parameters"]["training"]
    assert set(training) == {"teacher", "student"} and card["lineage"]["parameters"]["temperature"] == 20

    wrapped = wait(service, defend(service, {"model": "fmnist-cnn", "output": "e2e-jpeg", "defense": {
        "name": "preprocessing",
        "steps": [{"name": "jpeg", "quality": 60}, {"name": "bit-depth", "bits": 4}]}}))
    assert wrapped["status"] == "succeeded", wrapped
    card = service.get("/v1/models/e2e-jpeg").json()
    assert card["architecture"] == "preprocessing" and card["sha256"] is None
    assert card["composition"]["base"] == "fmnist-cnn@1" and card["composition"]["differentiable"] is False
    metrics = card["metrics"]
    assert metrics["clean_accuracy"] > 0.8
    # Plain gradients through JPEG and bit depth are zero: PGD looks weak. BPDA is the honest figure.
    assert metrics["plain_gradient_robust_accuracy@linf:0.1"] > metrics["robust_accuracy@linf:0.1"] + 0.3

    ensemble = wait(service, defend(service, {"output": "e2e-ensemble", "defense": {
        "name": "ensemble", "members": ["fmnist-cnn", "e2e-jpeg"], "combine": "majority-vote"}}))
    assert ensemble["status"] == "succeeded", ensemble
    card = service.get("/v1/models/e2e-ensemble").json()
    assert card["composition"]["members"] == ["fmnist-cnn@1", "e2e-jpeg@1"]
    assert card["composition"]["differentiable"] is False
    # Compositions serve predictions like any model.
    x, _ = load_split("fashion-mnist:test").slice(0, 4)
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    response = service.post("/v2/models/e2e-ensemble/infer", json={"inputs": [tensor]})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["shape"] == [4]


def _npy(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.float32))
    return base64.b64encode(buffer.getvalue()).decode()


def test_detector_calibration_and_reject(service: httpx.Client) -> None:
    job = wait(service, defend(service, {"model": "fmnist-cnn", "defense": {
        "name": "feature-squeezing", "fpr": 0.05, "attacks": ["fgsm", "pgd"],
        "calibration": {"dataset": "fashion-mnist:test", "offset": 5000, "limit": 400},
        "held_out": {"dataset": "fashion-mnist:test", "offset": 7500, "limit": 400},
        "attack_inputs": {"dataset": "fashion-mnist:test", "offset": 0, "limit": 64}}}))
    assert job["status"] == "succeeded", job
    detector = job["result"]["detector"]
    assert detector["model"] == "fmnist-cnn@1" and detector["team"] == "public"
    assert 0 <= detector["metrics"]["false_positive_rate"] <= 0.15  # 5% target on 400 other images
    assert set(job["result"]["attacks"]) == {"fgsm", "pgd"}
    assert 0 <= detector["metrics"]["detection_rate@pgd"] <= 1

    # PGD examples of the first 64 test images, then detection-and-reject on them and on clean ones.
    attack = wait(service, service.post("/v1/attacks", json={
        "model": "fmnist-cnn", "attack": {"name": "pgd", "eps": 0.1, "steps": 20},
        "inputs": {"dataset": "fashion-mnist:test", "limit": 64}, "seed": 0}).json()["id"])
    adversarial = np.load(io.BytesIO(service.get(f"/v1/jobs/{attack['id']}/artifacts/adversarial.npy").content))
    clean, _ = load_split("fashion-mnist:test").slice(0, 64)

    def reject(x: np.ndarray) -> dict[str, Any]:
        tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
        response = service.post("/v2/models/fmnist-cnn/infer",
                                json={"inputs": [tensor], "parameters": {"reject": True}})
        assert response.status_code == 200, response.text
        answer = response.json()
        return {o["name"]: o for o in answer["outputs"]} | {"parameters": answer["parameters"]}

    on_clean, on_adversarial = reject(clean), reject(adversarial)
    for out in (on_clean, on_adversarial):
        assert {"label", "detector_score", "threshold", "rejected"} <= set(out)
        assert out["rejected"]["shape"] == [64] and out["threshold"]["data"][0] == detector["threshold"]
        scores, flags = np.array(out["detector_score"]["data"]), np.array(out["rejected"]["data"])
        assert (flags == (scores > detector["threshold"])).all()
        assert out["parameters"]["detector"]["fpr"] == 0.05
    assert sum(on_adversarial["rejected"]["data"]) > sum(on_clean["rejected"]["data"]) + 10


def test_cancel_a_training_job(service: httpx.Client) -> None:
    job_id = defend(service, {"model": "fmnist-cnn", "output": "e2e-canceled", "defense": {
        "name": "pgd-adversarial-training", "epochs": 5, "limit": 20000, "batch_size": 32}})
    job = wait_for_training(service, job_id)
    stage = job["stage"]
    assert stage["phase"] == "train" and stage["epoch"] == 1 and stage["epochs"] == 5
    assert stage["batches"] == 625 and 0 <= stage["accuracy"] <= 1 and stage["loss"] > 0
    assert service.delete(f"/v1/jobs/{job_id}").status_code == 202
    job = wait(service, job_id)
    assert job["status"] == "canceled" and job["progress"] < 0.5, job
    assert service.get("/v1/models/e2e-canceled").status_code == 404


def test_a_worker_killed_during_training_leaves_no_model(redis_url: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A separate gateway + worker pair (own queues, own registry), so that killing the worker
    does not disturb the module's service. No retry (a retried training that finishes is
    tests/integration/test_faults.py's) and a short heartbeat: the job fails as worker-lost once
    the dead worker's liveness key expires (two heartbeat TTLs)."""
    monkeypatch.setenv("ADVERSA_JOB_RETRIES", "0")
    monkeypatch.setenv("ADVERSA_HEARTBEAT_TTL_S", "6")
    # queues of this run only: a job an earlier, interrupted run left queued is not this worker's
    running = start_service(redis_url, tmp_path / "var", queue_prefix=f"kill-{os.getpid()}-",
                            worker_name="doomed")
    try:
        client = running.client
        job_id = defend(client, {"model": "fmnist-cnn", "output": "e2e-killed", "defense": {
            "name": "pgd-adversarial-training", "epochs": 5, "limit": 20000, "batch_size": 32}})
        wait_for_training(client, job_id)
        os.kill(running.worker.pid, signal.SIGKILL)
        running.worker.wait(timeout=30)
        job = wait(client, job_id, until=("failed", "succeeded", "canceled"))
        assert job["status"] == "failed" and job["error"]["code"] == "worker-lost", job
        assert client.get("/v1/models/e2e-killed").status_code == 404
        models = running.var / "models"
        assert not any(p.name == "card.json" for p in models.rglob("*")) if models.exists() else True
    finally:
        running.stop()


@pytest.mark.parametrize("body", [
    {"model": "fmnist-cnn", "output": "x", "defense": {"name": "fgsm-adversarial-training", "eps": 2}},
    {"output": "x", "defense": {"name": "ensemble", "members": ["fmnist-cnn", "ghost"]}},
])
def test_refused_defenses_queue_nothing(service: httpx.Client, body: dict[str, Any]) -> None:
    response = service.post("/v1/defenses", json=body)
    assert response.status_code in (404, 422), response.text
    assert response.headers["content-type"].startswith("application/problem+json")
