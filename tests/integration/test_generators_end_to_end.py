"""AdvGAN end to end: HTTP -> Redis -> a real worker -> the generator registry -> the ``advgan``
attack. Generators train on 256 images for one epoch and are measured on 64 held-out ones: their
success rates mean nothing here, only that every number is produced, bounded and counted."""

from __future__ import annotations

import io
from typing import Any

import httpx
import numpy as np

from models.datasets import load_split
from tests.integration.conftest import submit, wait, wait_for_training

TINY = {"epochs": 1, "limit": 256, "batch_size": 64, "eps": 0.2, "seed": 0,
        "evaluation": {"dataset": "fashion-mnist:test", "offset": 0, "limit": 64}}


def train(client: httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/attacks/generators", json={"model": "fmnist-cnn", **TINY, **body})
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
    job = wait(client, response.json()["id"])
    assert job["status"] == "succeeded" and job["kind"] == "generator", job
    return job  # type: ignore[no-any-return]


def test_train_both_modes_then_attack_with_the_generators(service: httpx.Client) -> None:
    job = train(service, output="e2e-advgan")
    assert job["result"]["generator"] == "e2e-advgan@1"
    card = service.get("/v1/attacks/generators/e2e-advgan").json()
    assert card["version"] == 1 and card["team"] == "public" and card["mode"] == "semi-white-box"
    assert card["target_model"] == "fmnist-cnn@1" and card["eps"] == 0.2 and card["targeted"] is False
    lineage = card["lineage"]
    assert lineage["base_model"] == "fmnist-cnn@1" and lineage["recipe"] == "advgan" and lineage["seed"] == 0
    assert lineage["parameters"]["limit"] == 256 and lineage["parameters"]["training"]["steps"] == 4
    assert abs(lineage["parameters"]["hinge_bound"] - 0.2 * np.sqrt(78.4)) < 1e-9
    metrics = card["metrics"]
    assert metrics["evaluated"] == 64 and 0.5 < metrics["clean_accuracy"] <= 1
    assert 0 <= metrics["success_rate"] <= 1 and "queries" not in metrics
    if metrics["success_rate"] > 0:
        assert 0 < metrics["linf_mean"] <= 0.2 + 1e-6 and metrics["l2_mean"] > 0

    black = train(service, output="e2e-advgan", mode="black-box")
    assert black["result"]["generator"] == "e2e-advgan@2"
    card = service.get("/v1/attacks/generators/e2e-advgan").json()
    assert card["mode"] == "black-box" and card["versions"] == [1, 2]
    # One pass over the 256 clean images, then every perturbed batch of the epoch.
    assert card["metrics"]["queries"] == 2 * 256
    assert card["lineage"]["parameters"]["surrogate"] == "small-cnn"

    targeted = train(service, output="e2e-advgan-t0", targeted=True, target_class=0)
    assert targeted["result"]["target_class"] == 0
    listing = service.get("/v1/attacks/generators").json()["generators"]
    assert {g["name"]: g["version"] for g in listing} == {"e2e-advgan": 2, "e2e-advgan-t0": 1}

    # The semi-white-box generator as an attack, next to any other attack's scores and artifacts.
    attack_id = submit(service, {"model": "fmnist-cnn",
                                 "attack": {"name": "advgan", "generator": "e2e-advgan@1"},
                                 "inputs": {"dataset": "fashion-mnist:test", "offset": 100, "limit": 32},
                                 "seed": 0})
    job = wait(service, attack_id)
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert result["generator"]["generator"] == "e2e-advgan@1" and result["generator"]["eps"] == 0.2
    scores = result["scores"]
    assert scores["n"] == 32 and scores["gradient_calls"] == 0 and 1 <= scores["queries"] <= 2
    assert 0 <= scores["success_rate"] <= 1 and "quantized" in scores
    assert set(result["artifacts"]) == {"adversarial.npy", "grid.png", "samples.csv"}
    adversarial = np.load(io.BytesIO(service.get(f"/v1/jobs/{attack_id}/artifacts/adversarial.npy").content))
    clean, _ = load_split("fashion-mnist:test").slice(100, 32)
    assert adversarial.shape == (32, 1, 28, 28)
    assert np.abs(adversarial - clean).max() <= 0.2 + 1e-6 and adversarial.min() >= 0 and adversarial.max() <= 1
    assert np.abs(adversarial - clean).max() > 0.05  # the generator did perturb

    # The targeted generator aims every input at its class.
    job = wait(service, submit(service, {"model": "fmnist-cnn", "attack": {"name": "advgan",
                                                                             "generator": "e2e-advgan-t0"},
                                         "inputs": {"dataset": "fashion-mnist:test", "limit": 16}}))
    assert job["status"] == "succeeded", job
    rows = service.get(f"/v1/jobs/{job['id']}/artifacts/samples.csv").text.strip().splitlines()
    header = rows[0].split(",")
    assert len(rows) == 17 and {row.split(",")[header.index("target")] for row in rows[1:]} == {"0"}


def test_cancel_training_and_an_attack_whose_generator_was_deleted(service: httpx.Client) -> None:
    train(service, output="e2e-doomed")
    response = service.post("/v1/attacks/generators", json={
        "model": "fmnist-cnn", "output": "e2e-canceled", "epochs": 5, "limit": 20000, "batch_size": 32})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    job = wait_for_training(service, job_id)
    stage = job["stage"]
    assert stage["phase"] == "train" and stage["epoch"] == 1 and stage["epochs"] == 5
    assert stage["batches"] == 625 and stage["batch"] >= 10
    assert stage["queries"] == 32 * stage["batch"] and 0 <= stage["success"] <= 1
    assert stage["loss_d"] > 0 and isinstance(stage["loss_g"], float)
    # While the worker trains, an attack is queued with a generator that is then deleted.
    attack_id = submit(service, {"model": "fmnist-cnn", "attack": {"name": "advgan", "generator": "e2e-doomed"},
                                 "inputs": {"dataset": "fashion-mnist:test", "limit": 8}})
    assert service.delete("/v1/attacks/generators/e2e-doomed@1").status_code == 204

    assert service.delete(f"/v1/jobs/{job_id}").status_code == 202
    job = wait(service, job_id)
    assert job["status"] == "canceled" and job["progress"] < 0.5, job
    assert service.get("/v1/attacks/generators/e2e-canceled").status_code == 404
    attack = wait(service, attack_id)
    assert attack["status"] == "failed" and attack["error"]["code"] == "unknown-generator", attack
    assert "e2e-doomed@1" in attack["error"]["message"]
