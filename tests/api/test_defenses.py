"""``POST /v1/defenses`` and detection-and-reject at the gateway (no worker: accepted jobs stay
queued; every refusal must leave the queue untouched)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from models.architectures import build
from models.manifest import CardIndex, Composition, DetectorCard, Lineage
from models.registry import publish, sha256_hex, weights_bytes, write_model
from service.settings import Settings
from tests.api.test_api import assert_oip_error, assert_problem

FGSM_AT = {"name": "fgsm-adversarial-training", "eps": 0.1, "epochs": 1, "limit": 500}


def queued(redis: Redis) -> int:
    return Queue("defenses", connection=redis, serializer=JSONSerializer).count


def defend(client: TestClient, **overrides: Any) -> Any:
    body: dict[str, Any] = {"model": "fmnist-cnn", "defense": FGSM_AT, "output": "mine", "seed": 0}
    body.update(overrides)
    return client.post("/v1/defenses", json={k: v for k, v in body.items() if v is not None})


def register_8x8(settings: Settings, name: str = "tiny-8x8") -> None:
    base = CardIndex.default().card("fmnist-cnn")
    assert base is not None
    weights = weights_bytes(build("linear", (1, 8, 8), 10))
    small = base.model_copy(update={"name": name, "architecture": "linear", "input_shape": (1, 8, 8),
                                    "sha256": sha256_hex(weights), "team": "public"})
    write_model(settings.models_root, small, weights)


def test_a_defense_is_queued_with_its_payload(client: TestClient, redis: Redis) -> None:
    response = defend(client)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["kind"] == "defense" and job["status"] == "queued" and job["model"] == "fmnist-cnn@1"
    assert queued(redis) == 1
    payload = Queue("defenses", connection=redis, serializer=JSONSerializer).jobs[0].args[0]
    assert payload["output"] == "mine" and payload["model"] == "fmnist-cnn@1"
    assert payload["team"] == "public" and payload["seed"] == 0
    assert payload["defense"]["alpha"] == 0.5  # the paper's default weight


@pytest.mark.parametrize("defense", [
    {"name": "pgd-adversarial-training"},
    {"name": "distillation", "temperature": 100},
    {"name": "preprocessing", "steps": [{"name": "jpeg", "quality": 75}, {"name": "bit-depth", "bits": 4},
                                        {"name": "median", "size": 2}, {"name": "gaussian-blur", "sigma": 1}]},
    {"name": "feature-squeezing"},
])
def test_every_defense_is_accepted_with_its_defaults(client: TestClient, redis: Redis,
                                                     defense: dict[str, Any]) -> None:
    output = None if defense["name"] == "feature-squeezing" else "mine"
    response = defend(client, defense=defense, output=output)
    assert response.status_code == 202, response.text
    assert queued(redis) == 1


def test_default_output_names(client: TestClient, redis: Redis) -> None:
    assert defend(client, output=None).status_code == 202
    payload = Queue("defenses", connection=redis, serializer=JSONSerializer).jobs[0].args[0]
    # fmnist-cnn-fgsm-at is a hosted model: the team's default name says whose it is.
    assert payload["output"] == "fmnist-cnn-fgsm-at-public"
    assert defend(client, output=None, defense={"name": "distillation", "temperature": 20},
                  model="fmnist-resnet18").status_code == 202
    payload = Queue("defenses", connection=redis, serializer=JSONSerializer).jobs[1].args[0]
    assert payload["output"] == "fmnist-resnet18-distilled"
    ensemble = client.post("/v1/defenses", json={"defense": {"name": "ensemble", "members": [
        "fmnist-cnn", "fmnist-resnet18"]}, "output": "pair"})
    assert ensemble.status_code == 202, ensemble.text
    payload = Queue("defenses", connection=redis, serializer=JSONSerializer).jobs[2].args[0]
    assert payload["model"] is None
    assert payload["defense"]["members"] == ["fmnist-cnn@1", "fmnist-resnet18@1"]


@pytest.mark.parametrize(("overrides", "status", "field"), [
    ({"model": "nope"}, 404, "model"),
    ({"model": None}, 422, "model"),
    ({"defense": {**FGSM_AT, "eps": -0.1}}, 422, "defense.fgsm-adversarial-training.eps"),
    ({"defense": {**FGSM_AT, "eps": 1.5}}, 422, "defense.eps"),
    ({"defense": {**FGSM_AT, "alpha": 1.5}}, 422, "defense.fgsm-adversarial-training.alpha"),
    ({"defense": {**FGSM_AT, "epochs": 0}}, 422, "defense.fgsm-adversarial-training.epochs"),
    ({"defense": {**FGSM_AT, "epochs": 51}}, 422, "defense.epochs"),
    ({"defense": {**FGSM_AT, "limit": 70_000}}, 422, "defense.limit"),
    ({"defense": {**FGSM_AT, "data": "mnist:train"}}, 422, "defense.data"),
    ({"defense": {**FGSM_AT, "colour": 1}}, 422, "defense.fgsm-adversarial-training.colour"),
    ({"defense": {"name": "distillation", "temperature": 0.5}}, 422, "defense.distillation.temperature"),
    ({"defense": {"name": "distillation", "temperature": 101}}, 422, "defense.distillation.temperature"),
    ({"defense": {"name": "pgd-adversarial-training", "steps": 0}}, 422,
     "defense.pgd-adversarial-training.steps"),
    ({"defense": {"name": "pgd-adversarial-training", "eps": 0.1, "step_size": 0.5}}, 422,
     "defense.step_size"),
    ({"defense": {"name": "preprocessing", "steps": []}}, 422, "defense.preprocessing.steps"),
    ({"defense": {"name": "preprocessing", "steps": [{"name": "bit-depth", "bits": 9}]}}, 422,
     "defense.preprocessing.steps[0].bit-depth.bits"),
    ({"defense": {"name": "preprocessing", "steps": [{"name": "gaussian-blur", "kernel_size": 4}]}}, 422,
     "defense.preprocessing.steps[0].gaussian-blur"),
    ({"defense": {"name": "preprocessing", "steps": [{"name": "sharpen"}]}}, 422,
     "defense.preprocessing.steps[0]"),
    ({"defense": {"name": "ensemble", "members": ["fmnist-cnn", "fmnist-resnet18"]}}, 422, "model"),
    ({"defense": {"name": "feature-squeezing"}}, 422, "output"),
    ({"defense": {"name": "feature-squeezing", "fpr": 0}, "output": None}, 422,
     "defense.feature-squeezing.fpr"),
    ({"defense": {"name": "feature-squeezing", "calibration": {"dataset": "fashion-mnist:test",
                                                                "offset": 9999, "limit": 10}},
      "output": None}, 422, "defense.calibration.limit"),
    ({"defense": {"name": "fancy"}}, 422, "defense"),
    ({"output": "Not A Name"}, 422, "output"),
    ({"output": "fmnist-resnet18"}, 409, "output"),
    ({"evaluation": {"robust_limit": 20_000}}, 422, "evaluation.robust_limit"),
    ({"evaluation": {"steps": 5000}}, 422, "evaluation.steps"),
    ({"seed": -1}, 422, "seed"),
])
def test_bad_defense_requests(client: TestClient, redis: Redis, overrides: dict[str, Any], status: int,
                              field: str) -> None:
    body = {"model": "fmnist-cnn", "defense": FGSM_AT, "output": "mine", "seed": 0}
    body.update(overrides)
    response = client.post("/v1/defenses", json={k: v for k, v in body.items()
                                                 if v is not None or k == "seed"})
    assert_problem(response, status, field)
    assert queued(redis) == 0


def test_compositions_and_detectors_need_compatible_models(client: TestClient, redis: Redis,
                                                           settings: Settings) -> None:
    register_8x8(settings)
    body = assert_problem(client.post("/v1/defenses", json={
        "defense": {"name": "ensemble", "members": ["fmnist-cnn", "tiny-8x8"]}, "output": "pair"}),
        422, "defense.members[1]")
    assert "input_shape" in body["detail"]
    assert_problem(client.post("/v1/defenses", json={
        "defense": {"name": "ensemble", "members": ["fmnist-cnn", "nope"]}, "output": "pair"}),
        404, "defense.members[1]")
    assert_problem(client.post("/v1/defenses", json={
        "defense": {"name": "ensemble", "members": ["fmnist-cnn", "fmnist-cnn@1"]}, "output": "pair"}),
        422, "defense.members")
    # A detector calibrated on Fashion-MNIST cannot guard a model with 8x8 inputs.
    assert_problem(defend(client, model="tiny-8x8", defense={"name": "feature-squeezing"}, output=None),
                   422, "defense.calibration.dataset")
    assert_problem(defend(client, model="tiny-8x8", defense=FGSM_AT), 422, "defense.data.dataset")
    # A 5x5 window is fine on 28x28 and too big for nothing; 8x8 inputs refuse a blur wider than them.
    assert_problem(defend(client, model="tiny-8x8", defense={
        "name": "preprocessing", "steps": [{"name": "gaussian-blur", "sigma": 1, "kernel_size": 9}]}),
        422, "defense.steps")
    # Compositions have no weights to train.
    base = CardIndex.default().card("fmnist-cnn")
    assert base is not None
    wrapped = base.model_copy(update={
        "name": "wrapped", "architecture": "preprocessing", "sha256": None, "team": "public",
        "composition": Composition(kind="preprocessing", base=base.ref,
                                   steps=({"name": "bit-depth", "bits": 4},), differentiable=False)})
    publish(settings.models_root, wrapped, None)
    body = assert_problem(defend(client, model="wrapped"), 422, "model")
    assert "composition" in body["detail"]
    assert queued(redis) == 0


def test_defense_idempotency_key(client: TestClient, redis: Redis) -> None:
    headers = {"Idempotency-Key": "release-7"}
    first = client.post("/v1/defenses", json={"model": "fmnist-cnn", "defense": FGSM_AT, "output": "m"},
                        headers=headers)
    second = client.post("/v1/defenses", json={"model": "fmnist-cnn", "defense": FGSM_AT, "output": "m"},
                         headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert second.headers.get("idempotent-replayed") == "true"
    assert queued(redis) == 1
    other = client.post("/v1/defenses", json={"model": "fmnist-cnn", "defense": FGSM_AT, "output": "n"},
                        headers=headers)
    assert_problem(other, 409, "Idempotency-Key")
    assert queued(redis) == 1


def test_reject_needs_a_detector(client: TestClient, redis: Redis, settings: Settings) -> None:
    tensor = {"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}
    error = assert_oip_error(client.post("/v2/models/fmnist-resnet18/infer", json={
        "inputs": [tensor], "parameters": {"reject": True}}), 409, "parameters.reject")
    assert "/v1/defenses" in error and "feature-squeezing" in error
    assert Queue("predict", connection=redis, serializer=JSONSerializer).count == 0
    # A team's own calibration makes the model usable in reject mode (the job would wait for a
    # worker: with none running the gateway answers 504 after its timeout, not 409).
    card = CardIndex.default().card("fmnist-resnet18")
    assert card is not None
    detector = DetectorCard(model=card.ref, team="public", squeezers=(({"name": "bit-depth", "bits": 2},),),
                            threshold=0.5, fpr=0.05, lineage=Lineage(recipe="feature-squeezing",
                                                                     data="-", seed=0, created="-"))
    index = CardIndex.default([settings.models_root])
    detector.write(index.detector_paths(card, "public")[1])
    assert index.detector(card, "public") == detector
    assert index.detector(card, "other-team") is None


def test_openapi_documents_the_defenses(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert "/v1/defenses" in schema["paths"]
    names = set(schema["components"]["schemas"])
    for model in ("DefenseRequest", "FGSMTrainingParams", "PGDTrainingParams", "DistillationParams",
                  "PreprocessingParams", "EnsembleParams", "FeatureSqueezingParams"):
        assert model in names, model


def test_defaults_are_the_models_own_data(client: TestClient, redis: Redis) -> None:
    """skimage-cnn was trained on skimage-patches: a defense that names no data trains and measures
    on that set's splits, not on grey Fashion-MNIST (the hosted grey models keep theirs)."""
    pgd = {"name": "pgd-adversarial-training", "epochs": 1, "limit": 500}
    assert defend(client, model="skimage-cnn", defense=pgd).status_code == 202
    assert defend(client, model="skimage-cnn", defense={"name": "feature-squeezing"}, output=None
                  ).status_code == 202
    assert defend(client, model="fmnist-cnn", defense={"name": "feature-squeezing"}, output=None
                  ).status_code == 202
    trained, squeezed, grey = (job.args[0] for job in
                               Queue("defenses", connection=redis, serializer=JSONSerializer).jobs)
    assert trained["defense"]["data"] == "skimage-patches:train"
    assert trained["evaluation"]["data"] == "skimage-patches:test"
    # Feature squeezing's slices split the test set as they split Fashion-MNIST's 10000 images.
    parts = ("attack_inputs", "calibration", "held_out")
    slices = {what: (squeezed["defense"][what]["dataset"], squeezed["defense"][what]["offset"],
                     squeezed["defense"][what]["limit"]) for what in parts}
    assert slices == {"attack_inputs": ("skimage-patches:test", 0, 500),
                      "calibration": ("skimage-patches:test", 600, 300),
                      "held_out": ("skimage-patches:test", 900, 300)}
    assert [(grey["defense"][what]["offset"], grey["defense"][what]["limit"])
            for what in ("attack_inputs", "calibration", "held_out")] == [(0, 500), (5000, 2500), (7500, 2500)]
    assert grey["defense"]["calibration"]["dataset"] == "fashion-mnist:test"
    # What the caller names wins over the model's own data.
    named = defend(client, model="skimage-cnn", defense={**pgd, "data": "skimage-patches:test"},
                   evaluation={"data": "skimage-patches:train", "clean_limit": 100, "robust_limit": 10})
    assert named.status_code == 202, named.text
    payload = Queue("defenses", connection=redis, serializer=JSONSerializer).jobs[3].args[0]
    assert payload["defense"]["data"] == "skimage-patches:test"
    assert payload["evaluation"]["data"] == "skimage-patches:train"


