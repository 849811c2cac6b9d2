"""``POST /v2/models/{name}[/versions/{v}]/infer``: predictions in the Open Inference Protocol v2.

The body is JSON, with or without a Content-Type (tritonclient sends none), or JSON followed by the
tensors' raw bytes (the binary tensor extension: ``Inference-Header-Content-Length`` gives the JSON's
length, each input's ``parameters.binary_data_size`` its bytes). Outputs come back as JSON or, for
those asked ``binary_data`` (or all with ``parameters.binary_data_output``), as raw bytes after the
JSON. ``parameters.reject=true`` is the detection-and-reject extension.

The gateway holds no model: it validates the tensor, puts a job on the high-priority ``predict``
queue and waits for a worker's answer, at most ``predict_timeout_s``.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError
from rq.job import Job, JobStatus
from rq.results import Result

from contracts.specs import PREDICT_INPUT_KEY, PredictJob
from models.manifest import CardIndex, ModelCard
from service.deps import QueueDep, RegistryDep, SettingsDep, TeamDep
from service.errors import Problem, invalid
from service.forms import load_json
from service.inputs import array_to_nchw, check_count
from service.metrics import INFER, JOBS
from service.queueing import Queues
from service.routes.oip import REJECT_OUTPUTS, model_card, output_specs
from service.settings import Settings

router = APIRouter(prefix="/v2/models", tags=["inference"])
HEADER_LENGTH = "inference-header-content-length"
BINARY = "application/octet-stream"
# The protocol's tensor datatypes -> little-endian numpy dtypes (BYTES and BF16 have none here).
DTYPES = {"BOOL": "?", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
          "INT8": "i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
          "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                   "FP16", "FP32", "FP64", "BF16", "BYTES"]
FLOATS = ("FP16", "FP32", "FP64")


class InferTensor(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int] = Field(min_length=1)
    datatype: Datatype
    data: list[Any] | None = Field(default=None, description="flat row-major or nested; absent with "
                                                             "parameters.binary_data_size")
    parameters: dict[str, Any] | None = None


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    parameters: dict[str, Any] | None = Field(default=None, description='{"binary_data": true}: raw bytes')


class InferParameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    reject: bool = Field(default=False, description="detection-and-reject mode")
    binary_data_output: bool = Field(default=False, description="every output as raw bytes")


class InferRequest(BaseModel):
    """OIP v2 request: one input tensor, FP32/FP64/FP16 NCHW in the model's bounds or UINT8 NHWC."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    model_name: str | None = Field(default=None, description="KServe's client sends it; the path's model")
    model_version: str | None = None
    inputs: list[InferTensor] = Field(min_length=1, max_length=1)
    outputs: list[RequestedOutput] | None = None
    parameters: InferParameters | None = None


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """The request's JSON schema with its ``$defs`` inlined, for the OpenAPI document."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)  # type: ignore[no-any-return]


OPENAPI = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _inline_refs(InferRequest.model_json_schema())},
    BINARY: {"schema": {"type": "string", "format": "binary",
                        "description": "the JSON request, then each input's raw little-endian bytes; "
                                       "header Inference-Header-Content-Length: the JSON's length"}},
}}}


async def raw_body(request: Request) -> tuple[bytes, str | None]:
    """The body as sent, whatever its Content-Type, and the binary extension's header."""
    return await request.body(), request.headers.get(HEADER_LENGTH)


BodyDep = Annotated[tuple[bytes, str | None], Depends(raw_body)]


def parse_request(body: bytes, header_length: str | None) -> tuple[InferRequest, list[bytes | None]]:
    """The JSON request and, per input, its raw bytes (None when given as JSON ``data``)."""
    json_length = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise invalid("Inference-Header-Content-Length", f"expected the JSON's length in bytes, at "
                          f"most the body's {len(body)}, got {header_length!r}", status=400)
        json_length = int(header_length)
    document = load_json("body", body[:json_length], "a JSON object (an OIP v2 inference request)")
    if not isinstance(document, dict):
        raise invalid("body", f"expected a JSON object, got {type(document).__name__}", status=400)
    request = InferRequest.model_validate(document)
    raws: list[bytes | None] = []
    offset = json_length
    for i, tensor in enumerate(request.inputs):
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is None:
            if tensor.data is None:
                raise invalid(f"inputs[{i}].data", "expected the tensor's values, or "
                              "parameters.binary_data_size with its bytes after the JSON")
            raws.append(None)
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise invalid(f"inputs[{i}].parameters.binary_data_size", f"expected a byte count, got {size!r}")
        if tensor.data is not None:
            raise invalid(f"inputs[{i}].data", "expected either data or binary_data_size, got both")
        raws.append(body[offset:offset + size])
        offset += size
    if offset != len(body):
        raise invalid("inputs", f"expected {offset - json_length} bytes of binary tensors after the "
                      f"JSON (binary_data_size), got {len(body) - json_length}", status=400)
    return request, raws


