"""AdvGAN at the gateway: ``POST /v1/attacks/generators`` (training jobs), the generator registry's
routes, and the ``advgan`` attack. No worker runs: accepted jobs stay queued, and every refusal
must leave the queues untouched."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from models.manifest import CardIndex, Composition
from models.registry import publish
from service.app import create_app
from service.settings import Settings
from tests.api.test_api import assert_problem, npy_b64
from tests.api.test_defenses import register_8x8
from tests.unit.test_generator_registry import store_generator

DATASET = {"dataset": "fashion-mnist:test", "offset": 0, "limit": 8}


def queued(redis: Redis, queue: str = "defenses") -> int:
    return Queue(queue, connection=redis, serializer=JSONSerializer).count


def payloads(redis: Redis, queue: str = "defenses") -> list[dict[str, Any]]:
    return [job.args[0] for job in Queue(queue, connection=redis, serializer=JSONSerializer).jobs]


def train(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/attacks/generators", json={"model": "fmnist-cnn", **body})


def test_training_is_queued_with_the_defaults(client: TestClient, redis: Redis, settings: Settings) -> None:
    response = train(client, seed=3)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["kind"] == "generator" and job["status"] == "queued" and job["model"] == "fmnist-cnn@1"
    rq_job = Queue("defenses", connection=redis, serializer=JSONSerializer).jobs[0]
    assert rq_job.func_name == "workers.generator_jobs.run_generator"
    assert rq_job.timeout == settings.defense_timeout_s
    payload = rq_job.args[0]
    assert payload["model"] == "fmnist-cnn@1" and payload["output"] == "fmnist-cnn-advgan"
    assert payload["team"] == "public" and payload["seed"] == 3 and payload["job_id"] == job["id"]
    assert payload["eps"] == 0.3 and payload["mode"] == "semi-white-box" and payload["targeted"] is False
    assert payload["target_class"] is None and payload["hinge_bound"] is None
    assert payload["data"] == "fashion-mnist:train" and payload["epochs"] == 10
    assert payload["evaluation"] == {"dataset": "fashion-mnist:test", "offset": 0, "limit": 1000}
    # Without a seed the gateway picks one and the payload carries it.
    second = train(client, mode="black-box", targeted=True, target_class=0, eps=0.2, output="mine")
    assert second.status_code == 202, second.text
    payload = payloads(redis)[1]
    assert isinstance(payload["seed"], int) and payload["output"] == "mine"
    assert payload["mode"] == "black-box" and payload["target_class"] == 0
    assert queued(redis) == 2 and queued(redis, "attacks") == 0


BAD_TRAINING: list[tuple[str, dict[str, Any], int, str]] = [
    ("unknown model", {"model": "nope"}, 404, "model"),
    ("no model", {"model": None}, 422, "model"),
    ("zero eps", {"eps": 0}, 422, "eps"),
    ("negative eps", {"eps": -0.1}, 422, "eps"),
    ("eps above the range", {"eps": 1.5}, 422, "eps"),
    ("targeted without a class", {"targeted": True}, 422, "target_class"),
    ("a class without targeted", {"target_class": 3}, 422, "targeted"),
    ("class out of range", {"targeted": True, "target_class": 10}, 422, "target_class"),
    ("negative class", {"targeted": True, "target_class": -1}, 422, "target_class"),
    ("too many epochs", {"epochs": 51}, 422, "epochs"),
    ("zero epochs", {"epochs": 0}, 422, "epochs"),
    ("negative weight", {"adv_weight": -1}, 422, "adv_weight"),
    ("negative kappa", {"kappa": -1}, 422, "kappa"),
    ("zero lr", {"lr": 0}, 422, "lr"),
    ("unknown mode", {"mode": "white-box"}, 422, "mode"),
    ("unknown data set", {"data": "mnist:train"}, 422, "data"),
    ("limit past the data", {"limit": 70_000}, 422, "limit"),
    ("evaluation past the data", {"evaluation": {"dataset": "fashion-mnist:test", "offset": 9990,
                                                 "limit": 20}}, 422, "evaluation.limit"),
    ("evaluation too large", {"evaluation": {"dataset": "fashion-mnist:train", "limit": 20_000}}, 413,
     "evaluation.limit"),
    ("bad output name", {"output": "Not A Name"}, 422, "output"),
    ("unknown parameter", {"epsilon": 0.1}, 422, "epsilon"),
    ("negative seed", {"seed": -1}, 422, "seed"),
]


@pytest.mark.parametrize("case", BAD_TRAINING, ids=[c[0] for c in BAD_TRAINING])
def test_bad_training_requests(client: TestClient, redis: Redis, case: tuple[str, dict[str, Any], int, str]
                               ) -> None:
    _, overrides, status, field = case
    body = {"model": "fmnist-cnn", "epochs": 1, "limit": 256, **overrides}
    response = client.post("/v1/attacks/generators", json={k: v for k, v in body.items() if v is not None})
    assert_problem(response, status, field)
    assert queued(redis) == 0


def test_training_needs_data_that_fits_the_model(client: TestClient, redis: Redis, settings: Settings) -> None:
    register_8x8(settings)
    body = assert_problem(train(client, model="tiny-8x8"), 422, "data.dataset")
    assert "(1, 28, 28)" in body["detail"]
    # A composition without usable gradients can only be attacked black-box.
    base = CardIndex.default().card("fmnist-cnn")
    assert base is not None
    publish(settings.models_root, base.model_copy(update={
        "name": "squeezed", "architecture": "preprocessing", "sha256": None, "team": "public",
        "composition": Composition(kind="preprocessing", base=base.ref,
                                   steps=({"name": "bit-depth", "bits": 4},), differentiable=False)}), None)
    assert_problem(train(client, model="squeezed"), 422, "mode")
    assert queued(redis) == 0
    assert train(client, model="squeezed", mode="black-box").status_code == 202
    assert queued(redis) == 1


def test_output_names_and_other_teams(settings: Settings, redis: Redis) -> None:
    store_generator(settings.generators_root, name="fmnist-cnn-advgan", team="team-b")
    keyed = settings.model_copy(update={"api_keys": {"key-a": "team-a", "key-b": "team-b"}})
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    with TestClient(create_app(keyed), raise_server_exceptions=False) as client:
        assert_problem(client.post("/v1/attacks/generators", json={"model": "fmnist-cnn"}), 401)
        # Team b's name is taken: team a's default says whose it is, an explicit one is refused.
        assert client.post("/v1/attacks/generators", json={"model": "fmnist-cnn"}, headers=a).status_code == 202
        assert payloads(redis)[0]["output"] == "fmnist-cnn-advgan-team-a"
        assert_problem(client.post("/v1/attacks/generators", json={
            "model": "fmnist-cnn", "output": "fmnist-cnn-advgan"}, headers=a), 409, "output")
        # Team b's own name is a new version of its generator.
        assert client.post("/v1/attacks/generators", json={"model": "fmnist-cnn"}, headers=b).status_code == 202
        assert payloads(redis)[1]["output"] == "fmnist-cnn-advgan" and payloads(redis)[1]["team"] == "team-b"
        assert queued(redis) == 2


def test_listing_cards_and_deleting_per_team(settings: Settings, redis: Redis) -> None:
    root = settings.generators_root
    store_generator(root, name="mine", team="team-a", metrics={"success_rate": 0.9})
    store_generator(root, name="mine", team="team-a", seed=1, targeted=True, target_class=2)
    store_generator(root, name="theirs", team="team-b")
    keyed = settings.model_copy(update={"api_keys": {"key-a": "team-a", "key-b": "team-b"}})
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    with TestClient(create_app(keyed), raise_server_exceptions=False) as client:
        listing = client.get("/v1/attacks/generators", headers=a).json()["generators"]
        assert [(g["name"], g["version"], g["versions"]) for g in listing] == [("mine", 2, [1, 2])]
        assert listing[0]["targeted"] is True and listing[0]["target_class"] == 2
        assert [g["name"] for g in client.get("/v1/attacks/generators", headers=b).json()["generators"]] == [
            "theirs"]
        card = client.get("/v1/attacks/generators/mine@1", headers=a).json()
        assert card["target_model"] == "fmnist-cnn@1" and card["eps"] == 0.2 and card["versions"] == [1, 2]
        assert card["metrics"] == {"success_rate": 0.9} and card["lineage"]["recipe"] == "advgan"
        assert_problem(client.get("/v1/attacks/generators/mine", headers=b), 404, "generator")
        assert_problem(client.get("/v1/attacks/generators/nope", headers=a), 404, "generator")

        assert_problem(client.delete("/v1/attacks/generators/mine@1", headers=b), 404, "generator")
        assert_problem(client.delete("/v1/attacks/generators/mine", headers=a), 422, "generator")
        assert_problem(client.delete("/v1/attacks/generators/mine@x", headers=a), 422, "generator")
        assert client.delete("/v1/attacks/generators/mine@2", headers=a).status_code == 204
        assert_problem(client.delete("/v1/attacks/generators/mine@2", headers=a), 404, "generator")
        assert client.get("/v1/attacks/generators/mine", headers=a).json()["version"] == 1
        assert client.get("/v1/attacks/generators/theirs", headers=b).status_code == 200
    # A hosted generator (no team) is visible to all and deletable by none.
    store_generator(root, name="shared", team=None)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert client.get("/v1/attacks/generators/shared").status_code == 200
        assert_problem(client.delete("/v1/attacks/generators/shared@1"), 403, "generator")


def attack(client: TestClient, **overrides: Any) -> Any:
    body: dict[str, Any] = {"model": "fmnist-cnn", "attack": {"name": "advgan", "generator": "gen"},
                            "inputs": DATASET, "seed": 0}
    body.update(overrides)
    return client.post("/v1/attacks", json=body)


def test_the_advgan_attack_runs_a_pinned_generator_version(client: TestClient, redis: Redis,
                                                            settings: Settings) -> None:
    store_generator(settings.generators_root)
    store_generator(settings.generators_root, seed=1)
    response = attack(client)
    assert response.status_code == 202, response.text
    assert queued(redis, "attacks") == 1
    # The job runs the version the gateway saw, even if a newer one is published before it starts.
    assert payloads(redis, "attacks")[0]["attack"] == {"name": "advgan", "generator": "gen@2"}
    assert attack(client, attack={"name": "advgan", "generator": "gen@1"}).status_code == 202
    assert payloads(redis, "attacks")[1]["attack"]["generator"] == "gen@1"
    # A generator trained on fmnist-cnn attacks any model with the same inputs and classes (transfer).
    assert attack(client, model="fmnist-resnet18").status_code == 202
    assert queued(redis, "attacks") == 3


def test_bad_advgan_attacks(client: TestClient, redis: Redis, settings: Settings) -> None:
    root = settings.generators_root
    store_generator(root)
    store_generator(root, name="small", input_shape=(1, 8, 8))
    store_generator(root, name="other-team", team="someone-else")
    register_8x8(settings)
    assert_problem(attack(client, attack={"name": "advgan", "generator": "never-trained"}), 404,
                   "attack.generator")
    assert_problem(attack(client, attack={"name": "advgan", "generator": "gen@5"}), 404, "attack.generator")
    assert_problem(attack(client, attack={"name": "advgan", "generator": "other-team"}), 404,
                   "attack.generator")
    body = assert_problem(attack(client, attack={"name": "advgan", "generator": "small"}), 422,
                          "attack.generator")
    assert "input_shape" in body["detail"]
    # A model whose inputs differ from the generator's target (8x8 array inputs for tiny-8x8).
    array = npy_b64(np.zeros((2, 1, 8, 8), dtype=np.float32))
    assert_problem(attack(client, model="tiny-8x8", inputs={"array": array}), 422, "attack.generator")
    assert_problem(attack(client, attack={"name": "advgan"}), 422, "attack.generator")
    assert_problem(attack(client, attack={"name": "advgan", "generator": "gen", "eps": 0.1}), 422,
                   "attack.eps")
    assert_problem(attack(client, surrogate="fmnist-resnet18"), 422, "surrogate")
    # Deleted: refused like one never trained.
    assert client.delete("/v1/attacks/generators/gen@1").status_code == 204
    assert_problem(attack(client), 404, "attack.generator")
    assert queued(redis, "attacks") == 0


def test_generator_training_idempotency_key(client: TestClient, redis: Redis) -> None:
    headers = {"Idempotency-Key": "nightly-advgan"}
    first = client.post("/v1/attacks/generators", json={"model": "fmnist-cnn", "seed": 1}, headers=headers)
    again = client.post("/v1/attacks/generators", json={"model": "fmnist-cnn", "seed": 1}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"] and again.headers.get("idempotent-replayed") == "true"
    assert_problem(client.post("/v1/attacks/generators", json={"model": "fmnist-cnn", "seed": 2},
                               headers=headers), 409, "Idempotency-Key")
    assert queued(redis) == 1


def test_cancel_a_queued_training_job(client: TestClient, redis: Redis) -> None:
    job_id = train(client).json()["id"]
    canceled = client.delete(f"/v1/jobs/{job_id}")
    assert canceled.status_code == 202 and canceled.json()["status"] == "canceled"
    assert queued(redis) == 0


def test_openapi_documents_the_generators(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert {"post", "get"} <= set(paths["/v1/attacks/generators"])
    assert {"get", "delete"} <= set(paths["/v1/attacks/generators/{ref}"])
    components = schema["components"]["schemas"]
    assert "GeneratorRequest" in components and "AdvGANParams" in components
    properties = components["GeneratorRequest"]["properties"]
    for name in ("model", "eps", "targeted", "target_class", "adv_weight", "gan_weight", "hinge_weight",
                 "hinge_bound", "kappa", "epochs", "batch_size", "lr", "data", "limit", "mode", "output",
                 "seed", "evaluation"):
        assert name in properties, name
    union = components["AttackRequest"]["properties"]["attack"]["oneOf"]
    assert {"$ref": "#/components/schemas/AdvGANParams"} in union


def test_training_defaults_to_the_targets_own_data(client: TestClient, redis: Redis) -> None:
    """skimage-cnn was trained on skimage-patches: its generator trains and is measured there."""
    assert train(client, model="skimage-cnn", eps=0.05).status_code == 202
    payload = payloads(redis)[0]
    assert payload["data"] == "skimage-patches:train"
    assert payload["evaluation"] == {"dataset": "skimage-patches:test", "offset": 0, "limit": 1000}