def test_an_uploaded_model_must_name_its_data(client: TestClient, redis: Redis, settings: Settings) -> None:
    """An uploaded model names no training data: no silent Fashion-MNIST default, a 422 that says what
    to name."""
    base = CardIndex.default().card("skimage-cnn")
    assert base is not None
    weights = weights_bytes(build("small-cnn", (3, 32, 32), 8))
    uploaded = base.model_copy(update={
        "name": "their-net", "team": "public", "sha256": sha256_hex(weights),
        "lineage": Lineage(recipe="upload", data="-", seed=0, created="2026-12-04T00:00:00Z")})
    write_model(settings.models_root, uploaded, weights)
    body = assert_problem(defend(client, model="their-net"), 422, "defense.data")
    assert "names no data set" in body["detail"] and "POST /v1/datasets" in body["detail"]
    assert_problem(defend(client, model="their-net", defense={"name": "feature-squeezing"}, output=None),
                   422, "defense.calibration")
    with_data = {**FGSM_AT, "data": "skimage-patches:train"}
    assert_problem(defend(client, model="their-net", defense=with_data), 422, "evaluation.data")
    assert queued(redis) == 0
    named = defend(client, model="their-net", defense=with_data, evaluation={"data": "skimage-patches:test"})
    assert named.status_code == 202, named.text
