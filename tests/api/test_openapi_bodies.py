"""The OpenAPI document describes the bodies the routes really read (the attack route's JSON body
and multipart form, the model and data-set upload forms), and the documentation pages load every
asset from the service itself.

The document is checked as OpenAPI 3.1 (every ``$ref`` resolves) and against the routes: a body a
route accepts validates against its documented schema, and one the schema refuses the route refuses
too."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from fastapi.testclient import TestClient
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from redis import Redis
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from service.app import create_app
from service.settings import Settings
from tests.api.test_api import DATASET, PGD, assert_problem, png, queued

JSON, MULTIPART = "application/json", "multipart/form-data"
BASE = "urn:adversa:openapi"


@pytest.fixture
def document(settings: Settings) -> dict[str, Any]:
    return create_app(settings).openapi()


def content(document: dict[str, Any], path: str) -> dict[str, Any]:
    """The request body content (media type -> media type object) of ``POST path``."""
    body = document["paths"][path]["post"]["requestBody"]
    assert body["required"] is True
    return body["content"]  # type: ignore[no-any-return]


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` itself, or the component its ``$ref`` names."""
    ref = schema.get("$ref")
    if ref is None:
        return schema
    prefix = "#/components/schemas/"
    assert ref.startswith(prefix), ref
    return document["components"]["schemas"][ref.removeprefix(prefix)]  # type: ignore[no-any-return]


def validator(document: dict[str, Any], path: str, media_type: str) -> Draft202012Validator:
    """A JSON Schema validator for the body of ``POST path`` as ``media_type``, with the document's
    components resolvable (its ``$ref``s are relative to the document)."""
    registry: Registry[Any] = Registry().with_resource(
        BASE, Resource.from_contents(document, default_specification=DRAFT202012))
    pointer = "/".join(part.replace("~", "~0").replace("/", "~1")
                       for part in ("paths", path, "post", "requestBody", "content", media_type, "schema"))
    return Draft202012Validator({"$ref": f"{BASE}#/{pointer}"}, registry=registry)


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    validate(document)  # raises on a malformed operation or a $ref to nowhere


def test_the_attack_route_documents_its_json_body_and_its_multipart_form(document: dict[str, Any]) -> None:
    media = content(document, "/v1/attacks")
    assert set(media) == {JSON, MULTIPART}

    request = resolve(document, media[JSON]["schema"])
    assert set(request["required"]) == {"model", "attack", "inputs"}
    assert {"model", "attack", "inputs", "seed", "batch_size", "surrogate"} <= set(request["properties"])

    form = media[MULTIPART]["schema"]
    assert set(form["properties"]) == {"spec", "files", "labels"}
    assert set(form["required"]) == {"spec", "files"}
    assert form["properties"]["files"]["items"] == {"type": "string", "format": "binary"}
    assert form["properties"]["labels"]["contentMediaType"] == JSON
    assert form["properties"]["labels"]["contentSchema"]["items"]["type"] == "integer"
    assert media[MULTIPART]["encoding"]["spec"]["contentType"] == JSON
    spec = resolve(document, form["properties"]["spec"])
    assert set(spec["required"]) == {"model", "attack"}
    assert "inputs" not in spec["properties"]  # the files are the inputs
    assert spec["properties"]["attack"] == request["properties"]["attack"]


def test_the_upload_routes_document_their_forms(document: dict[str, Any]) -> None:
    media = content(document, "/v1/models")
    assert set(media) == {MULTIPART}
    form = media[MULTIPART]["schema"]
    assert set(form["properties"]) == {"card", "model", "weights"}
    assert form["required"] == ["card"]
    assert form["oneOf"] == [{"required": ["model"]}, {"required": ["weights"]}]
    assert form["properties"]["model"]["format"] == form["properties"]["weights"]["format"] == "binary"
    card = resolve(document, form["properties"]["card"])
    assert {"name", "input_shape", "classes", "bounds", "normalization", "architecture"} <= set(
        card["properties"])
    assert media[MULTIPART]["encoding"]["card"]["contentType"] == JSON

    media = content(document, "/v1/datasets")
    assert set(media) == {MULTIPART}
    form = media[MULTIPART]["schema"]
    assert set(form["properties"]) == {"spec", "data"} and set(form["required"]) == {"spec", "data"}
    assert form["properties"]["data"]["format"] == "binary"
    spec = resolve(document, form["properties"]["spec"])
    assert {"name", "classes", "description", "split", "layout"} <= set(spec["properties"])
    assert media[MULTIPART]["encoding"]["spec"]["contentType"] == JSON


def test_the_documented_attack_bodies_are_the_ones_the_route_reads(
    document: dict[str, Any], client: TestClient, redis: Redis
) -> None:
    body = {"model": "fmnist-cnn", "attack": PGD, "inputs": DATASET, "seed": 0}
    assert validator(document, "/v1/attacks", JSON).is_valid(body)
    assert client.post("/v1/attacks", json=body).status_code == 202

    without_inputs = {key: value for key, value in body.items() if key != "inputs"}
    assert not validator(document, "/v1/attacks", JSON).is_valid(without_inputs)
    assert_problem(client.post("/v1/attacks", json=without_inputs), 422, "inputs")

    form = validator(document, "/v1/attacks", MULTIPART)
    files = [("files", ("a.png", png(), "image/png")), ("files", ("b.png", png(), "image/png"))]
    assert form.is_valid({"spec": without_inputs, "files": ["a.png", "b.png"], "labels": "[1, 2]"})
    response = client.post("/v1/attacks", data={"spec": json.dumps(without_inputs), "labels": "[1, 2]"},
                           files=files)
    assert response.status_code == 202, response.text

    assert not form.is_valid({"spec": body, "files": ["a.png"]})
    assert_problem(client.post("/v1/attacks", data={"spec": json.dumps(body)}, files=files), 422, "spec.inputs")
    assert queued(redis) == 2


def test_the_documented_upload_spec_is_the_one_the_route_reads(
    document: dict[str, Any], client: TestClient
) -> None:
    form = validator(document, "/v1/datasets", MULTIPART)
    assert form.is_valid({"spec": {"name": "my-eval", "layout": "NHWC"}, "data": "eval.npz"})
    unknown = {"name": "my-eval", "colour": "blue"}
    assert not form.is_valid({"spec": unknown, "data": "eval.npz"})
    response = client.post("/v1/datasets", data={"spec": json.dumps(unknown)},
                           files={"data": ("eval.npz", b"not read", "application/octet-stream")})
    assert_problem(response, 422, "spec.colour")


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_pages_load_every_asset_from_the_service(client: TestClient, page: str) -> None:
    response = client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert response.headers["content-security-policy"].startswith("default-src 'self';")
    assert "//" not in re.sub(r"<!--.*?-->", "", response.text, flags=re.S)  # no other host, no CDN
    assets = re.findall(r'(?:src|href|spec-url)="([^"]+)"|url: \'([^\']+)\'', response.text)
    urls = {next(url for url in match if url) for match in assets}
    assert "/openapi.json" in urls and len(urls) >= 3, urls
    for url in urls:
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 0, url
