"""End to end: real HTTP to a gateway process, a real Redis, a real worker process."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from models.datasets import load_split
from tests.conftest import REPO
from tests.integration.conftest import submit, wait


def test_pgd_job_end_to_end(service: httpx.Client) -> None:
    job_id = submit(service, {
        "model": "fmnist-cnn",
        "attack": {"name": "pgd", "norm": "linf", "eps": 0.1, "steps": 20, "step_size": 0.01},
        "inputs": {"dataset": "fashion-mnist:test", "offset": 0, "limit": 200},
        "seed": 0,
    })
    job = wait(service, job_id)
    assert job["status"] == "succeeded", job
    assert job["progress"] == 1.0 and job["error"] is None
    scores = job["result"]["scores"]
    assert scores["n"] == 200 and scores["labels"] == "given"
    assert scores["clean_accuracy"] >= 0.85
    assert scores["robust_accuracy"] <= scores["clean_accuracy"] - 0.5
    assert scores["success_rate"] >= 0.9
    assert scores["perturbation"]["linf"]["median"] <= 0.1 + 1e-6
    assert scores["gradient_calls"] > 0 and scores["queries"] >= scores["gradient_calls"]
    assert scores["quantized"]["robust_accuracy"] <= scores["clean_accuracy"] - 0.5
    assert set(job["result"]["artifacts"]) == {"adversarial.npy", "grid.png", "samples.csv"}

    adv = np.load(io.BytesIO(service.get(f"/v1/jobs/{job_id}/artifacts/adversarial.npy").content),
                  allow_pickle=False)
    x, _ = load_split("fashion-mnist:test").slice(0, 200)
    assert adv.shape == (200, 1, 28, 28) and adv.dtype == np.float32
    assert adv.min() >= 0 and adv.max() <= 1
    assert np.abs(adv - x).max() <= 0.1 + 1e-6
    grid = service.get(f"/v1/jobs/{job_id}/artifacts/grid.png")
    assert grid.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(grid.content)) as image:
        assert image.format == "PNG" and image.width > image.height > 0
    rows = list(csv.DictReader(io.StringIO(service.get(
        f"/v1/jobs/{job_id}/artifacts/samples.csv").text)))
    assert len(rows) == 200
    assert sum(r["success"] == "1" for r in rows) == round(scores["success_rate"] * sum(
        r["clean_pred"] == r["label"] for r in rows))
    assert service.get(f"/v1/jobs/{job_id}/artifacts/../../etc").status_code == 404
    assert service.get(f"/v1/jobs/{job_id}/artifacts/model.bin").status_code == 404


def test_deepfool_job(service: httpx.Client) -> None:
    job_id = submit(service, {
        "model": "fmnist-cnn", "attack": {"name": "deepfool"},
        "inputs": {"dataset": "fashion-mnist:test", "offset": 200, "limit": 100}, "seed": 0,
    })
    job = wait(service, job_id)
    assert job["status"] == "succeeded", job
    scores = job["result"]["scores"]
    assert scores["success_rate"] >= 0.99
    assert 0 < scores["rho"] < 0.5
    assert scores["robust_accuracy"] <= 0.01


def test_targeted_fgsm_on_uploaded_images(service: httpx.Client) -> None:
    x, y = load_split("fashion-mnist:test").slice(0, 4)
    files = []
    for i in range(4):
        buffer = io.BytesIO()
        Image.fromarray((x[i, 0] * 255).round().astype(np.uint8), mode="L").save(buffer, "PNG")
        files.append(("files", (f"{i}.png", buffer.getvalue(), "image/png")))
    spec = ('{"model": "fmnist-cnn", "attack": {"name": "fgsm", "eps": 0.2, "targeted": true, '
            '"target_mode": "least-likely"}, "seed": 3}')
    response = service.post("/v1/attacks", data={"spec": spec, "labels": str(y.tolist())},
                            files=files)
    assert response.status_code == 202, response.text
    job = wait(service, response.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["result"]["scores"]["n"] == 4
    rows = list(csv.DictReader(io.StringIO(service.get(
        f"/v1/jobs/{job['id']}/artifacts/samples.csv").text)))
    assert all(int(r["target"]) != int(r["label"]) for r in rows)


def test_inference(service: httpx.Client) -> None:
    x, y = load_split("fashion-mnist:test").slice(0, 32)
    body = {"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}
    response = service.post("/v2/models/fmnist-cnn/infer", json=body)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    labels = np.array(outputs["label"]["data"])
    assert outputs["probabilities"]["shape"] == [32, 10]
    assert (labels == y).mean() >= 0.8
    raw = (x[:, 0] * 255).round().astype(np.uint8)[..., None]
    body = {"inputs": [{"name": "images", "shape": list(raw.shape), "datatype": "UINT8",
                        "data": raw.ravel().tolist()}]}
    again = service.post("/v2/models/fmnist-cnn/infer", json=body).json()
    assert again["outputs"][0]["data"] == outputs["label"]["data"]


def test_failing_jobs_end_failed_with_a_code(service: httpx.Client, redis_url: str) -> None:
    queue = Queue("attacks", connection=Redis.from_url(redis_url), serializer=JSONSerializer)
    meta = {"kind": "attack", "team": "public", "model": "ghost@1"}
    ghost = {"job_id": "ghost", "team": "public", "model": "ghost@1",
             "attack": {"name": "fgsm", "eps": 0.1},
             "inputs": {"kind": "dataset", "n": 4, "dataset": "fashion-mnist:test"}, "seed": 0}
    queue.enqueue_call("workers.jobs.run_attack", args=(ghost,), job_id="ghost", meta=meta,
                       timeout=60)
    queue.enqueue_call("workers.jobs.run_attack", args=({"nonsense": 1},), job_id="nonsense",
                       meta=meta, timeout=60)
    ghost_job = wait(service, "ghost")
    assert ghost_job["status"] == "failed"
    assert ghost_job["error"]["code"] == "unknown-model" and "ghost@1" in ghost_job["error"]["message"]
    nonsense = wait(service, "nonsense")
    assert nonsense["status"] == "failed" and nonsense["error"]["code"] == "invalid-job"
    # The worker survived both failures.
    assert service.get("/readyz").status_code == 200


def test_metrics_of_jobs_run_by_a_worker(service: httpx.Client, redis_url: str) -> None:
    """What the worker process records (outcome, duration) and the gateway's own infer latency
    appear in the gateway's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    job_id = submit(service, {"model": "fmnist-cnn", "attack": {"name": "fgsm", "eps": 0.1},
                              "inputs": {"dataset": "fashion-mnist:test", "limit": 8}})
    Queue("attacks", connection=Redis.from_url(redis_url), serializer=JSONSerializer).enqueue_call(
        "workers.jobs.run_attack", args=({"nonsense": 1},), job_id="metricsfail", timeout=60,
        meta={"kind": "attack", "team": "public", "model": "fmnist-cnn@1"})
    assert wait(service, job_id)["status"] == "succeeded"
    assert wait(service, "metricsfail")["status"] == "failed"
    x = np.zeros((2, 1, 28, 28), dtype=np.float32)
    infer = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    assert service.post("/v2/models/fmnist-cnn/infer", json=infer).status_code == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(service.get("/metrics").text) for s in f.samples}
    count = "adversa_job_duration_seconds_count"
    assert samples[count, (("kind", "attack"), ("outcome", "succeeded"))] >= 1
    assert samples[count, (("kind", "attack"), ("outcome", "failed"))] >= 1
    assert samples[count, (("kind", "predict"), ("outcome", "succeeded"))] >= 1
    assert samples["adversa_job_duration_seconds_sum", (("kind", "attack"), ("outcome", "succeeded"))] > 0
    assert samples["adversa_infer_seconds_count", (("outcome", "succeeded"),)] >= 1
    assert samples["adversa_workers_live", ()] == 1
    assert samples["adversa_requests_total", (("method", "GET"), ("route", "/v1/jobs/{job_id}"),
                                              ("status", "200"))] >= 1


