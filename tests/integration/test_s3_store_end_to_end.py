"""Across machines: a gateway and workers that share only Redis, the S3 store (a real S3-speaking
server, tests/s3server.py) and the history database, each with its own var dir (no shared disk).
An attack on uploaded images runs, its artifacts come back over HTTP, every blob is in the bucket
and none on either disk; the worker's sweep removes an orphan input at start. A model uploaded to
the gateway is registered by one worker and attacked, on a data set uploaded to the gateway, by
another worker that starts with an empty var dir; a generator trained there attacks on a fourth
worker with an empty var dir: the registry lives in the store."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from redis import Redis

from models.datasets import load_split
from models.manifest import GENERATOR_FILE, WEIGHTS_FILE, CardIndex
from models.registry_store import CACHE_DIR
from models.store import S3Store
from tests.conftest import REPO
from tests.history_db import database
from tests.integration.conftest import JOB_TIMEOUT_S, Running, _logs, free_port, wait
from tests.s3server import S3Server, s3_server  # noqa: F401 - the session fixture


@dataclass
class Machines:
    running: Running  # the gateway on machine A, the worker on machine B
    worker_var: Path
    store: S3Store
    env: dict[str, str]  # what points a process at Redis, the bucket and the history


@pytest.fixture
def machines(redis_url: str, s3_server: S3Server, tmp_path: Path  # noqa: F811
             ) -> Iterator[Machines]:
    """A gateway on 'machine A' and a worker on 'machine B'; the bucket's store."""
    Redis.from_url(redis_url).flushdb()
    bucket = s3_server.new_bucket()
    store = S3Store(bucket, prefix="e2e", endpoint_url=s3_server.endpoint_url)
    store.put("inputs/0rphan.npz", b"left by a gateway killed before it enqueued")
    gateway_var, worker_var, logs = tmp_path / "a", tmp_path / "b", tmp_path / "a" / "logs"
    logs.mkdir(parents=True)
    with database("postgresql", tmp_path) as history_url:
        env = {**os.environ, **s3_server.env(bucket, "e2e"), "REDIS_URL": redis_url,
               "ADVERSA_HISTORY_URL": history_url, "ADVERSA_QUEUE_PREFIX": "s3e2e-",
               "PYTHONPATH": str(REPO)}
        # One sweep at the worker's start (then hourly), with no grace: the test sends its job after.
        worker_env = {**env, "ADVERSA_VAR_DIR": str(worker_var), "ADVERSA_SWEEP_INTERVAL_S": "3600",
                      "ADVERSA_SWEEP_GRACE_S": "0"}
        port = free_port()
        cli = [sys.executable, "-m", "service.cli"]
        running = Running(
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120), gateway_var,
            subprocess.Popen([*cli, "worker", "--name", "s3-worker"], env=worker_env, cwd=REPO,
                             stdout=(logs / "worker.log").open("wb"), stderr=subprocess.STDOUT),
            subprocess.Popen([*cli, "serve", "--port", str(port), "--workers", "0"],
                             env={**env, "ADVERSA_VAR_DIR": str(gateway_var)}, cwd=REPO,
                             stdout=(logs / "gateway.log").open("wb"), stderr=subprocess.STDOUT),
        )
        try:
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while not ready(running):
                assert running.worker.poll() is None and running.gateway.poll() is None, _logs(logs)
                assert time.monotonic() < deadline, f"not ready in {JOB_TIMEOUT_S} s\n{_logs(logs)}"
                time.sleep(0.5)
            yield Machines(running, worker_var, store, env)
        finally:
            running.stop()
            Redis.from_url(redis_url).flushdb()


def empty_machine(machines: Machines, name: str, var: Path) -> subprocess.Popen[bytes]:
    """A worker ``s3-worker-<name>`` on another machine: an empty var dir ``var``, no preloading, no sweep."""
    var.mkdir()
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker", "--name", f"s3-worker-{name}"],
        env={**machines.env, "ADVERSA_VAR_DIR": str(var), "ADVERSA_PRELOAD": "none",
             "ADVERSA_SWEEP_INTERVAL_S": "0"},
        cwd=REPO, stdout=(machines.running.logs / f"worker-{name}.log").open("wb"), stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def ready(running: Running) -> bool:
    try:
        return running.client.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False