def decode_tensor(field: str, tensor: InferTensor, raw: bytes | None) -> np.ndarray:
    """FP16/FP32/FP64 -> float32, UINT8 -> uint8, shaped; other datatypes are refused."""
    if tensor.datatype not in (*FLOATS, "UINT8"):
        raise invalid(f"{field}.datatype", "expected FP32, FP64 or FP16 (NCHW in the model's bounds) "
                                           f"or UINT8 (NHWC pixels), got {tensor.datatype}")
    if any(d < 1 for d in tensor.shape):
        raise invalid(f"{field}.shape", f"expected positive dimensions, got {tensor.shape}")
    expected = int(np.prod(tensor.shape))
    dtype = np.dtype(DTYPES[tensor.datatype])
    if raw is not None:
        if len(raw) != expected * dtype.itemsize:
            raise invalid(f"{field}.parameters.binary_data_size", f"expected {expected * dtype.itemsize} "
                          f"bytes for {tensor.datatype} of shape {tensor.shape}, got {len(raw)}")
        values = np.frombuffer(raw, dtype=dtype)
    else:
        try:
            values = np.asarray(tensor.data, dtype=np.float64).reshape(-1)
        except (ValueError, TypeError):
            raise invalid(f"{field}.data", "expected numbers (flat or nested lists)") from None
        if values.size != expected:
            raise invalid(f"{field}.data", f"expected {expected} values for shape {tensor.shape}, "
                                           f"got {values.size}")
        if tensor.datatype == "UINT8" and (
            (values < 0).any() or (values > 255).any() or (values != np.round(values)).any()
        ):
            raise invalid(f"{field}.data", "expected integers in [0, 255] for UINT8")
    if tensor.datatype == "UINT8":
        return values.astype(np.uint8).reshape(tensor.shape)
    return values.astype(np.float32).reshape(tensor.shape)


def _requested(request: InferRequest, card: ModelCard, reject: bool) -> list[tuple[str, bool]]:
    """(output name, as binary) in answer order: the requested ones, else all."""
    default_binary = request.parameters is not None and request.parameters.binary_data_output
    if request.outputs is None:
        names = [o["name"] for o in output_specs(card, reject)]
        return [(name, default_binary) for name in names]
    available = [o["name"] for o in output_specs(card, True)]
    chosen: list[tuple[str, bool]] = []
    for i, output in enumerate(request.outputs):
        if output.name not in available:
            raise invalid(f"outputs[{i}].name", f"expected one of {', '.join(available)}, got {output.name!r}")
        if output.name in REJECT_OUTPUTS and not reject:
            raise invalid(f"outputs[{i}].name", f"expected parameters.reject=true for {output.name}")
        if output.name in (name for name, _ in chosen):
            raise invalid(f"outputs[{i}].name", f"expected each output once, got {output.name} twice")
        binary = (output.parameters or {}).get("binary_data", default_binary)
        if not isinstance(binary, bool):
            raise invalid(f"outputs[{i}].parameters.binary_data", f"expected true or false, got {binary!r}")
        chosen.append((output.name, binary))
    return chosen


def _predict(settings: Settings, queues: Queues, card: ModelCard, x: np.ndarray, reject: bool,
             team: str) -> dict[str, Any]:
    """Enqueue the prediction and wait for its answer; 504 after ``predict_timeout_s``.

    The input travels beside the job, as raw float32 bytes at ``PREDICT_INPUT_KEY`` (its shape in
    the payload), not base64 inside it: RQ zlib-compresses a job's payload when it is queued and
    again when it finishes. The key lives as long as the job may (queued, then run) and is removed
    once the answer is read or the prediction given up."""
    job_id = uuid.uuid4().hex
    queues.admit(team, job_id, counted=False)  # only the queue length bounds predictions
    payload = PredictJob(job_id=job_id, model=card.ref, shape=list(x.shape), reject=reject,
                         team=team if reject else None)
    input_key = PREDICT_INPUT_KEY.format(job_id)
    queues.redis.set(input_key, np.ascontiguousarray(x, dtype="<f4").tobytes(),
                     ex=settings.predict_timeout_s * 5)
    try:
        job = queues.enqueue("predict", "workers.jobs.run_predict", payload.model_dump(exclude_none=True),
                             job_id=job_id, meta={"kind": "predict", "team": team, "model": card.ref},
                             timeout=settings.predict_timeout_s * 4, result_ttl=300)
        JOBS.labels("predict").inc()
        return _answer_of(settings, queues, job)
    finally:
        with contextlib.suppress(RedisError):  # else it expires
            queues.redis.delete(input_key)


def _answer_of(settings: Settings, queues: Queues, job: Job) -> dict[str, Any]:
    """The worker's answer to the prediction ``job``, waited for at most ``predict_timeout_s``."""
    result = None
    # in one-second blocking reads: the Redis client's socket timeout bounds each read
    for _ in range(settings.predict_timeout_s):
        result = job.latest_result(timeout=1)
        if result is not None:
            break
    if result is not None and result.type == Result.Type.SUCCESSFUL:
        return result.return_value or {}  # the answer as read, without a second read of it
    status = job.get_status()
    if status in (JobStatus.QUEUED, JobStatus.STARTED):
        # A queued prediction is removed, and one that a worker picks up in the meantime stops
        # before its forward pass (every job checks the cancel flag first: workers.jobs.entry);
        # one already running finishes its forward pass, and its answer expires unread.
        queues.cancel(job)
        raise Problem(504, f"no prediction within {settings.predict_timeout_s}s (predict_timeout_s); "
                           "the workers are busy or none is running", code="predict-timeout")
    if status != JobStatus.FINISHED:
        error = job.meta.get("error") or {}
        raise Problem(503, f"prediction failed: {error.get('message', 'unknown error')}",
                      code="predict-failed")
    return job.return_value() or {}


