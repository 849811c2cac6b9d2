"""Open Inference Protocol v2 (KServe, Triton): server and model metadata, liveness and readiness,
and the protocol's ``{"error": "..."}`` body on every ``/v2`` route.

Inference itself is ``service/routes/infer.py``. A hosted or registered model is one OIP model: its
input is ``FP32 [-1, C, H, W]`` in the card's bounds (``UINT8`` NHWC pixels are accepted too), its
outputs are ``label``, ``probabilities`` and ``logits`` (and the detector's outputs when it has one).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import APIRouter, Request
from rq.worker import Worker
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.manifest import CardIndex, ModelCard
from service.deps import QueueDep, RegistryDep, TeamDep, visible_card
from service.errors import PROBLEM, Problem
from service.queueing import Queues

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v2", tags=["inference"])
EXTENSIONS = ["binary_tensor_data", "parameters"]
PLATFORM = "pytorch"
INPUT_NAME = "input"
REJECT_OUTPUTS = ("detector_score", "threshold", "rejected")


def is_oip(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


class OIPErrors:
    """On ``/v2`` paths, turn the gateway's problem+json answers (whoever raised them: a route, the
    router's 404/405, the body limit, the central Redis 503) into the protocol's
    ``{"error": "<detail>"}`` as ``application/json``, keeping status and headers. Tritonclient and
    KServe's client read only that key."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_oip(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        held: Message | None = None
        chunks: list[bytes] = []
        started = False

        async def rewrite(message: Message) -> None:
            nonlocal held, started
            if message["type"] == "http.response.start":
                started = True
                if MutableHeaders(raw=message["headers"]).get("content-type", "").startswith(PROBLEM):
                    held = message
                    return
            elif message["type"] == "http.response.body" and held is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                await _send_error(send, held, _detail(b"".join(chunks)))
                return
            await send(message)

        try:
            await self.app(scope, receive, rewrite)
        except Exception:
            log.exception("unhandled error on %s", scope.get("path"))
            if started:
                raise
            start = {"type": "http.response.start", "status": 500, "headers": []}
            await _send_error(send, start, "internal error; the server log has the details")


class BinaryBodies:
    """A ``/v2`` request with ``Inference-Header-Content-Length`` carries raw tensor bytes after its
    JSON (tritonclient sends it with no Content-Type): label it ``application/octet-stream`` so that
    the gateway's JSON guards leave the bytes alone; the infer route checks the JSON part itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_oip(scope.get("path", "")):
            headers = MutableHeaders(scope=scope)
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if "inference-header-content-length" in headers and (not media or media.endswith("json")):
                headers["content-type"] = "application/octet-stream"
        await self.app(scope, receive, send)


def _detail(body: bytes) -> str:
    try:
        problem = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")
    detail = str(problem.get("detail") or problem.get("title") or "error")
    field = problem.get("field")
    # the protocol's body has no field member: the message names it
    return detail if not field or detail.startswith(field) else f"{field}: {detail}"


async def _send_error(send: Send, start: Message, detail: str) -> None:
    body = json.dumps({"error": detail}).encode()
    headers = MutableHeaders(raw=list(start["headers"]))
    headers["content-type"] = "application/json"
    headers["content-length"] = str(len(body))
    await send({**start, "headers": headers.raw})
    await send({"type": "http.response.body", "body": body})


def model_card(index: CardIndex, name: str, version: str | None, team: str) -> ModelCard:
    """The card of ``name`` (latest version) or ``name`` at ``version``, if this team may use it."""
    if version is not None and not (version.isdigit() and int(version) >= 1):
        raise Problem(404, f"version: expected a positive integer, got {version!r}", field="version",
                      code="unknown-model")
    if version is None:
        return visible_card(index, name, team)
    latest = visible_card(index, name, team)
    card = index.card(f"{name}@{version}")
    if card is None or not card.visible_to(team):
        versions = [str(v) for v in index.versions(name)]
        raise Problem(404, f"version: expected one of {', '.join(versions)} for {latest.name}, got {version}",
                      field="version", code="unknown-model")
    return card


def predict_workers(queues: Queues) -> int:
    """Workers alive that listen on the prediction queue."""
    name = queues.settings.queue_name("predict")
    return sum(1 for w in Worker.all(connection=queues.redis) if name in w.queue_names())


def _ready(queues: Queues) -> None:
    """Redis down raises RedisError: the central handler answers 503."""
    if predict_workers(queues) == 0:
        raise Problem(503, "no worker serves predictions; start one with `adversa worker`",
                      code="not-ready")


def tensor_spec(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}


def output_specs(card: ModelCard, detector: bool) -> list[dict[str, Any]]:
    """The outputs ``infer`` can return for ``card`` (the detector's only with one)."""
    k = card.num_classes
    specs = [tensor_spec("label", "INT64", [-1]), tensor_spec("probabilities", "FP32", [-1, k]),
             tensor_spec("logits", "FP32", [-1, k])]
    if detector:
        specs += [tensor_spec("detector_score", "FP32", [-1]), tensor_spec("threshold", "FP32", [-1]),
                  tensor_spec("rejected", "BOOL", [-1])]
    return specs


@router.get("")
def server_metadata(request: Request) -> dict[str, Any]:
    """Server metadata: name, version and the protocol extensions supported."""
    return {"name": "adversa", "version": request.app.version, "extensions": EXTENSIONS}


@router.get("/health/live")
def live() -> dict[str, bool]:
    """The process answers."""
    return {"live": True}


@router.get("/health/ready")
def ready(queues: QueueDep) -> dict[str, bool]:
    """Redis reachable and a worker serving predictions; else 503."""
    _ready(queues)
    return {"ready": True}


def _metadata(index: CardIndex, card: ModelCard, team: str) -> dict[str, Any]:
    c, h, w = card.input_shape
    versions = [str(v) for v in index.versions(card.name)
                if (other := index.card(f"{card.name}@{v}")) is not None and other.visible_to(team)]
    return {
        "name": card.name,
        "versions": versions,
        "platform": PLATFORM,
        "inputs": [tensor_spec(INPUT_NAME, "FP32", [-1, c, h, w])],
        "outputs": output_specs(card, index.detector(card, team) is not None),
    }


def _model_ready(queues: Queues, index: CardIndex, name: str, version: str | None,
                 team: str) -> dict[str, Any]:
    card = model_card(index, name, version, team)
    _ready(queues)
    return {"name": card.name, "version": str(card.version), "ready": True}


@router.get("/models/{name}")
def model_metadata(name: str, index: RegistryDep, team: TeamDep) -> dict[str, Any]:
    """Model metadata: versions, input and output tensors (datatype, shape; -1 is any batch)."""
    return _metadata(index, model_card(index, name, None, team), team)


@router.get("/models/{name}/versions/{version}")
def model_version_metadata(name: str, version: str, index: RegistryDep, team: TeamDep) -> dict[str, Any]:
    """Metadata of one version of a model."""
    return _metadata(index, model_card(index, name, version, team), team)


@router.get("/models/{name}/ready")
def model_ready(name: str, queues: QueueDep, index: RegistryDep, team: TeamDep) -> dict[str, Any]:
    """200 when the model exists and a worker serves predictions; 404 or 503 otherwise."""
    return _model_ready(queues, index, name, None, team)


@router.get("/models/{name}/versions/{version}/ready")
def model_version_ready(name: str, version: str, queues: QueueDep, index: RegistryDep,
                        team: TeamDep) -> dict[str, Any]:
    """Readiness of one version of a model."""
    return _model_ready(queues, index, name, version, team)