def test_attack_with_uploaded_images_across_machines(machines: Machines) -> None:
    running, worker_var, store = machines.running, machines.worker_var, machines.store
    client = running.client
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while store.exists("inputs/0rphan.npz"):  # the worker's sweep at start
        assert time.monotonic() < deadline, "the worker never swept the orphan input"
        time.sleep(0.2)

    x, y = load_split("fashion-mnist:test").slice(0, 4)
    files = []
    for i in range(4):
        buffer = io.BytesIO()
        Image.fromarray((x[i, 0] * 255).round().astype(np.uint8), mode="L").save(buffer, "PNG")
        files.append(("files", (f"{i}.png", buffer.getvalue(), "image/png")))
    spec = '{"model": "fmnist-cnn", "attack": {"name": "fgsm", "eps": 0.2}, "seed": 1}'
    response = client.post("/v1/attacks", data={"spec": spec, "labels": str(y.tolist())}, files=files)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    job = wait(client, job_id)
    assert job["status"] == "succeeded", (job, _logs(running.logs))
    assert job["result"]["scores"]["n"] == 4

    adv = np.load(io.BytesIO(client.get(f"/v1/jobs/{job_id}/artifacts/adversarial.npy").content),
                  allow_pickle=False)
    assert adv.shape == (4, 1, 28, 28) and adv.min() >= 0 and adv.max() <= 1
    quantized = (x * 255).round() / 255  # what the PNGs carried
    assert np.abs(adv - quantized).max() <= 0.2 + 1e-5
    artifacts = job["result"]["artifacts"]
    assert store.list(f"jobs/{job_id}") == sorted(f"jobs/{job_id}/{name}" for name in artifacts)
    assert store.exists(f"inputs/{job_id}.npz")  # a job the history keeps keeps its inputs
    for var in (running.var, worker_var):  # nothing went through either disk
        assert not (var / "blobs").exists()