def _tensors(out: dict[str, Any], n: int) -> dict[str, tuple[str, np.ndarray]]:
    tensors: dict[str, tuple[str, np.ndarray]] = {
        "label": ("INT64", np.asarray(out["labels"], dtype=np.int64)),
        "probabilities": ("FP32", np.asarray(out["probabilities"], dtype=np.float32)),
        "logits": ("FP32", np.asarray(out["logits"], dtype=np.float32)),
    }
    if "scores" in out:
        tensors |= {
            "detector_score": ("FP32", np.asarray(out["scores"], dtype=np.float32)),
            "threshold": ("FP32", np.full(n, out["threshold"], dtype=np.float32)),
            "rejected": ("BOOL", np.asarray(out["rejected"], dtype=bool)),
        }
    return tensors


def _answer(document: dict[str, Any], tensors: dict[str, tuple[str, np.ndarray]],
            wanted: list[tuple[str, bool]]) -> Response:
    """The JSON answer, with the binary outputs' bytes after it when any is binary."""
    outputs, raws = [], []
    for name, binary in wanted:
        datatype, array = tensors[name]
        output: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            raw = array.astype(DTYPES[datatype], copy=False).tobytes()
            output["parameters"] = {"binary_data_size": len(raw)}
            raws.append(raw)
        else:
            output["data"] = array.ravel().tolist()
        outputs.append(output)
    header = json.dumps({**document, "outputs": outputs}, separators=(",", ":")).encode()
    if not raws:
        return Response(header, media_type="application/json")
    return Response(b"".join([header, *raws]), media_type=BINARY,
                    headers={"Inference-Header-Content-Length": str(len(header))})


def infer(name: str, version: str | None, body: tuple[bytes, str | None], settings: Settings,
          queues: Queues, index: CardIndex, team: str) -> Response:
    start = time.perf_counter()  # adversa_infer_seconds: from the request's parsing to its answer
    card = model_card(index, name, version, team)
    request, raws = parse_request(*body)
    if request.model_name is not None and request.model_name != card.name:
        raise invalid("model_name", f"expected {card.name!r} (the model in the path), got "
                                    f"{request.model_name!r}")
    reject = request.parameters is not None and request.parameters.reject
    if reject and index.detector(card, team) is None:
        raise Problem(409, f"{card.ref} has no calibrated detector; calibrate one with POST "
                           f"/v1/defenses {{\"model\": \"{card.ref}\", \"defense\": {{\"name\": "
                           f"\"feature-squeezing\", \"fpr\": 0.05}}}}, wait for the job to "
                           "succeed, then retry", field="parameters.reject", code="no-detector")
    wanted = _requested(request, card, reject)
    x = array_to_nchw("inputs[0]", decode_tensor("inputs[0]", request.inputs[0], raws[0]), card)
    check_count("inputs[0].shape", x.shape[0], settings.max_infer_inputs)
    try:
        out = _predict(settings, queues, card, x, reject, team)
    except Problem as problem:
        if problem.status in (503, 504):  # refused before queueing (429) is no prediction
            INFER.labels("timeout" if problem.status == 504 else "failed").observe(time.perf_counter() - start)
        raise
    document: dict[str, Any] = {"model_name": card.name, "model_version": str(card.version),
                                "id": request.id or uuid.uuid4().hex}
    parameters = request.parameters.model_dump(exclude_unset=True) if request.parameters else {}
    if reject:
        parameters |= {"detector": out["detector"], "threshold": out["threshold"]}
    if parameters:
        document["parameters"] = parameters
    answer = _answer(document, _tensors(out, x.shape[0]), wanted)
    INFER.labels("succeeded").observe(time.perf_counter() - start)
    return answer


@router.post("/{name}/infer", openapi_extra=OPENAPI, response_model=None)
def infer_latest(name: str, body: BodyDep, settings: SettingsDep, queues: QueueDep,
                 index: RegistryDep, team: TeamDep) -> Response:
    """Predict classes for a batch with the latest version (``parameters.reject=true``:
    detection-and-reject)."""
    return infer(name, None, body, settings, queues, index, team)


@router.post("/{name}/versions/{version}/infer", openapi_extra=OPENAPI, response_model=None)
def infer_version(name: str, version: str, body: BodyDep, settings: SettingsDep, queues: QueueDep,
                  index: RegistryDep, team: TeamDep) -> Response:
    """Predict classes for a batch with one version of a model."""
    return infer(name, version, body, settings, queues, index, team)