def test_cancel_a_running_job(service: httpx.Client) -> None:
    job_id = submit(service, {
        "model": "fmnist-cnn",
        "attack": {"name": "pgd", "eps": 0.01, "steps": 200, "early_stop": False},
        "inputs": {"dataset": "fashion-mnist:train", "limit": 10000}, "batch_size": 16,
    })
    running = wait(service, job_id, until=("running", "succeeded", "failed", "canceled"))
    assert running["status"] == "running", running
    response = service.delete(f"/v1/jobs/{job_id}")
    assert response.status_code == 202
    job = wait(service, job_id)
    assert job["status"] == "canceled", job
    assert job["error"]["code"] == "canceled" and job["progress"] < 1.0
    # The worker takes the next job.
    follow = submit(service, {"model": "fmnist-cnn", "attack": {"name": "fgsm", "eps": 0.1},
                              "inputs": {"dataset": "fashion-mnist:test", "limit": 8}})
    assert wait(service, follow)["status"] == "succeeded"


def test_gateway_imports_no_torch() -> None:
    code = ("import sys, service.app, service.cli, service.serve, workers.specs; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_transfer_attack(service: httpx.Client) -> None:
    job_id = submit(service, {
        "model": "fmnist-resnet18", "surrogate": "fmnist-cnn",
        "attack": {"name": "pgd", "eps": 0.15, "steps": 10},
        "inputs": {"dataset": "fashion-mnist:test", "offset": 300, "limit": 64}, "seed": 0,
    })
    job = wait(service, job_id)
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert result["model"] == "fmnist-resnet18@1" and result["surrogate"] == "fmnist-cnn@1"
    transfer = result["scores"]["transfer"]
    assert transfer["surrogate"] == "fmnist-cnn@1"
    assert transfer["surrogate_success_rate"] >= 0.9
    assert 0 < transfer["transfer_rate"] <= 1
    # Scores are the target's: transferred examples fool it less often than the surrogate.
    assert result["scores"]["success_rate"] <= transfer["surrogate_success_rate"]


SUITE = [
    {"name": "mi-fgsm", "eps": 0.1, "steps": 10},
    {"name": "apgd-ce", "eps": 0.1, "steps": 20},
    {"name": "apgd-t", "eps": 0.1, "steps": 10, "n_target_classes": 3},
    {"name": "carlini-wagner-l2", "binary_search_steps": 3, "max_iter": 30, "learning_rate": 0.05,
     "initial_const": 0.1},
    {"name": "jsma", "targeted": True, "target_mode": "random"},
    {"name": "deepfool", "norm": "linf"},
    {"name": "square", "eps": 0.15, "max_queries": 300},
    {"name": "hop-skip-jump", "max_queries": 400, "steps": 5},
]


@pytest.mark.parametrize("spec", SUITE, ids=[s["name"] for s in SUITE])
def test_every_attack_runs_through_the_service(service: httpx.Client, spec: dict[str, Any]) -> None:
    job_id = submit(service, {"model": "fmnist-cnn", "attack": spec, "seed": 1,
                              "inputs": {"dataset": "fashion-mnist:test", "offset": 500, "limit": 16}})
    job = wait(service, job_id)
    assert job["status"] == "succeeded", job
    scores = job["result"]["scores"]
    assert scores["n"] == 16
    assert scores["robust_accuracy"] <= scores["clean_accuracy"]
    assert scores["success_rate"] is not None and scores["success_rate"] > 0
    assert scores["queries"] >= 1
    black_box = spec["name"] in ("square", "hop-skip-jump")
    assert (scores["gradient_calls"] == 0) == black_box
    if spec["name"] in ("carlini-wagner-l2", "hop-skip-jump", "jsma", "deepfool"):
        assert scores["rho"] is not None