def test_registry_across_machines(machines: Machines, tmp_path: Path) -> None:
    """Upload on A, registration on B, attack on C (empty var dir) with a data set uploaded on A;
    a deletion on A reaches the store and every listing."""
    running, store = machines.running, machines.store
    client = running.client
    hosted = CardIndex.default()
    base = hosted.card("fmnist-cnn")
    directory = hosted.directory("fmnist-cnn")
    assert base is not None and directory is not None
    card = {"name": "team-cnn", "input_shape": list(base.input_shape), "classes": list(base.classes),
            "architecture": base.architecture}
    weights = (directory / WEIGHTS_FILE).read_bytes()
    response = client.post("/v1/models", data={"card": json.dumps(card)},
                           files={"weights": ("w.safetensors", weights)})
    assert response.status_code == 202, response.text
    registration = wait(client, response.json()["id"])  # machine B: the only worker yet
    assert registration["status"] == "succeeded", (registration, _logs(running.logs))
    assert client.get("/v1/models/team-cnn").json()["version"] == 1
    assert store.exists("registry/models/team-cnn/1/card.json")
    assert store.get(f"registry/models/team-cnn/1/{WEIGHTS_FILE}") == weights

    x, y = load_split("fashion-mnist:test").slice(0, 6)
    buffer = io.BytesIO()
    np.savez(buffer, x=(x[:, 0] * 255).round().astype(np.uint8), y=y)
    response = client.post("/v1/datasets", data={"spec": json.dumps({"name": "team-eval", "split": "test"})},
                           files={"data": ("eval.npz", buffer.getvalue())})
    assert response.status_code == 201, response.text
    assert store.exists("registry/datasets/team-eval/1/card.json")

    # Machine C: a new worker with an empty var dir takes the attack; B is gone.
    third_var = tmp_path / "c"
    third = empty_machine(machines, "c", third_var)
    try:
        running.worker.terminate()
        running.worker.wait(timeout=60)
        spec = {"model": "team-cnn@1", "attack": {"name": "fgsm", "eps": 0.2}, "seed": 1,
                "inputs": {"dataset": "team-eval@1:test", "offset": 0, "limit": 6}}
        response = client.post("/v1/attacks", json=spec)
        assert response.status_code == 202, response.text
        job = wait(client, response.json()["id"])
        assert job["status"] == "succeeded", (job, _logs(running.logs))
        scores = job["result"]["scores"]
        assert scores["n"] == 6 and scores["clean_accuracy"] is not None
        fetched = third_var / CACHE_DIR / "models" / "team-cnn" / "1" / WEIGHTS_FILE
        assert fetched.read_bytes() == weights  # C loaded the weights it fetched from the store
        # A defense on C publishes into the store, and the gateway lists it.
        response = client.post("/v1/defenses", json={
            "model": "team-cnn@1", "output": "team-cnn-bits", "seed": 0,
            "defense": {"name": "preprocessing", "steps": [{"name": "bit-depth", "bits": 4}]},
            "evaluation": {"data": "team-eval@1:test", "clean_limit": 6, "robust_limit": 6, "steps": 2}})
        assert response.status_code == 202, response.text
        defense = wait(client, response.json()["id"])
        assert defense["status"] == "succeeded", (defense, _logs(running.logs))
        assert client.get("/v1/models/team-cnn-bits").json()["composition"]["base"] == "team-cnn@1"
        assert store.exists("registry/models/team-cnn-bits/1/card.json")
        # A generator trained on C (tiny: one epoch of 64 images) goes to the store too.
        response = client.post("/v1/attacks/generators", json={
            "model": "fmnist-cnn", "output": "team-advgan", "epochs": 1, "limit": 64, "batch_size": 32,
            "eps": 0.2, "seed": 0, "evaluation": {"dataset": "fashion-mnist:test", "offset": 0, "limit": 16}})
        assert response.status_code == 202, response.text
        trained = wait(client, response.json()["id"])
        assert trained["status"] == "succeeded", (trained, _logs(running.logs))
        assert store.exists("registry/generators/team-advgan/1/card.json")
        assert client.get("/v1/attacks/generators/team-advgan").json()["version"] == 1
    finally:
        stop(third)

    # Machine D: another empty var dir; it attacks with the generator that C trained.
    fourth_var = tmp_path / "d"
    fourth = empty_machine(machines, "d", fourth_var)
    try:
        spec = {"model": "fmnist-cnn", "attack": {"name": "advgan", "generator": "team-advgan@1"}, "seed": 1,
                "inputs": {"dataset": "fashion-mnist:test", "offset": 100, "limit": 8}}
        response = client.post("/v1/attacks", json=spec)
        assert response.status_code == 202, response.text
        job = wait(client, response.json()["id"])
        assert job["status"] == "succeeded", (job, _logs(running.logs))
        assert job["result"]["generator"]["generator"] == "team-advgan@1" and job["result"]["scores"]["n"] == 8
        fetched = fourth_var / CACHE_DIR / "generators" / "team-advgan" / "1" / GENERATOR_FILE
        assert fetched.read_bytes() == store.get(f"registry/generators/team-advgan/1/{GENERATOR_FILE}")
    finally:
        stop(fourth)
    for var in (running.var, machines.worker_var, third_var, fourth_var):  # no registry on any disk
        assert not any((var / kind).exists() for kind in ("models", "generators", "datasets"))

    assert client.delete("/v1/models/team-cnn@1").status_code == 204
    assert client.get("/v1/models/team-cnn").status_code == 404
    assert "team-cnn" not in [m["name"] for m in client.get("/v1/models").json()["models"]]
    assert not store.exists("registry/models/team-cnn/1/card.json")
    assert store.list("registry/models/team-cnn") == ["registry/models/team-cnn/1.claim"]
