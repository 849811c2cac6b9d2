"""A worker process that preloads its model before taking jobs: /readyz reports it warm (models,
chunk sizes, torch threads), and jobs reuse the chunk size it calibrated instead of measuring again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from redis import Redis

from tests.integration.conftest import start_service, submit, wait


def test_preloaded_worker_is_warm_and_jobs_reuse_its_calibration(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Redis.from_url(redis_url).flushdb()
    monkeypatch.setenv("ADVERSA_PRELOAD", "fmnist-cnn")
    monkeypatch.setenv("ADVERSA_TORCH_THREADS", "1")
    running = start_service(redis_url, tmp_path / "var", worker_name="warm-worker")
    try:
        client = running.client
        ready = client.get("/readyz").json()  # start_service waited for 200: the worker is warm
        status = ready["worker_status"]["warm-worker"]
        assert ready["warm"] == 1 and status["state"] == "warm" and status["loading"] is None
        assert status["threads"] == 1 and status["device"] == "cpu" and status["failed"] == {}
        preloaded = status["models"]["fmnist-cnn@1"]["batch_size"]
        assert preloaded >= 1

        x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
        infer = client.post("/v2/models/fmnist-cnn/infer", json={"inputs": [
            {"name": "x", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": x.ravel().tolist()}]})
        assert infer.status_code == 200, infer.text

        job_id = submit(client, {
            "model": "fmnist-cnn",
            "attack": {"name": "pgd", "norm": "linf", "eps": 0.1, "steps": 5, "step_size": 0.03},
            "inputs": {"dataset": "fashion-mnist:test", "offset": 0, "limit": 64}, "seed": 0,
        })
        job = wait(client, job_id)
        assert job["status"] == "succeeded", job
        result = job["result"]
        assert result["batch_size_source"] == "remembered" and result["batch_size"] == preloaded
        assert job["stage"] == {"phase": "scoring"}
        assert set(result["artifacts"]) == {"adversarial.npy", "grid.png", "samples.csv"}
    finally:
        running.stop()
        Redis.from_url(redis_url).flushdb()
